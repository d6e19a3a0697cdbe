"""Typed run configuration: YAML files plus dotted ``key=value`` overrides, validated at start.

A config is a tree of dataclass sections (model, parallel, data, rollout, algorithm, reward,
optimizer, trainer, logging, checkpoint, ...). Loading merges, in order: the dataclass defaults,
each YAML file, then the command-line overrides (``rollout.n=8 parallel.tp=2``). OmegaConf does
the typed merge; every failure is re-raised as a :class:`ConfigError` that names the field and
says how to fix it. :func:`validate` then checks what no single field can: divisibility of the
world size and the model's heads by the parallel sizes, paths that must exist, value ranges,
finite numbers, and token lengths that vLLM can serve (prompt + response <= rollout.max_model_len).

Sections owned by a subsystem are defined next to that subsystem's code (for instance the reward
weights in :mod:`megavrl.rewards`) and imported here, so each option is declared exactly once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megavrl.data.config import DataConfig
from megavrl.errors import UserError
from megavrl.rewards.config import RewardConfig
from megavrl.rollout.engine import RolloutConfig
from megavrl.rl.config import GRPOConfig, MicroBatchConfig, SelectionConfig


class ConfigError(UserError):
    """A configuration that cannot work. The message names the field and the fix."""


# ----------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None
    """Hugging Face Qwen2.5-VL directory (config, tokenizer, processor, safetensors)."""
    megatron_ckpt: Optional[str] = None
    """Megatron distributed checkpoint to start from instead of hf_dir's weights (hf_dir still
    supplies config, tokenizer and processor)."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (bfloat16 on GPU, float32 on CPU)."""
    freeze_vision: bool = False
    freeze_projector: bool = False
    recompute_activations: bool = False
    """Megatron full activation recomputation (saves memory, costs ~1/3 more compute)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Megatron tensor-parallel size."""
    pp: int = 1
    """Megatron pipeline-parallel size. Data parallelism is world_size / (tp * pp)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (only takes effect on GPU with DP > 1)."""
    backend: str = "auto"
    """auto | nccl | gloo. auto: nccl with CUDA, gloo (CPU mode) without."""
    nproc: Optional[int] = None
    """Processes to start when a command runs outside torchrun (default: tp * pp)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    """constant | linear | cosine (decay over trainer.total_steps)."""


@dataclass
class TrainerConfig(MicroBatchConfig):
    total_steps: int = 100
    prompts_per_step: int = 16
    micro_batch_size: int = 1
    """Sequences per micro-batch of Megatron's forward-backward schedule."""
    seed: int = 1234
    eval_every: int = 0
    """Steps between evaluations (0: only before and after training)."""
    max_consecutive_nonfinite: int = 3
    """Stop after this many steps in a row whose loss was NaN/inf (each is skipped and counted)."""
    preemption_grace_s: float = 120.0
    """Seconds from a stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) to a complete checkpoint. The
    step in flight is finished, or abandoned if its update has not started, then a checkpoint is
    written; a process still alive after this many seconds exits without one (the previous
    checkpoint stays). The launcher passes it to torchrun as --shutdown-timeout; on Slurm keep it
    below the --signal lead time."""
    output_dir: str = "runs/megavrl"


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    """Default: <trainer.output_dir>/tensorboard."""
    log_every: int = 1
    """Steps between console lines (TensorBoard gets every step)."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Default: <trainer.output_dir>/checkpoints."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end and on SIGTERM)."""
    keep_last: int = 3
    resume: str = "auto"
    """auto (newest complete checkpoint in dir, if any) | none | a checkpoint path."""
    export_hf_at_end: bool = True


@dataclass
class EvalConfig:
    """Evaluation on ``data.val`` (``megavrl eval`` and periodic evaluation during training)."""

    temperature: float = 0.0
    """0: greedy decoding."""
    max_new_tokens: Optional[int] = None
    """Default: rollout.max_new_tokens."""
    max_samples: Optional[int] = None
    """Evaluate only the first N validation rows (None: all)."""
    output_dir: Optional[str] = None
    """Where predictions.jsonl, metrics.json and metrics.md go (default: <trainer.output_dir>/eval)."""


