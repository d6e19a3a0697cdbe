"""Receiving side of the weight sync, run inside every vLLM worker process.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=WORKER_EXTENSION)``); the driver
calls its methods on all workers with ``llm.collective_rpc("megavrl_...", args=...)``. Every name
starts with ``megavrl_`` because vLLM refuses an extension attribute that the worker already has.

One update is a session: ``megavrl_begin_weight_update``, then ``megavrl_load_bucket`` (or
``megavrl_load_ipc_bucket``) once per bucket, then ``megavrl_finish_weight_update``. This is what
the worker's own ``reload_weights(weights_iterator=...)`` does in one call
(``vllm.model_executor.model_loader.reload``: initialize_layerwise_reload, model.load_weights,
finalize_layerwise_reload), split across calls so that the trainer can stream buckets. Calling
``reload_weights`` once per bucket would be wrong: its finalize step materialises a layer whose
checkpoint tensors are split over two buckets (q/k/v of one fused qkv_proj, say) from empty
memory and fills only the part in the current bucket, leaving the rest as garbage. Inside one
session the layer-wise loader buffers the pieces until the layer is complete, then runs the
backend's post-load processing (the CPU backend repacks linear weights, which is why loading
into ``model.load_weights`` without the session fails there) and copies the result into the
existing parameter storage, so CUDA graphs and the KV cache stay valid.
"""
from __future__ import annotations

import pickle

WORKER_EXTENSION = "megavrl.rollout.worker_extension.MegavrlWorkerExtension"


class MegavrlWorkerExtension:
    """Methods added to vLLM's worker; ``self`` is the worker (``model_runner``, ``vllm_config``)."""

    def megavrl_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_megavrl_loaded_names", None) is not None:
            raise RuntimeError("a weight update is already in progress; finish it first")
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._megavrl_loaded_names = set()

    def megavrl_load_bucket(self, path: str, names: list[str]) -> int:
        """Load the tensors ``names`` of the safetensors file ``path``; returns their count."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            weights = [(name, f.get_tensor(name)) for name in names]
        return self._megavrl_load(weights)

    def megavrl_load_ipc_bucket(self, handle: bytes, specs: list[tuple[str, str, list[int], int, int]]) -> int:
        """Load a bucket packed into one CUDA buffer shared by IPC.

        UNTESTED on the project's machines (no vLLM on a GPU there); kept small on purpose.
        handle: pickled ``{gpu_uuid: rebuild_cuda_tensor args}`` from ``reduce_tensor``.
        specs: (name, dtype name, shape, byte offset, byte count) per tensor.
        """
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        from megavrl.rollout.weight_sync import unpack_bucket

        handles = pickle.loads(handle)  # from the colocated trainer process of the same job
        device = self.device
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if uuid not in handles:
            raise RuntimeError(f"no CUDA IPC handle for this worker's GPU {uuid} (have {sorted(handles)}); "
                               "colocate the trainer on the same GPUs or use weight_sync_transport='shm'")
        args = list(handles[uuid])
        args[6] = device.index  # device index as this process numbers the same physical GPU
        buffer = rebuild_cuda_tensor(*args)
        count = self._megavrl_load(unpack_bucket(buffer, specs))
        torch.cuda.synchronize(device)  # the trainer may reuse its buffer once this returns
        return count

    def _megavrl_load(self, weights) -> int:
        from vllm.config import set_current_vllm_config

        if getattr(self, "_megavrl_loaded_names", None) is None:
            raise RuntimeError("megavrl_begin_weight_update was not called")
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(iter(weights))
        self._megavrl_loaded_names |= set(loaded or ())
        return len(weights)

    def megavrl_finish_weight_update(self) -> list[str]:
        """Process layers still buffered; return the vLLM parameters that received no tensor."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        loaded = getattr(self, "_megavrl_loaded_names", None)
        if loaded is None:
            raise RuntimeError("megavrl_finish_weight_update without megavrl_begin_weight_update")
        model = self.model_runner.get_model()
        try:
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(model, self.vllm_config.model_config)
                self._megavrl_reprocess_aliases(model, loaded)
        finally:
            self._megavrl_loaded_names = None
        if hasattr(self.model_runner, "reset_lora_state"):
            self.model_runner.reset_lora_state()
        return sorted({name for name, _ in model.named_parameters()} - loaded)

    def _megavrl_reprocess_aliases(self, model, loaded: set[str]) -> None:
        """Re-run post-load processing of modules that share a weight with a loaded one.

        A tied lm_head holds the embedding matrix under another module. The layer-wise loader
        processes only the module it loaded (embed_tokens), but vLLM's CPU backend packs a copy of
        the lm_head weight for its GEMM when processing lm_head, so without this the logits keep
        using the old embedding.
        """
        import torch

        params = dict(model.named_parameters())
        loaded_storage = {params[name].data_ptr() for name in loaded if name in params and params[name].numel()}
        for module_name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            weight = getattr(module, "weight", None)
            if (method is None or not isinstance(weight, torch.Tensor) or not weight.numel()
                    or f"{module_name}.weight" in loaded or weight.data_ptr() not in loaded_storage):
                continue
            method.process_weights_after_loading(module)

