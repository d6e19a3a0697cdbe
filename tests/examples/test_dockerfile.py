"""The Dockerfile, checked by reading it (no Docker engine here): instructions, files, pip rules.

What is checked: it parses into known instructions; only ARGs precede FROM, which is NVIDIA's
PyTorch container; the variables Docker expands are declared; COPY sources exist and are not
excluded by .dockerignore; every RUN is valid POSIX shell (``sh -n``); the pip constraints file is
in force before any ``pip install`` and no install asks for torch or megavrl's [gpu] extra; the
.dockerignore keeps local state out of the build context.
"""
from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
         "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined, as Docker does."""
    instructions, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):   # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1]   # Docker removes the backslash and the newline
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    def match(pattern: str) -> bool:
        pattern = pattern.removeprefix("**/")
        return any(fnmatch.fnmatch(part, pattern) for part in [path, *path.split("/")])
    return any(match(p) for p in patterns if not p.startswith("!"))


def test_instructions_are_known_and_from_is_nvidia_pytorch(instructions):
    assert instructions and all(kw in KNOWN for kw, _ in instructions), [kw for kw, _ in instructions]
    first_from = next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    assert all(kw == "ARG" for kw, _ in instructions[:first_from])
    base = dict(a.split("=", 1) for kw, a in instructions[:first_from] if "=" in a)
    image = instructions[first_from][1]
    image = re.sub(r"\$\{(\w+)\}", lambda m: base[m.group(1)], image)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image


def test_expanded_variables_are_declared(instructions):
    declared = set()
    for kw, args in instructions:
        if kw in ("ARG", "ENV"):
            declared |= set(re.findall(r"(?:^|\s)(\w+)=", " " + args)) | ({args.split("=")[0]} if kw == "ARG" else set())
        elif kw not in ("RUN", "FROM"):   # RUN is expanded by the shell at build time, not by Docker
            for name in re.findall(r"\$\{?(\w+)", args):
                assert name in declared, f"{kw} {args}: ${name} is not declared by an ARG or ENV"


def test_copy_sources_exist_and_are_in_the_build_context(instructions):
    patterns = _dockerignore()
    for kw, args in instructions:
        if kw in ("COPY", "ADD"):
            *sources, _destination = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                if source == ".":
                    continue
                assert (REPO / source).exists(), f"{kw} {args}: {source} does not exist"
                assert not _ignored(source, patterns), f"{kw} {args}: {source} is excluded by .dockerignore"


def test_run_commands_are_valid_shell(instructions):
    for kw, args in instructions:
        if kw == "RUN":
            result = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"RUN {args}\n{result.stderr}"


def test_pip_never_replaces_the_containers_torch(instructions):
    runs = [(i, args) for i, (kw, args) in enumerate(instructions) if kw == "RUN"]
    pins = [i for i, (kw, args) in enumerate(instructions) if kw == "ENV" and args.startswith("PIP_CONSTRAINT=")]
    installs = [i for i, args in runs if "pip install" in args]
    assert pins and installs and pins[0] < installs[0], "PIP_CONSTRAINT must be set before the first pip install"
    # The constraints file is written before it is put in force, and must pin torch.
    assert any("megavrl-constraints.txt" in args and "^torch==" in args for i, args in runs if i < pins[0])
    for _, args in runs:
        for command in re.findall(r"pip install[^&;]*", args):
            assert not re.search(r"\btorch(==|>=|\s|$)", command), command
            assert "[gpu]" not in command, f"{command}: the [gpu] extra would fetch PyPI transformer-engine/vllm"
    assert any("use_existing_torch.py" in args for _, args in runs)


def test_dockerignore_keeps_local_state_out():
    patterns = _dockerignore()
    for path in (".venv", "runs", ".git", "megavrl/__pycache__", ".pytest_cache", ".hypothesis", "megavrl.egg-info"):
        assert _ignored(path, patterns), f"{path} is not excluded by .dockerignore"
    for path in ("setup.py", "README.md", "megavrl", "megavrl/cli.py", "examples/slurm/train_grpo.sbatch", "tools"):
        assert not _ignored(path, patterns), f"{path} is needed in the image but excluded by .dockerignore"


def test_slurm_script_points_at_the_image_checkout(instructions):
    workdirs = [args for kw, args in instructions if kw == "WORKDIR"]
    assert workdirs and workdirs[-1] in (REPO / "examples" / "slurm" / "train_grpo.sbatch").read_text()


def test_the_constraints_step_pins_the_installed_torch(instructions, tmp_path):
    # Run the Dockerfile's first RUN (it writes the constraints file) in this environment.
    step = next(args for kw, args in instructions if kw == "RUN" and "megavrl-constraints.txt" in args)
    target = tmp_path / "constraints.txt"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PIP_CONSTRAINT", None)
    result = subprocess.run(["sh", "-c", step.replace("/opt/megavrl-constraints.txt", str(target))], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"torch=={version('torch')}" in target.read_text().splitlines()
