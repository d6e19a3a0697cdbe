"""The ``megavrl`` command's errors: bad input is one line naming the file, a bug keeps its traceback.

Each case runs the real command line in a subprocess (``python -m megavrl.cli``) three ways:
plainly (one line, no traceback), with ``megavrl --debug`` and with ``MEGAVRL_DEBUG=1`` (the
traceback too).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_MODES = ["plain", "--debug", "MEGAVRL_DEBUG=1"]


def megavrl(*args: str, debug: str = "plain", timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MEGAVRL_DEBUG", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "megavrl.cli"]
    if debug == "--debug":
        argv.append("--debug")
    elif debug == "MEGAVRL_DEBUG=1":
        env["MEGAVRL_DEBUG"] = "1"
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, debug: str, *fragments: str,
                          code: int = 2, kind: str = "error") -> str:
    """The last stderr line is ``megavrl <command>: <kind>: ...`` holding every fragment; the
    traceback is there exactly when debugging was asked for."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    last = lines[-1]
    assert last.startswith(f"megavrl {command}: {kind}: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    if debug == "plain":
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    return last


# ------------------------------------------------------------------------------ model directories


@pytest.mark.parametrize("debug", DEBUG_MODES)
@pytest.mark.parametrize("command", ["check-parity", "check-sync"])
def test_missing_hf_dir_is_one_line_without_hub_retries(command, debug, tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    proc = megavrl(command, "--hf-dir", str(missing), debug=debug, timeout=60)
    assert_one_line_error(proc, command, debug, f"--hf-dir '{missing}' does not exist")
    assert "Repo id" not in proc.stderr  # transformers never saw it as a Hub repo id


def test_directory_without_config_json_is_named(tmp_path):
    proc = megavrl("check-parity", "--hf-dir", str(tmp_path))
    assert_one_line_error(proc, "check-parity", "plain", f"--hf-dir '{tmp_path}' has no config.json")


@pytest.fixture
def truncated_hf_dir(tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad_hf"
    shutil.copytree(tiny_hf_dir, bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:  # a download cut off half-way: the header is whole, the data is not
        f.truncate(weights.stat().st_size // 2)
    return bad


@pytest.mark.parametrize("debug", DEBUG_MODES)
def test_truncated_safetensors_is_named(truncated_hf_dir, tmp_path, debug):
    weights = truncated_hf_dir / "model.safetensors"
    proc = megavrl("convert", "hf-to-megatron", "--hf-dir", str(truncated_hf_dir), "--out", str(tmp_path / "out"),
                   "--no-progress", debug=debug)
    assert_one_line_error(proc, "convert hf-to-megatron", debug, f"safetensors file '{weights}' is truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_named_by_check_parity(truncated_hf_dir):
    proc = megavrl("check-parity", "--hf-dir", str(truncated_hf_dir), "--tp", "2")
    assert_one_line_error(proc, "check-parity", "plain", f"'{truncated_hf_dir / 'model.safetensors'}'")
    assert "launching" not in proc.stderr  # refused before torchrun started two processes


# ------------------------------------------------------------------------------ checkpoints


def write_small_dist_checkpoint(root: Path) -> Path:
    """A megavrl-style checkpoint directory (marker + dist/ in torch_dist's on-disk format) holding
    one tensor; its shard file is dist/__0_0.distcp."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(20000, dtype=torch.float32)}, checkpoint_id=str(root / "dist"), no_dist=True)
    (root / "megavrl_checkpoint.json").write_text("{}\n")
    return root / "dist" / "__0_0.distcp"


@pytest.mark.parametrize("debug", ["plain", "MEGAVRL_DEBUG=1"])  # ~5 s each: megatron's import
def test_truncated_distcp_shard_is_named(tmp_path, debug):
    ckpt = tmp_path / "ckpt"
    shard = write_small_dist_checkpoint(ckpt)
    with open(shard, "r+b") as f:  # a copy cut short
        f.truncate(shard.stat().st_size - 1000)
    proc = megavrl("convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress",
                   debug=debug)
    last = assert_one_line_error(proc, "convert megatron-to-hf", debug, f"shard file '{shard}' is truncated",
                                 f"checkpoint '{ckpt}'")
    assert "EOFError" not in last


def test_damaged_checkpoints_are_named_before_loading(tmp_path):
    """What resume runs first (check_safe_to_load) names a truncated shard, a missing shard, a
    corrupt record and a truncated .metadata, instead of failing later with a bare EOFError."""
    from megavrl.checkpoint.dist_io import DistCheckpointReader, check_safe_to_load
    from megavrl.errors import UserError

    shard = write_small_dist_checkpoint(tmp_path / "a")
    check_safe_to_load(tmp_path / "a" / "dist")  # intact
    data = shard.read_bytes()

    shard.write_bytes(data[:-10])
    with pytest.raises(UserError, match=f"shard file '{shard}' is truncated"):
        check_safe_to_load(tmp_path / "a" / "dist")

    shard.unlink()
    with pytest.raises(UserError, match="shard file '__0_0.distcp' is missing"):
        check_safe_to_load(tmp_path / "a" / "dist")

    shard.write_bytes(b"\0" * 200 + data[200:])  # same size, damaged bytes
    with DistCheckpointReader(tmp_path / "a" / "dist") as reader:
        with pytest.raises(UserError, match=f"shard file '{shard}' holds a corrupt record for 'w'"):
            reader.read("w")

    metadata = tmp_path / "a" / "dist" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(UserError, match=f"checkpoint metadata '{metadata}' is truncated or corrupt"):
        check_safe_to_load(tmp_path / "a" / "dist")


# ------------------------------------------------------------------------------ config files


def test_unreadable_config_file_is_named(tmp_path, capsys, monkeypatch):
    """Through main() in this process: a PermissionError while reading --config (simulated: the
    tests may run as root, who reads any file)."""
    from megavrl.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  total_steps: 1\n")
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megavrl train: configuration error: config file '{config}' cannot be read: Permission denied"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a mode-000 file")
@pytest.mark.parametrize("debug", DEBUG_MODES)
def test_unreadable_config_file_through_the_command(tmp_path, debug):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  total_steps: 1\n")
    config.chmod(0)
    proc = megavrl("train", "--config", str(config), debug=debug)
    assert_one_line_error(proc, "train", debug, f"config file '{config}' cannot be read: Permission denied",
                          kind="configuration error")


@pytest.mark.parametrize("debug", DEBUG_MODES)
def test_missing_config_file_is_named(tmp_path, debug):
    proc = megavrl("train", "--config", str(tmp_path / "nope.yaml"), debug=debug)
    assert_one_line_error(proc, "train", debug, f"config file '{tmp_path / 'nope.yaml'}' does not exist",
                          kind="configuration error")


# ------------------------------------------------------------------------------ make-tiny-model


@pytest.mark.parametrize("debug", DEBUG_MODES)
def test_make_tiny_model_refuses_a_non_empty_out(tmp_path, debug):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = megavrl("make-tiny-model", "--out", str(out), debug=debug)
    assert_one_line_error(proc, "make-tiny-model", debug, f"'{out}'", "--force")
    assert (out / "notes.txt").read_text() == "keep me"


def test_make_tiny_model_files_follow_the_umask(tmp_path):
    from megavrl.checkpoint.tiny import make_tiny_model

    old = os.umask(0o022)
    try:
        out = make_tiny_model(tmp_path / "m", "tiny", seed=0)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left


def test_eval_report_files_follow_the_umask(tmp_path):
    from megavrl.eval.report import write_predictions_jsonl

    old = os.umask(0o022)
    try:
        path = write_predictions_jsonl(tmp_path / "predictions.jsonl", [{"id": "a"}])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]


# ------------------------------------------------------------------------------ videos


@pytest.mark.parametrize("debug", ["plain", "--debug"])
def test_one_frame_video_is_named(tmp_path, debug):
    from tests.data.conftest import write_video

    video = write_video(tmp_path / "one_frame.mp4", 64, 48, 10, 1)
    proc = megavrl("data", "inspect", "--video", video, debug=debug)
    assert_one_line_error(proc, "data inspect", debug, f"video '{video}'", "1 frame", code=1)


def test_one_frame_video_skip_reason_names_the_file(tmp_path):
    from megavrl.data.video import VideoError, VideoSampler
    from tests.data.conftest import write_video

    video = write_video(tmp_path / "one_frame.mp4", 64, 48, 10, 1)
    with pytest.raises(VideoError, match=f"video '{video}': the clip has 1 frame") as exc:
        VideoSampler()(video)
    assert exc.value.kind == "video_too_short"


# ------------------------------------------------------------------------------ real bugs


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    """Only bad input becomes one line: any other exception, and an OSError that is not about a
    path (a refused connection), propagates with its traceback."""
    import errno

    from megavrl.cli import main
    from megavrl.commands import model as commands

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "_make_tiny_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["make-tiny-model", "--out", "x"])

    def refused(args):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(commands, "_make_tiny_model", refused)
    with pytest.raises(ConnectionRefusedError):
        main(["make-tiny-model", "--out", "x"])

    def missing(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.jsonl")

    monkeypatch.setattr(commands, "_make_tiny_model", missing)
    assert main(["make-tiny-model", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("megavrl make-tiny-model: error: No such file or directory: "
                                               "'/data/train.jsonl'")
