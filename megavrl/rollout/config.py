"""The ``rollout`` section of the config: how the rollout engine is started and samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# The fields of RolloutConfig that a RolloutEngine.generate call may override.
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "ignore_eos", "stop",
                   "stop_token_ids", "logprobs")


@dataclass
class RolloutConfig:
    """Everything the rollout engine is started and samples with.

    Sampling: ``n`` responses per prompt of at most ``max_new_tokens`` tokens each.
    ``logprobs`` returns the log-probability of every sampled token under the distribution the
    trainer recomputes: log_softmax(logits / temperature). ``logprobs_mode`` "auto" (default) asks
    vLLM for that: its ``raw_logprobs`` (log_softmax of the raw logits) at temperature 1 or 0, its
    ``processed_logprobs`` (after the temperature; and after top-p/top-k, which the trainer does
    not apply) at any other temperature.
    Engines: ``engines`` rollout engines in the training job: "auto" (one per data-parallel replica)
    or a number that divides the data-parallel size ("1": one engine on global rank 0); see
    :mod:`megavrl.rl.placement`. ``megavrl eval`` / ``select`` start that many engine processes
    ("auto": one). ``tensor_parallel_size`` is vLLM's own, independent of Megatron's.
    ``gpu_memory_utilization`` is the GPU memory fraction vLLM may take (weights + KV cache).
    ``kv_cache_memory_mb`` sizes the KV cache explicitly; on CPU it defaults to
    ``cpu_kv_cache_mb``, because there vLLM reads ``gpu_memory_utilization`` as a fraction of all
    RAM that must be free at start-up, which fails on a shared machine.
    ``enforce_eager`` None: eager on CPU (torch.compile would take minutes), compiled on GPU.
    ``cpu_compile_sampler`` False: on CPU, start vLLM's processes with TorchDynamo disabled. Even
    eager, vLLM's sampler torch.compiles (inductor, C++) the rank count of the sampled token's
    log-probability on the first request with logprobs, which costs 25-40 s on a 2-core machine
    and gains nothing at tiny sizes.
    ``resize_in_vllm`` False: frames and images arrive already resized by the data pipeline (sides
    multiples of patch_size * merge_size) and vLLM is told not to resize them, so vLLM and the
    trainer see the same pixels.
    ``weight_sync_bucket_mb``: bucket size of ``update_weights``; ``weight_sync_transport``:
    "auto" (CUDA IPC for GPU tensors, /dev/shm files otherwise), "shm" or "cuda_ipc".
    """

    # sampling
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512
    logprobs: bool = True
    logprobs_mode: str = "auto"
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    # engine
    engines: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_mb: int | None = None
    cpu_kv_cache_mb: int = 512
    max_model_len: int = 8192
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    cpu_compile_sampler: bool = False
    max_videos_per_prompt: int = 1
    max_images_per_prompt: int = 1
    resize_in_vllm: bool = False
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # placement
    enable_sleep_mode: bool = False
    sleep_level: int = 1
    # weight sync
    weight_sync_bucket_mb: float = 512
    weight_sync_transport: str = "auto"
    weight_sync_shm_dir: str = "/dev/shm"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM as they are

    def __post_init__(self) -> None:
        self.engines = str(self.engines).strip().lower()
        if self.engines != "auto" and not (self.engines.isdigit() and int(self.engines) >= 1):
            raise ValueError(f"rollout.engines={self.engines!r} must be 'auto' or a positive number of engines")
        if self.n < 1:
            raise ValueError(f"n={self.n}: need at least one response per prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.logprobs_mode not in ("auto", "raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode={self.logprobs_mode!r}: use 'auto' (the trainer's distribution at "
                             "this temperature), 'raw_logprobs' (temperature 1) or 'processed_logprobs'")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={self.sleep_level}: 1 keeps weights in CPU memory, 2 drops them")
        if self.weight_sync_bucket_mb <= 0:
            raise ValueError(f"weight_sync_bucket_mb={self.weight_sync_bucket_mb} must be > 0")
        if self.weight_sync_transport not in ("auto", "shm", "cuda_ipc"):
            raise ValueError(f"weight_sync_transport={self.weight_sync_transport!r}: use auto, shm or cuda_ipc")

    @property
    def scoring_temperature(self) -> float:
        """The temperature GRPO scores responses at: the sampling one (1 for greedy, temperature 0)."""
        return self.temperature if self.temperature > 0 else 1.0

    def vllm_logprobs_mode(self) -> str:
        """vLLM's ``logprobs_mode`` for this config ("auto" resolved, see the class docstring)."""
        if self.logprobs_mode != "auto":
            return self.logprobs_mode
        return "raw_logprobs" if self.scoring_temperature == 1.0 else "processed_logprobs"

    def sampling(self) -> dict[str, Any]:
        """This config's sampling fields, as ``RolloutEngine.generate`` overrides: sample as it says
        with an engine started from another config."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}
