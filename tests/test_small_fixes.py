"""Small first-run annoyances: no library FutureWarning on every command, no runs/ folder left in the
checkout by the tests, and an Accelerate CPU config that runs the process count it is given."""

from __future__ import annotations

import warnings
from pathlib import Path


def test_loading_a_lora_policy_prints_no_future_warning(tiny_model_dir: Path) -> None:
    from rl_small.config import ModelConfig
    from rl_small.models import load_adapter, load_policy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a terminal shows
        model, _ = load_policy(ModelConfig(name=str(tiny_model_dir)))
        model.save_pretrained(tiny_model_dir.parent / "adapter_fw")
        base, _ = load_policy(ModelConfig(name=str(tiny_model_dir), lora=None))
        load_adapter(base, tiny_model_dir.parent / "adapter_fw")
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == [], future
    with warnings.catch_warnings(record=True) as caught:  # only that message: others still show
        warnings.simplefilter("default")
        from rl_small.models import quiet_peft_deprecation

        quiet_peft_deprecation()
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