@dataclass
class AlgorithmConfig(GRPOConfig):
    """The ``algorithm`` section: the GRPO loss options plus how a step uses its rollouts."""

    name: str = "grpo"
    """grpo | sft (cross-entropy on the reference answers: the paper's SFT baseline and warm start)."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    mini_batches: int = 1
    """Optimizer steps per epoch (the step's sequences are split into this many mini-batches)."""
    filter_zero_variance: bool = False
    """Drop prompt groups whose n rewards are all equal and refill from the data queue
    (at most selection.max_refills groups per step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in ("grpo", "sft"):
            raise ValueError(f"algorithm.name={self.name!r} is not one of 'grpo', 'sft'")
        for key in ("ppo_epochs", "mini_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key}={getattr(self, key)} must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.data.prompt.max_prompt_len is None:  # the longest prompt whose response still fits
            self.data.prompt.max_prompt_len = max(1, self.rollout.max_model_len - self.longest_response())

    def longest_response(self) -> int:
        """Tokens the engine may generate after a prompt: rollout's or, when larger, eval's."""
        return max(self.rollout.max_new_tokens, self.eval.max_new_tokens or 0)


# ------------------------------------------------------------------------------------ loading


def _field_path(exc: Exception) -> str:
    return str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key=value (for example rollout.n=8)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(files: str | os.PathLike | list = (), overrides: list[str] = (), schema: type = Config):
    """Build a ``schema`` instance from YAML ``files`` and dotted ``overrides``.

    Raises ConfigError naming the offending field: unknown keys (with a close-match
    suggestion), values of the wrong type, malformed overrides, unreadable files.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    merged = OmegaConf.structured(schema)
    layers: list[tuple[str, dict]] = []
    for path in files:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory: give a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:  # unreadable (permissions), or gone since the check
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
        layers.append((str(path), data))
    for item in overrides:
        key, value = _parse_override(item)
        layers.append((f"override {item!r}", _nest(key, value)))
    for source, data in layers:
        _refuse_nonfinite(data, prefix="", source=source)
        try:
            merged = OmegaConf.merge(merged, data)
        except ConfigKeyError as e:
            raise ConfigError(f"{source}: unknown config field '{_field_path(e)}'. {_first_line(e)}") from None
        except ValidationError as e:
            raise ConfigError(f"{source}: config field '{_field_path(e)}' has a bad value: {_first_line(e)}") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: config field '{_field_path(e)}': {_first_line(e)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except ValueError as e:  # a section's own __post_init__ check; its message names the field
        raise ConfigError(str(e)) from None
    _refuse_nonfinite(cfg)  # "nan" / "inf" typed as text become floats only in to_object
    return cfg


def to_dict(cfg) -> dict:
    """A plain nested dict (for logging, TensorBoard hparams and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)


# --------------------------------------------------------------------------------- validation


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _nonfinite(tree: Any, prefix: str) -> Optional[tuple[str, float]]:
    """The dotted path and value of the first NaN/inf float in a nested config (dataclasses,
    mappings, lists), or None."""
    if isinstance(tree, float):
        return None if math.isfinite(tree) else (prefix, tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        items = ((f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree))
    elif isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        return next((hit for i, v in enumerate(tree) if (hit := _nonfinite(v, f"{prefix}[{i}]"))), None)
    else:
        return None
    return next((hit for k, v in items if (hit := _nonfinite(v, f"{prefix}.{k}" if prefix else str(k)))), None)


def _refuse_nonfinite(tree: Any, prefix: str = "", source: str | None = None) -> None:
    hit = _nonfinite(tree, prefix)
    if hit is not None:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{hit[0]}={hit[1]} must be a finite number (not NaN or infinity)")


def validate_lengths(cfg: Config) -> None:
    """A prompt of ``data.prompt.max_prompt_len`` tokens plus a full response must fit in
    ``rollout.max_model_len``: vLLM refuses a prompt that fills the context, and stops a response
    that reaches its end short of ``max_new_tokens`` (a truncated response the reward then scores)."""
    rollout, prompt_len = cfg.rollout, cfg.data.prompt.max_prompt_len
    model_len = rollout.max_model_len
    _positive("rollout.max_model_len", model_len)
    for name, new in (("rollout.max_new_tokens", rollout.max_new_tokens), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if new is None:
            continue
        _positive(name, new)
        if new >= model_len:
            raise ConfigError(f"{name}={new} must be below rollout.max_model_len={model_len} (the prompt needs "
                              f"room too): raise rollout.max_model_len or lower {name}")
    if prompt_len is None:  # a Config built without __post_init__'s default (cannot happen via load_config)
        return
    if prompt_len >= model_len:
        raise ConfigError(f"data.prompt.max_prompt_len={prompt_len} is not below rollout.max_model_len={model_len}: "
                          f"vLLM refuses a prompt that leaves no room for a response; raise rollout.max_model_len "
                          f"or lower data.prompt.max_prompt_len (unset, it is max_model_len - max_new_tokens)")
    for name, new in (("rollout.max_new_tokens", rollout.max_new_tokens), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if new is not None and prompt_len + new > model_len:
            raise ConfigError(
                f"data.prompt.max_prompt_len={prompt_len} + {name}={new} = {prompt_len + new} exceeds "
                f"rollout.max_model_len={model_len}: vLLM would cut the responses to the longest prompts at "
                f"{model_len - prompt_len} tokens; raise rollout.max_model_len to {prompt_len + new}, lower "
                f"data.prompt.max_prompt_len to {model_len - new}, or lower {name} to {model_len - prompt_len}")


def validate_parallel(parallel: ParallelConfig, world_size: int | None = None) -> None:
    """Parallel sizes against each other and, when known, the number of processes."""
    _positive("parallel.tp", parallel.tp)
    _positive("parallel.pp", parallel.pp)
    _choice("parallel.backend", parallel.backend, ("auto", "nccl", "gloo"))
    model_parallel = parallel.tp * parallel.pp
    if world_size is not None and world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
            f"{parallel.tp} * {parallel.pp} = {model_parallel}: start a multiple of {model_parallel} "
            f"processes (torchrun --nproc-per-node) or change parallel.tp / parallel.pp")
    if parallel.nproc is not None and parallel.nproc % model_parallel != 0:
        raise ConfigError(f"parallel.nproc={parallel.nproc} is not divisible by parallel.tp * parallel.pp "
                          f"= {model_parallel}")


def validate_model_against_parallel(hf_config, tp: int) -> None:
    """Heads and KV groups of the HF config must split evenly over ``tp`` ranks."""
    text = getattr(hf_config, "text_config", hf_config)
    vision = getattr(hf_config, "vision_config", None)
    checks = [("num_attention_heads", text.num_attention_heads),
              ("num_query_groups (num_key_value_heads)", text.num_key_value_heads or text.num_attention_heads)]
    if vision is not None:
        checks.append(("vision num_heads", vision.num_heads))
    for what, n in checks:
        if n % tp != 0:
            raise ConfigError(f"{what}={n} is not divisible by tensor_model_parallel_size "
                              f"(parallel.tp)={tp}: choose parallel.tp among the divisors of {n}")


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = True) -> Config:
    """Cross-field checks that no single field can do. Returns ``cfg`` for chaining."""
    _refuse_nonfinite(cfg)  # first: NaN passes every comparison below
    validate_parallel(cfg.parallel, world_size)
    _choice("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice("optimizer.lr_decay_style", cfg.optimizer.lr_decay_style, ("constant", "linear", "cosine"))
    _positive("optimizer.lr", cfg.optimizer.lr)
    _positive("optimizer.min_lr", cfg.optimizer.min_lr, allow_zero=True)
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise ConfigError(f"optimizer.min_lr={cfg.optimizer.min_lr} exceeds optimizer.lr={cfg.optimizer.lr}")
    _positive("optimizer.clip_grad", cfg.optimizer.clip_grad, allow_zero=True)
    _positive("trainer.total_steps", cfg.trainer.total_steps, allow_zero=True)
    _positive("trainer.prompts_per_step", cfg.trainer.prompts_per_step)
    _positive("trainer.preemption_grace_s", cfg.trainer.preemption_grace_s)
    _positive("trainer.micro_batch_size", cfg.trainer.micro_batch_size)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    validate_lengths(cfg)
    if cfg.checkpoint.resume not in ("auto", "none") and check_paths and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r} does not exist: give an existing "
                          f"checkpoint directory, 'auto' or 'none'")
    if check_paths:
        if cfg.model.hf_dir is None:
            raise ConfigError("model.hf_dir is not set: point it at a Hugging Face Qwen2.5-VL directory "
                              "(make one for tests with `megavrl make-tiny-model --out DIR`)")
        hf_dir = Path(cfg.model.hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r} has no config.json: give a Hugging Face "
                              f"Qwen2.5-VL directory")
        if cfg.model.megatron_ckpt is not None and not Path(cfg.model.megatron_ckpt).exists():
            raise ConfigError(f"model.megatron_ckpt={cfg.model.megatron_ckpt!r} does not exist")
        model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
        if model_type != "qwen2_5_vl":
            raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r} holds a {model_type!r} model; "
                              f"megavrl trains Qwen2.5-VL (model_type 'qwen2_5_vl')")
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(hf_dir)
        except Exception as e:  # transformers validates sizes on load
            raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r}: config.json is invalid: {_first_line(e)}") from None
        validate_model_against_parallel(hf_config, cfg.parallel.tp)
    return cfg
