"""The console lines of a training run's evaluation: each metric before -> after, beside its blind baseline."""
from __future__ import annotations

from typing import Mapping

from megavrl.eval.metrics import BLIND_KEY


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def eval_summary_lines(before: Mapping[str, object], after: Mapping[str, object]) -> list[str]:
    """``  eval <benchmark>/<metric>: before B -> after A  (blind baseline X)`` for each numeric metric.

    ``before``/``after`` are flat eval results (``<benchmark>/<metric>`` -> value, as ``run_eval``
    returns them); the ``<benchmark>/blind/<metric>`` entries are shown beside their metric, not
    on lines of their own (the baseline depends on the ground truth only, so both evaluations
    give the same one).
    """
    lines = []
    marker = f"/{BLIND_KEY}/"
    for key in sorted(set(before) | set(after)):
        if marker in key:
            continue
        b, a = before.get(key), after.get(key)
        if not (isinstance(b, (int, float)) or isinstance(a, (int, float))):
            continue
        line = f"  eval {key}: before {_number(b)} -> after {_number(a)}"
        head, _, metric = key.rpartition("/")
        blind_key = f"{head}{marker}{metric}"
        blind = after.get(blind_key, before.get(blind_key))
        if isinstance(blind, (int, float)):
            line += f"  (blind baseline {_number(blind)})"
        lines.append(line)
    return lines
