"""A quiet console: what the user needs to read, not what libraries say every run on CPU.

Megatron-Core, vLLM and transformers print warnings that are expected on a CPU machine and say
nothing about the run: "Transformer Engine and Apex are not installed" (the local layer specs are
what megavrl builds on CPU), "Triton is not installed", "libtcmalloc is not found in LD_PRELOAD",
"FusedMMInputNorm: Failed to load weights" at every weight update (image mean/std and rotary
caches are buffers computed from the config, not weights: vLLM restores them), and vLLM's INFO
lines about its engine. By default these are filtered, and the job says so in one line;
``--verbose`` (or ``MEGAVRL_VERBOSE=1``) shows everything, vLLM's INFO lines included.

The filters must act in every process of a job: torchrun's workers run the ``megavrl`` command
again (and call :func:`quiet_console`), vLLM's engine processes are spawned from it and re-import
``megavrl.cli`` (which calls it too), and vLLM configures its own logging in each process from
``VLLM_LOGGING_LEVEL`` / ``VLLM_LOGGING_CONFIG_PATH``, which are set here and inherited.

Also here: :func:`fmt`, how megavrl prints a number (4 significant digits).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings

VERBOSE_ENV = "MEGAVRL_VERBOSE"
_NOTED_ENV = "MEGAVRL_QUIET_NOTED"  # the one-line note is printed by the first process only

# Python warnings (warnings.warn) that are expected on CPU: (message prefix, category).
EXPECTED_PY_WARNINGS = [
    ("Transformer Engine and Apex are not installed", UserWarning),  # Megatron: local kernels on CPU
    ("Apex is not installed", UserWarning),  # Megatron: torch's norm
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),  # a CUDA stream hint; no stream on CPU
    ("full scope is deprecated. Use empty cuda_graph_scope", UserWarning),  # Megatron's own default
    ("`torch.distributed.reduce_op` is deprecated", FutureWarning),  # inside vLLM's Triton shim
]

# Log records (vLLM, transformers) that are expected on CPU, matched on the formatted message.
EXPECTED_LOG_MESSAGES = [
    r"Triton is installed, but doesn't include CPU backend",
    r"Triton is not installed\. triton-cpu is expected",
    r"Model Runner V2 requires Triton",
    r"Enforce eager set, disabling torch\.compile",  # rollout.enforce_eager: the CPU default
    r"Inductor compilation was disabled by user settings",
    r"This model does not officially support disabling chunked prefill",  # megavrl disables it on purpose
    r"Reset SSM cache type to float32",
    r"is not found in LD_PRELOAD",  # libtcmalloc / libiomp: speed hints
    r"CPU backend doesn't allow to use `torch\.set_num_threads`",
    r"^\w+: Failed to load weights$",  # weight update: buffers computed from the config, restored by vLLM
    r"\[shutdown\] .*(force killing|still running after grace period)",  # vLLM's CPU workers at exit
    r"Qwen2VL video processing does not apply the per-frame pixel cap",  # megavrl hands vLLM resized frames
]
_EXPECTED = re.compile("|".join(f"(?:{p})" for p in EXPECTED_LOG_MESSAGES))


def verbose() -> bool:
    """True when ``--verbose`` was given (``MEGAVRL_VERBOSE`` set to anything but "", "0", "false", "no")."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_expected_noise(message: str) -> bool:
    """Whether a log message is one of :data:`EXPECTED_LOG_MESSAGES`."""
    return _EXPECTED.search(message) is not None


