"""What every config section shares: the error type, the wording of its checks, its YAML form.

Every check raises :class:`ConfigError` with a message that names the field (its dotted path, as
the user writes it in YAML or on the command line), the value it got, and what would work. The
sections' own ``__post_init__`` checks run while a config loads, :func:`megavrl.config.validate`
runs the checks across sections; the ``megavrl`` command prints either as one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from megavrl.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot work. The message names the field and the fix."""


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def check_number(name: str, value: object, minimum: Optional[float] = None) -> None:
    """``value`` must be a finite int or float (not a bool), and at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    """``value`` must be > 0 (>= 0 with ``allow_zero``); None passes (an unset optional field)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def to_dict(cfg) -> dict:
    """A plain nested dict (for logging, TensorBoard hparams and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    """The config as YAML (``config.yaml`` of a run; loadable with ``--config``)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)
