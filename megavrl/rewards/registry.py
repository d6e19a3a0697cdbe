"""The reward registry: task name -> reward function, and ``score``, the one entry point."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from megavrl.log import get_logger
from megavrl.rewards.config import RewardConfig
from megavrl.rewards.parsing import as_text

logger = get_logger(__name__)


@dataclass
class RewardResult:
    """The reward of one response.

    Fields:
        total: the weighted sum of the components (weights from ``RewardConfig``).
        components: unweighted component values by name, e.g. ``{"format": 1.0, "iou": 0.42}``;
            every task reports the same keys whether or not parsing succeeded.
        parsed: what was read from the response, e.g. ``{"answer": "B", "choice": "B"}`` or
            ``{"answer": "...", "span": (12.5, 17.8)}``.
        parse_ok: False when the answer could not be parsed (the task components are then 0).
        error: why parsing failed or the sample is invalid, else None.
        invalid_sample: True when the *ground truth* is unusable (a data error, counted apart
            from parse failures); the total is then 0.
    """

    total: float
    components: dict[str, float]
    parsed: dict[str, Any] = field(default_factory=dict)
    parse_ok: bool = True
    error: Optional[str] = None
    invalid_sample: bool = False


RewardFn = Callable[[str, Any, RewardConfig], RewardResult]
"""A reward function: (response text, sample, config) -> RewardResult. It must not raise on any
response text; ``score`` still catches and reports anything it raises."""

REWARDS: dict[str, RewardFn] = {}


def register_reward(task: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` as the reward of ``task`` in ``REWARDS``.

    Registering a task twice raises ValueError unless ``replace=True``.
    """
    def decorator(fn: RewardFn) -> RewardFn:
        if task in REWARDS and not replace:
            raise ValueError(f"a reward for task {task!r} is already registered ({REWARDS[task].__name__}); "
                             f"pass replace=True to override it")
        REWARDS[task] = fn
        return fn
    return decorator


def sample_field(sample: Any, key: str, default: Any = None) -> Any:
    """``sample[key]`` for a mapping (a data row), ``getattr(sample, key)`` otherwise, else ``default``."""
    if isinstance(sample, Mapping):
        return sample.get(key, default)
    return getattr(sample, key, default)


def _as_config(config: Union[RewardConfig, Mapping[str, Any], None]) -> RewardConfig:
    if config is None:
        return RewardConfig()
    if isinstance(config, RewardConfig):
        return config
    if isinstance(config, Mapping):
        return RewardConfig(**config)
    raise TypeError(f"config must be a RewardConfig or a mapping of its fields, not {type(config).__name__}")


def score(task: Optional[str], response: object, sample: Any,
          config: Union[RewardConfig, Mapping[str, Any], None] = None) -> RewardResult:
    """Score one response against its row's ground truth.

    Args:
        task: a registered task ("tvg", "mcq", "gqa", ...); None reads ``sample["task"]``.
        response: the decoded model response; any object, never raises on it.
        sample: the row (a dict, or an object with attributes): ``timestamps`` [start, end] in
            seconds, ``duration`` in seconds, ``options`` (list of str or None), ``answer``
            (an option letter such as "B", or the answer text), and optionally ``id`` and
            ``timestamp_unit`` (overrides the config's, per dataset).
        config: a RewardConfig (or a mapping of its fields); None uses the defaults.
    Returns:
        RewardResult. An unparsable answer scores 0 on the task components and has
        ``parse_ok=False``; an unusable ground truth has ``invalid_sample=True``.
    Raises:
        ValueError: ``task`` is not registered (a config or data error, not a model-output one).
    """
    if task is None:
        task = sample_field(sample, "task")
    fn = REWARDS.get(task) if isinstance(task, str) else None
    if fn is None:
        known = ", ".join(repr(t) for t in sorted(REWARDS)) or "none"
        raise ValueError(f"no reward registered for task {task!r} (row id {sample_field(sample, 'id')!r}); "
                         f"known tasks: {known}. Fix the row's task or register one with @register_reward")
    cfg = _as_config(config)
    try:
        return fn(as_text(response), sample, cfg)
    except Exception as exc:  # a run never dies on a model output; the failure is counted
        logger.warning("reward %r raised %s on row %r: %s; scored 0", task, type(exc).__name__,
                       sample_field(sample, "id"), exc)
        return RewardResult(total=0.0, components={}, parsed={}, parse_ok=False,
                            error=f"reward function for task {task!r} raised {type(exc).__name__}: {exc}")


def score_batch(responses: Sequence[object], samples: Sequence[Any],
                config: Union[RewardConfig, Mapping[str, Any], None] = None,
                tasks: Optional[Sequence[Optional[str]]] = None) -> list[RewardResult]:
    """``score`` for each (response, sample) pair; tasks default to each sample's ``task``.

    A dataset mixing tasks thus gets each row's own reward (the dual reward of the paper).
    """
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples: they must pair up")
    if tasks is not None and len(tasks) != len(samples):
        raise ValueError(f"{len(tasks)} tasks but {len(samples)} samples: they must pair up")
    cfg = _as_config(config)
    return [score(tasks[i] if tasks is not None else None, response, sample, cfg)
            for i, (response, sample) in enumerate(zip(responses, samples))]
