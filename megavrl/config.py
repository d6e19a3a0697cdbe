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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megavrl.checkpoint.config import CheckpointConfig
from megavrl.config_base import ConfigError, check_choice, check_positive, dump_yaml, to_dict
from megavrl.data.config import DataConfig
from megavrl.eval.config import EvalConfig
from megavrl.models.config import ModelConfig
from megavrl.parallel.config import ParallelConfig, validate_parallel
from megavrl.rewards.config import RewardConfig
from megavrl.rl.config import AlgorithmConfig, LoggingConfig, OptimizerConfig, SelectionConfig, TrainerConfig
from megavrl.rollout.config import RolloutConfig

__all__ = ["AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig",
           "ModelConfig", "OptimizerConfig", "ParallelConfig", "RewardConfig", "RolloutConfig", "SelectionConfig",
           "TrainerConfig", "dump_yaml", "load_config", "to_dict", "validate", "validate_lengths", "validate_parallel"]


# ----------------------------------------------------------------------------------- sections


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

# Fields that existed once, with why they went and what to do instead.
REMOVED_FIELDS = {
    "parallel.sequence_parallel": "it never took effect (megavrl did not pass it to Megatron, and CPU mode's "
                                  "gloo backend has no reduce-scatter); delete the line",
}



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


def _refuse_misplaced_sections(data: dict, schema: type, source: str) -> None:
    """A top-level key that is no section but a field of one (``train:`` for ``data.train``) is
    refused naming the section, not with OmegaConf's nearest section name ("did you mean
    'trainer'?"), which points the wrong way."""
    if not dataclasses.is_dataclass(schema):
        return
    sections = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key in data:
        if key in sections:
            continue
        owners = [name for name in sections if dataclasses.is_dataclass(hints.get(name))
                  and key in {f.name for f in dataclasses.fields(hints[name])}]
        if owners:
            where = " or ".join(f"'{owner}.{key}'" for owner in owners)
            hint = f" (in a YAML file, under '{owners[0]}:')" if len(owners) == 1 else ""
            raise ConfigError(f"{source}: unknown config field '{key}': it is a field of a section. "
                              f"Did you mean {where}{hint}?")


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
        _refuse_misplaced_sections(data, schema, source)
        try:
            merged = OmegaConf.merge(merged, data)
        except ConfigKeyError as e:
            if _field_path(e) in REMOVED_FIELDS:
                raise ConfigError(f"{source}: config field '{_field_path(e)}' was removed: "
                                  f"{REMOVED_FIELDS[_field_path(e)]}") from None
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


# --------------------------------------------------------------------------------- validation


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
    check_positive("rollout.max_model_len", model_len)
    for name, new in (("rollout.max_new_tokens", rollout.max_new_tokens), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if new is None:
            continue
        check_positive(name, new)
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


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = True) -> Config:
    """Cross-field checks that no single field can do. Returns ``cfg`` for chaining."""
    _refuse_nonfinite(cfg)  # first: NaN passes every comparison below
    validate_parallel(cfg.parallel, world_size)
    check_choice("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    check_choice("optimizer.lr_decay_style", cfg.optimizer.lr_decay_style, ("constant", "linear", "cosine"))
    check_positive("optimizer.lr", cfg.optimizer.lr)
    check_positive("optimizer.min_lr", cfg.optimizer.min_lr, allow_zero=True)
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise ConfigError(f"optimizer.min_lr={cfg.optimizer.min_lr} exceeds optimizer.lr={cfg.optimizer.lr}")
    check_positive("optimizer.clip_grad", cfg.optimizer.clip_grad, allow_zero=True)
    check_positive("trainer.total_steps", cfg.trainer.total_steps, allow_zero=True)
    check_positive("trainer.prompts_per_step", cfg.trainer.prompts_per_step)
    check_positive("trainer.preemption_grace_s", cfg.trainer.preemption_grace_s)
    check_positive("trainer.micro_batch_size", cfg.trainer.micro_batch_size)
    check_positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    validate_lengths(cfg)
    rollout = cfg.rollout
    if cfg.algorithm.name == "grpo" and rollout.vllm_logprobs_mode() == "raw_logprobs" \
            and rollout.scoring_temperature != 1.0:
        raise ConfigError(f"rollout.logprobs_mode=raw_logprobs returns vLLM's log-probs at temperature 1, but GRPO "
                          f"scores the responses at rollout.temperature={rollout.temperature}, the temperature they "
                          f"were sampled at: set rollout.logprobs_mode=auto (or processed_logprobs)")
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
        from megavrl.models.qwen2_5_vl.args import TextSizes
        from megavrl.models.qwen2_5_vl.config import check_tp_pp, load_hf_config

        try:
            hf_config = load_hf_config(hf_dir)  # parsed once per process: the model's configs reuse it
        except Exception as e:  # transformers validates sizes on load
            raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r}: config.json is invalid: {_first_line(e)}") from None
        try:
            check_tp_pp(TextSizes.from_hf(hf_config), cfg.parallel.tp, cfg.parallel.pp,
                        vision_heads=hf_config.vision_config.num_heads, options=("parallel.tp", "parallel.pp"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg
