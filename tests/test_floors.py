"""The package's floor plan: a module imports only from its own floor or the floors below it.

Floors, bottom to top (README, Development):

    0 base        errors, log, console, dtypes, config_base, run_metrics, envsetup, the package root
    1 parallel    process groups, launching, CPU mode
    2 models      the Megatron Qwen2.5-VL (sizes, layers, M-RoPE)
    3 checkpoint  HF <-> Megatron mapping, conversion, checkpoint manager
    4 data        video decoding, prompts, datasets        rewards  parsing and scoring
    5 rollout     the vLLM engine, its inputs, the weight sync
    6 eval        metrics, predictions, reports, the eval runner
    7 rl          actor, losses, experience, the trainer, selection
    8 config      assembles every subsystem's section and validates across them
    9 commands    the CLI's subcommands    checks  parity, check-sync    cli

Imports inside functions count as much as those at the top of a module: they still make the lower
floor depend on the upper one. The test reads the source with ``ast``, so it needs no import.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megavrl"

FLOORS = [
    {"megavrl", "errors", "log", "console", "dtypes", "config_base", "run_metrics", "envsetup"},
    {"parallel"},
    {"models"},
    {"checkpoint"},
    {"data", "rewards"},
    {"rollout"},
    {"eval"},
    {"rl"},
    {"config"},
    {"commands", "checks", "cli"},
]
FLOOR_OF = {unit: i for i, units in enumerate(FLOORS) for unit in units}

# Imports allowed to run up a floor, with the reason. Keep this list at two entries at most.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``megavrl`` module ``path`` imports, at the top or inside functions."""
    module = _module_name(path)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                name = ".".join(anchor + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "megavrl" or name.startswith("megavrl.")}


def _unit(module: str) -> str:
    """The floor unit of a module: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the importing modules, for imports across units."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target in _imports(path):
            a, b = _unit(source), _unit(target)
            if a != b:
                edges[(a, b)].append(f"{source} -> {target}")
    return edges


def test_every_package_has_a_floor():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOOR_OF), f"put {sorted(units - set(FLOOR_OF))} on a floor (FLOORS here and the README)"


def test_no_import_runs_up_a_floor():
    upward = {edge: where for edge, where in import_edges().items()
              if FLOOR_OF.get(edge[1], 0) > FLOOR_OF.get(edge[0], 0) and edge not in ALLOWED_UPWARD}
    assert not upward, "imports that run up a floor:\n" + "\n".join(
        f"  {a} (floor {FLOOR_OF[a]}) -> {b} (floor {FLOOR_OF[b]}): {', '.join(where)}" for (a, b), where in upward.items())
    assert len(ALLOWED_UPWARD) <= 2


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in import_edges():
        graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_nothing_imports_the_top_floor():
    """Diagnostics and subcommands are leaves: only the CLI (and each other) reach them."""
    top = FLOORS[-1]
    reached = {edge: where for edge, where in import_edges().items() if edge[1] in top and edge[0] not in top}
    assert not reached, reached


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """Negative control: a lower floor importing a higher one is caught, even inside a function."""
    fake = tmp_path / "megavrl"
    for unit in ("models", "rl"):
        (fake / unit).mkdir(parents=True)
        (fake / unit / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from megavrl.rl.trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGE", fake)
    assert ("models", "rl") in import_edges()
    with pytest.raises(AssertionError, match="models .floor 2. -> rl .floor 7."):
        test_no_import_runs_up_a_floor()
