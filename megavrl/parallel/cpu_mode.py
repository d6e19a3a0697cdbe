"""CPU (gloo) mode for Megatron-Core: the redirections that let it run without CUDA.

Megatron-Core 0.16 assumes a GPU in a handful of places that are otherwise device-agnostic: it
allocates buffers with ``device=torch.cuda.current_device()`` or ``device="cuda"``, keeps its
model-parallel RNG streams as CUDA generator states, and synchronises CUDA streams around
pipeline sends. On a machine without CUDA those calls raise ("Torch not compiled with CUDA").
``enable_cpu_mode()`` redirects each of them to the CPU, once per process, and logs one line.
It is what makes CPU mode a supported run mode (the test suite and the laptop demo use it); on a
machine with CUDA it is never called.

Each redirection, and why it is needed (measured with megatron-core 0.16.1, torch 2.13 CPU):

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron passes it as the
   ``device=`` of weight, rotary-frequency and communication buffers (tensor_parallel/layers.py,
   mappings.py, rotary_pos_embedding.py, p2p_communication.py).
2. ``Tensor.cuda()`` and ``Module.cuda()`` return ``self``: language_module.py moves tied
   embedding weights with ``.cuda()``; user code may call ``model.cuda()``.
3. Tensor factories (``torch.zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``tensor``,
   ``rand``, ``randn``, ``randint``, ``eye``) map ``device="cuda"`` (or a CUDA ``torch.device``)
   to the CPU: the pipeline schedules allocate ``torch.zeros([], device="cuda")`` and
   transformer/utils.py builds the default causal mask with ``device="cuda"``. The wrappers call
   the original functions, so ``with torch.device("meta")`` still applies to them (the cache of
   original constructors that this context uses is filled before the wrappers are installed).
4. CUDA RNG state get/set/seed (``torch.cuda.get_rng_state``, ``set_rng_state``,
   ``manual_seed``, ``manual_seed_all``, the same in ``torch.cuda.random``, and Megatron's own
   ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``) act on the CPU
   generator. Megatron's ``CudaRNGStatesTracker`` (used by ``model_parallel_cuda_manual_seed``,
   weight initialisation of TP-sharded layers and dropout in TP regions) then forks and restores
   the CPU generator exactly as it would the CUDA one, so TP ranks still draw different streams.
5. ``torch.cuda.synchronize()`` is a no-op and ``torch.cuda.current_stream()`` /
   ``default_stream()`` return a stream stand-in whose methods do nothing: there is no
   asynchronous device work to wait for on the CPU (p2p_communication.py synchronises after
   batched sends; parallel_state.py around barriers).
6. The optimizer's gradient clipping (``clip_grad_by_total_norm_fp32``, as bound in
   ``megatron.core.optimizer.optimizer``) asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``
   before scaling; the CPU version scales the same fp32 gradients in place without the assertion.

What stays the caller's job (see ``megavrl.models.qwen2_5_vl.config``): kernel fusions must be
off (``bias_activation_fusion``, ``masked_softmax_fusion``, ``bias_dropout_fusion``,
``gradient_accumulation_fusion``, ``persist_layer_norm``, ``apply_rope_fusion``), the local
(non-Transformer-Engine) layer spec must be used, and an explicit attention mask passed.
"""
from __future__ import annotations

import functools

from megavrl.log import get_logger

log = get_logger(__name__)

_ENABLED = False

_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint", "eye",
              "zeros_like", "ones_like", "empty_like", "full_like")


def is_cpu_mode() -> bool:
    """True once ``enable_cpu_mode()`` has run in this process."""
    return _ENABLED


class _NullStream:
    """Stands in for a CUDA stream on the CPU: every method is a no-op."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_cuda(device) -> bool:
    import torch

    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare int means a CUDA index


def _cpu_factory(fn):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        return fn(*args, **kwargs)

    wrapper.__megavrl_cpu_mode__ = True
    return wrapper


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-tensor assertion."""
    import torch
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters
             if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def enable_cpu_mode() -> None:
    """Apply the CPU redirections above to this process. Idempotent; refuses if CUDA is usable."""
    global _ENABLED
    if _ENABLED:
        return
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_mode() is for machines without CUDA; this one has a GPU, "
                           "use the NCCL backend instead")
    cpu = torch.device("cpu")

    # 1. current device
    torch.cuda.current_device = lambda: cpu
    # 2. .cuda() on tensors and modules
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    # 3. factories with device="cuda". torch's `with torch.device(...)` context recognises factory
    # calls by identity against a cached set of the original functions: build that cache now,
    # before the wrappers replace the module attributes (else meta-device model construction,
    # as transformers' from_pretrained does, silently stops working).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__megavrl_cpu_mode__", False):
            setattr(torch, name, _cpu_factory(fn))
    # 4. RNG: the CPU generator plays the CUDA generator
    for mod in (torch.cuda, torch.cuda.random):
        mod.get_rng_state = lambda device="cuda": torch.get_rng_state()
        mod.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
        mod.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        mod.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # 5. streams and synchronisation
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()

    # 6. gradient clipping
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu

    _ENABLED = True
    log.info("CPU mode: Megatron-Core CUDA calls redirected to the CPU (current_device, .cuda(), "
             "device='cuda' factories, RNG state, stream sync); see megavrl/parallel/cpu_mode.py")