class ExpectedNoiseFilter(logging.Filter):
    """Drops the log records of :data:`EXPECTED_LOG_MESSAGES` (vLLM names it in its logging config)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return not is_expected_noise(message)


_FILTER = ExpectedNoiseFilter()


def quiet_console(note: bool = True) -> None:
    """Install the filters in this process and the environment its children inherit.

    note: print the one-line note before the first megavrl log line (once per job).
    Does nothing but raise vLLM's level to INFO under ``--verbose``.
    """
    if verbose():
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        return
    for prefix, category in EXPECTED_PY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    # Children that are not megavrl (torchrun's agent, a script): the same through PYTHONWARNINGS,
    # which matches a message prefix literally (a ':' would end the field, so none is used).
    entries = [f"ignore:{prefix}:{category.__name__}" for prefix, category in EXPECTED_PY_WARNINGS
               if ":" not in prefix]
    existing = os.environ.get("PYTHONWARNINGS", "")
    os.environ["PYTHONWARNINGS"] = ",".join([e for e in existing.split(",") if e] +
                                            [e for e in entries if e not in existing])
    if _FILTER not in logging.lastResort.filters:  # records logged before a library set up its handler
        logging.lastResort.addFilter(_FILTER)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = _vllm_logging_config()
    global _note_pending
    _note_pending = note and os.environ.get("RANK", "0") == "0"


_note_pending = False
NOTE = "library warnings that are expected on CPU and vLLM's INFO lines are hidden (--verbose shows them)"


class NoteBeforeFirstRecord(logging.Filter):
    """On megavrl's console handler: the note of :func:`quiet_console` goes out just before the
    first megavrl log line of the job, so a command that fails at once still prints one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        global _note_pending
        if _note_pending and os.environ.get(_NOTED_ENV) != "1":
            os.environ[_NOTED_ENV] = "1"  # inherited: torchrun's workers do not repeat it
            print(f"megavrl: {NOTE}", file=sys.stderr, flush=True)
        _note_pending = False
        return True


def filter_library_handlers() -> None:
    """Add the filter to the handlers transformers and vLLM have installed in this process (call it
    after they are imported, before the noisy part: starting the rollout engine)."""
    if verbose():
        return
    for name in ("transformers", "vllm"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


class VllmLineFormatter(logging.Formatter):
    """vLLM's line format without depending on its formatter class (which moves between versions):
    the fields vLLM's record factory adds are filled in when missing; continuation lines are indented
    under the prefix as vLLM does."""

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "vllm_process_name"):
            record.vllm_process_name = record.processName
        if not hasattr(record, "fileinfo"):
            record.fileinfo = record.filename
        text = super().format(record)
        if record.message and "\n" in record.message:
            prefix = text.split(record.message, 1)[0]
            text = text.replace("\n", "\n" + " " * len(prefix))
        return text


def _vllm_logging_config() -> str:
    """A file for VLLM_LOGGING_CONFIG_PATH: vLLM's own default configuration (format, stream,
    level) plus :class:`ExpectedNoiseFilter` on its handler; its path is inherited by every process."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
    fmt = (os.environ.get("VLLM_LOGGING_PREFIX", "") +
           "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s")
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"megavrl_expected": {"()": "megavrl.console.ExpectedNoiseFilter"}},
        "formatters": {"vllm": {"()": "megavrl.console.VllmLineFormatter", "datefmt": "%m-%d %H:%M:%S",
                                "fmt": fmt}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                              "filters": ["megavrl_expected"],
                              "stream": os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stdout")}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }
    text = json.dumps(config, sort_keys=True)
    # One file per distinct configuration, reused by later runs (no debris in the temp directory).
    path = os.path.join(tempfile.gettempdir(), f"megavrl-vllm-logging-{hashlib.sha1(text.encode()).hexdigest()[:12]}.json")
    if not os.path.isfile(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


def fmt(value, digits: int = 4) -> str:
    """A number as people read it: 4 significant digits (``33.33``, ``0.5971``, ``1.2e-05``),
    integers and integral floats without decimals (``16``), None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.{digits}g}"


def rounded(values: dict, digits: int = 4) -> dict:
    """``values`` with its floats cut to ``digits`` significant digits, for a printed JSON line."""
    return {k: float(f"{v:.{digits}g}") if isinstance(v, float) and math.isfinite(v) else v
            for k, v in values.items()}
