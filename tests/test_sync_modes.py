"""rollout.sync adapter | merged | auto without vLLM: the merge, the order of pushes, auto's choice from injected
timings, the server's flags. The served policy itself is checked against real vLLM in tests/test_vllm_sync.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rl_small.config import RolloutConfig
from rl_small.rollout.base import RolloutError
from rl_small.rollout.server import VLLMServer
from rl_small.rollout.weights import SyncChooser, WeightSync, merged_state, reload_on_server, write_merged


def _peft(tiny_model_dir: Path, scale: float = 1.0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    return model


def test_merged_state_is_peft_merge_and_leaves_the_trainer_model_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    import copy

    import torch
    from safetensors.torch import load_file

    model = _peft(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()  # PEFT's own merge, on a copy
    assert set(merged) == set(reference)  # HF checkpoint names, no lora_/base_layer
    for name, tensor in reference.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"]).abs().max() > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the trainer's weights untouched
    plain = merged_state(model, merge=False)
    assert torch.equal(plain[q], before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])

    folder = write_merged(model, tmp_path, 3)
    assert folder == tmp_path / "merged-v3" and not list(tmp_path.glob(".*tmp"))
    on_disk = load_file(str(folder / "model.safetensors"))
    assert torch.equal(on_disk[q], merged[q])


def test_merged_state_refuses_a_full_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    with pytest.raises(RolloutError, match="needs a LoRA policy"):
        merged_state(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def _run(chooser: SyncChooser, speeds: dict[str, tuple[float, float]], syncs: int, tokens: int = 1536) -> list[str]:
    """Drive ``chooser`` through ``syncs`` steps: each mode syncs in speeds[mode][0] s and generates at
    speeds[mode][1] tokens/s; returns the mode of every sync."""
    modes = []
    for _ in range(syncs):
        mode = chooser.choose()
        modes.append(mode)
        sync_s, rate = speeds[mode]
        chooser.observe_sync(mode, sync_s)
        chooser.observe_generation(tokens // 2, tokens / 2 / rate)  # two generate calls per version
        chooser.observe_generation(tokens // 2, tokens / 2 / rate)
    return modes


def test_auto_times_both_then_keeps_the_faster_and_remeasures(caplog: pytest.LogCaptureFixture) -> None:
    # the default job, 4 x 8 x 48 = 1536 tokens a step: merged 1.3 s + 1536 / 60 = 26.9 s beats adapter
    # 0.2 s + 1536 / 25 = 61.6 s
    chooser = SyncChooser("auto", remeasure=3)
    chooser.observe_generation(999, 1.0)  # before the first sync: the base model, no mode's speed
    with caplog.at_level(logging.INFO, logger="rl_small.rollout"):
        modes = _run(chooser, {"adapter": (0.2, 25.0), "merged": (1.3, 60.0)}, 9)
    assert modes == ["adapter", "merged", "merged", "merged", "merged", "adapter", "merged", "merged", "merged"]
    assert chooser.chosen == "merged"
    m = chooser.metrics()
    assert m["rollout/sync_merged"] == 1.0
    assert m["rollout/tok_s_adapter"] == pytest.approx(25.0) and m["rollout/tok_s_merged"] == pytest.approx(60.0)
    assert m["rollout/step_s_adapter"] == pytest.approx(0.2 + 1536 / 25)
    assert m["rollout/step_s_merged"] == pytest.approx(1.3 + 1536 / 60)
    assert "rollout.sync auto: merged" in caplog.text and "25.0 tok/s" in caplog.text


def test_auto_keeps_the_adapter_when_the_merged_push_costs_more() -> None:
    # a model whose full-weight push (40 s) outweighs the faster generation: 0.2 + 1536/25 < 40 + 1536/60
    chooser = SyncChooser("auto", remeasure=50)
    assert _run(chooser, {"adapter": (0.2, 25.0), "merged": (40.0, 60.0)}, 5) == ["adapter", "merged"] + ["adapter"] * 3
    assert chooser.metrics()["rollout/sync_merged"] == 0.0


def test_auto_redecides_when_the_ratio_changes(caplog: pytest.LogCaptureFixture) -> None:
    chooser = SyncChooser("auto", remeasure=2)
    _run(chooser, {"adapter": (0.2, 25.0), "merged": (1.3, 60.0)}, 3)
    assert chooser.chosen == "merged"
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout"):  # merged pushes became slow (e.g. I/O)
        modes = _run(chooser, {"adapter": (0.2, 25.0), "merged": (90.0, 60.0)}, 4)
    assert modes == ["merged", "adapter", "adapter", "adapter"] and chooser.chosen == "adapter"
    assert "was merged" in caplog.text


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_fixed_modes_never_switch(mode: str) -> None:
    chooser = SyncChooser(mode, remeasure=2)
    assert _run(chooser, {"adapter": (5.0, 1.0), "merged": (5.0, 1.0)}, 6) == [mode] * 6
    assert chooser.metrics() == {"rollout/sync_merged": float(mode == "merged")}


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'merge'"):
        SyncChooser("merge")
    with pytest.raises(ValueError, match="sync\\n.*'adapter', 'merged' or 'auto'.*'merge'"):
        RolloutConfig(sync="merge")  # type: ignore[arg-type]


def test_weight_sync_puts_the_base_back_before_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """After a merged push the sampler's base weights are the merged ones: an adapter pushed next would be
    applied twice, so the plain base weights are reloaded first (auto switching back)."""
    model = _peft(tiny_model_dir)
    calls: list[str] = []
    sync = WeightSync("auto", tmp_path, remeasure=2)
    sync.chooser.choose = lambda: plan.pop(0)  # type: ignore[method-assign]
    plan = ["adapter", "merged", "merged", "adapter"]
    for version in range(1, 5):
        sync.sync(model, version, lambda w: calls.append("adapter"), lambda f: calls.append(f.name))
    assert calls == ["adapter", "merged-v2", "merged-v3", "base-weights", "adapter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-weights"]  # old merged copies deleted
    assert sync.loaded is None and sync.chooser.serving == "adapter"


def test_merged_sync_of_an_adapter_folder_is_refused(tmp_path: Path) -> None:
    sync = WeightSync("merged", tmp_path)
    with pytest.raises(RolloutError, match="not the folder"):
        sync.sync(tmp_path, 1, lambda w: None, lambda f: None)


def test_server_flags_follow_the_sync_mode(tmp_path: Path) -> None:
    def server(mode: str) -> VLLMServer:
        return VLLMServer.from_rollout(RolloutConfig(sync=mode), str(tmp_path), 16, 8100)  # type: ignore[arg-type]

    adapter, merged, auto = server("adapter"), server("merged"), server("auto")
    assert "--enable-lora" in adapter.argv() and "VLLM_SERVER_DEV_MODE" not in adapter.env()
    assert "--enable-lora" not in merged.argv() and merged.env()["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-lora" in auto.argv() and auto.env()["VLLM_SERVER_DEV_MODE"] == "1"


def test_server_without_reload_route_is_named(tmp_path: Path) -> None:
    from tests.fake_vllm import FakeVLLM

    fake = FakeVLLM().start()  # answers 404 on routes it does not know, like a server without dev mode
    try:
        with pytest.raises(RolloutError, match="VLLM_SERVER_DEV_MODE=1"):
            reload_on_server(fake.url, tmp_path)
    finally:
        fake.stop()


def test_other_rank_requests_the_version_the_main_process_loaded() -> None:
    """Data-parallel rank > 0 does not load weights itself: it must still name the adapter the main process
    loaded (before the fix it asked for ``base``: the base model's completions, silently), and ``base`` where
    the main process pushed merged weights."""
    from rl_small.rollout.base import SamplingSpec
    from rl_small.rollout.vllm_server import VLLMServerBackend
    from rl_small.types import Prompt
    from tests.fake_vllm import FakeVLLM
    from tests.test_server_faults import _Tok

    fake = FakeVLLM().start()
    backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), is_main=False, sync="auto")
    try:
        fake.models.add("v1")  # the main process loaded adapter v1
        backend.sync(Path("/unused"), version=1)
        backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=1, max_new_tokens=2))
        backend.sync(Path("/unused"), version=2)  # the main process pushed merged weights: no "v2"
        out = backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=1, max_new_tokens=2))
        assert fake.requested == ["v1", "base"] and out[0].version == 2
    finally:
        backend.close()
        fake.stop()
