"""The README's shell examples run as written.

Every ```bash block of README.md runs in a fresh directory laid out as after `make demo`
(``examples/`` of this checkout, ``runs/demo/tiny-hf``, ``runs/demo/data``, ``runs/demo/sft/hf``),
with the ``megavrl`` of this environment on PATH, unless an HTML comment on the line before it says
otherwise:

- ``<!-- readme-test: skip (why) -->``: not run here (minutes of training, a GPU, Slurm, a
  synopsis with placeholders); the reason is required;
- ``<!-- readme-test: exits N -->``: each command of the block must fail with status N and one line.

What the fixture builds is smaller than the demo's: a tiny random model and 4 synthetic videos.
``runs/demo/sft/hf`` is a copy of the random model, not an SFT warm start: the blocks that run only
need a model directory there (validation reads its config); the ones that would train from it are
marked skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?:(skip)\s*(?:\((?P<reason>[^)]*)\))?|exits\s+(?P<status>\d+))\s*-->$")
BLOCK_TIMEOUT_S = 600  # a block meant to run takes under a minute on 2 idle cores; this catches a hang


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    action: str  # run | skip | exits
    status: int = 0
    reason: str = ""


def readme_blocks(text: str) -> list[Block]:
    """The ```bash blocks of ``text`` with what their marker comment says."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = lines[start - 1].strip() if start else ""
            match = MARKER.match(before)
            if match and match.group(1) == "skip":
                blocks.append(Block(start + 1, "\n".join(body), "skip", reason=(match.group("reason") or "").strip()))
            elif match:
                blocks.append(Block(start + 1, "\n".join(body), "exits", status=int(match.group("status"))))
            else:
                blocks.append(Block(start + 1, "\n".join(body), "run"))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.action != "skip"]


def test_every_block_runs_or_says_why_not():
    assert BLOCKS, "README.md has no bash block"
    for block in BLOCKS:
        if block.action == "skip":
            assert block.reason, f"README.md:{block.line}: a skipped block must say why: <!-- readme-test: skip (why) -->"
    assert len(RUNNABLE) >= 4  # the checks below are not vacuous
    # A stray marker (a typo, or one not on the line right before a block) would silently run a block.
    lines = README.read_text().splitlines()
    for n, line in enumerate(lines):
        if "readme-test" in line:
            assert MARKER.match(line.strip()), f"README.md:{n + 1}: malformed marker {line!r}"
            assert n + 1 < len(lines) and lines[n + 1].strip() == "```bash", f"README.md:{n + 1}: marker not before a block"


def _commands(code: str) -> list[str]:
    """The commands of a block, one per line (backslash continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A working directory as after `make demo`, with a tiny model and tiny data."""
    work = tmp_path_factory.mktemp("readme")
    (work / "examples").symlink_to(REPO / "examples")
    env = _env()
    demo = work / "runs" / "demo"
    for cmd in (["make-tiny-model", "--out", str(demo / "tiny-hf"), "--preset", "tiny", "--seed", "0"],
                ["data", "synth", "--out", str(demo / "data"), "--tasks", "tvg,mcq,gqa", "--n", "4", "--seed", "0"]):
        subprocess.run([sys.executable, "-m", "megavrl.cli", *cmd], cwd=work, env=env, check=True,
                       capture_output=True, timeout=BLOCK_TIMEOUT_S)
    (demo / "sft").mkdir()
    shutil.copytree(demo / "tiny-hf", demo / "sft" / "hf")
    return work


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's megavrl
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"README.md:{b.line}" for b in RUNNABLE])
def test_block_runs(block: Block, demo_dir: Path):
    env = _env()
    if block.action == "run":
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=demo_dir, env=env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert result.returncode == 0, (f"README.md:{block.line} failed ({result.returncode}):\n{block.code}\n"
                                        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
        return
    for command in _commands(block.code):
        result = subprocess.run(["bash", "-c", command], cwd=demo_dir, env=env, capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT_S)
        output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert result.returncode == block.status, f"README.md:{block.line}: {command!r} exited {result.returncode}: {output}"
        assert len(output) == 1 and output[0].startswith("megavrl "), f"README.md:{block.line}: {command!r}: {output}"
