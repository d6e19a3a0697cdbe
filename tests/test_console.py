"""The quiet console (megavrl/console.py) and the command line a newcomer types (issue 21)."""
import json
import logging
import logging.config
import os
import subprocess
import sys
import warnings

import pytest

from megavrl import console
from megavrl.cli import build_parser, parse_args
from megavrl.config import ConfigError, load_config


@pytest.mark.parametrize("message", [
    "FusedMMInputNorm: Failed to load weights",
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "libtcmalloc is not found in LD_PRELOAD. For best performance, please follow ...",
    "Model Runner V2 requires Triton; using the V1 model runner instead.",
])
def test_expected_cpu_messages_are_hidden(message):
    assert console.is_expected_noise(message)
    assert not console.ExpectedNoiseFilter().filter(logging.LogRecord("vllm.x", logging.WARNING, "", 0, message, (), None))


@pytest.mark.parametrize("message", [
    "Failed to load weights for layer model.layers.0",  # not the known buffer-only case
    "CUDA out of memory",
    "step 3: no response of this step had a parsable answer",
])
def test_other_messages_are_kept(message):
    assert not console.is_expected_noise(message)


def test_python_warnings_filtered_unless_verbose(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    for key in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH", "PYTHONWARNINGS"):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_console(note=False)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    config = json.loads(open(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read())
    assert config["handlers"]["vllm"]["filters"] == ["megavrl_expected"]
    # What vLLM does with the file in each of its processes: a filtered handler on "vllm".
    vllm_logger = logging.getLogger("vllm")
    saved = (vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate)
    try:
        logging.config.dictConfig({**config, "formatters": {"vllm": {"format": "%(message)s"}}})
        handler = vllm_logger.handlers[0]
        assert not handler.filter(logging.LogRecord("vllm.w", logging.WARNING, "", 0,
                                                    "RotaryEmbedding: Failed to load weights", (), None))
        assert handler.filter(logging.LogRecord("vllm.w", logging.WARNING, "", 0, "engine died", (), None))
    finally:
        vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate = saved
    assert "ignore:Apex is not installed:UserWarning" in os.environ["PYTHONWARNINGS"].split(",")  # for children


def test_verbose_leaves_everything_and_raises_vllm_to_info(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    console.quiet_console(note=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and "VLLM_LOGGING_CONFIG_PATH" not in os.environ


@pytest.mark.parametrize("value, text", [(33.333333333333336, "33.33"), (0.5971225339999364, "0.5971"),
                                         (16.0, "16"), (3, "3"), (None, "-"), (1.2345e-5, "1.234e-05")])
def test_fmt_four_significant_digits(value, text):
    assert console.fmt(value) == text


@pytest.mark.parametrize("argv", [
    ["eval", "--config", "c.yaml", "model.hf_dir=X", "--out", "D", "eval.max_samples=2"],
    ["eval", "model.hf_dir=X", "--config", "c.yaml", "--out", "D", "eval.max_samples=2"],
    ["eval", "--config", "c.yaml", "--out", "D", "model.hf_dir=X", "eval.max_samples=2"],
])
def test_overrides_before_between_or_after_options(argv):
    args = parse_args(build_parser(), argv)
    assert args.config == ["c.yaml"] and args.out == "D"
    assert args.overrides == ["model.hf_dir=X", "eval.max_samples=2"]


def test_flags_after_the_command_and_unknown_options_name_the_subcommand(capsys):
    parser = build_parser()
    args = parse_args(parser, ["train", "--config", "c.yaml", "trainer.total_steps=1", "--verbose", "--debug"])
    assert args.verbose and args.debug and args.overrides == ["trainer.total_steps=1"]
    with pytest.raises(SystemExit):
        parse_args(parser, ["select", "--config", "c.yaml", "--bogus"])
    assert "megavrl select: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_field_at_the_top_level_names_its_section():
    with pytest.raises(ConfigError, match=r"unknown config field 'train'.*Did you mean 'data\.train'"):
        load_config([], ["train=[]"])
    with pytest.raises(ConfigError, match=r"'trainer\.seed'") as e:
        load_config([], ["seed=3"])
    assert "'data.seed'" in str(e.value)  # every section that has the field


def test_missing_path_is_one_line_at_once(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megavrl.cli", "convert", "megatron-to-hf", "--ckpt",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=300)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, lines
    assert lines[0] == f"megavrl convert megatron-to-hf: error: --ckpt {str(tmp_path / 'nope')!r} does not exist"
