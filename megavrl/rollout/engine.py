"""The rollout engine: vLLM's offline ``LLM`` sampling GRPO groups, with in-place weight updates.

One ``generate`` call takes a whole step's prompts and returns n responses per prompt, each with
the sampling log-probabilities the policy loss needs, and the prompt tokens exactly as vLLM ran
them. ``update_weights`` streams the trainer's new weights in (see ``weight_sync``).

Placement on GPU: colocated with the trainer, vLLM sleeps while Megatron trains and wakes for the
rollout (``RolloutConfig(enable_sleep_mode=True)``). A step then reads:

    engine.wake_up(["weights"])        # weights back on the GPU, KV cache still released
    engine.update_weights(exported)    # stream the new weights in
    engine.wake_up(["kv_cache"])       # now the KV cache
    groups = engine.generate(prompts)
    engine.sleep()                     # level 1: weights to CPU, KV cache dropped; level 2: both dropped

vLLM's CPU backend has no sleep mode (``Platform.is_sleep_mode_available`` is False and
``enable_sleep_mode=True`` is rejected at start-up), so on CPU ``sleep`` and ``wake_up`` only log
a line and the engine keeps its memory.

Run vLLM from a script with an ``if __name__ == "__main__":`` guard: its workers are spawned
processes that re-import the main module.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from megavrl.log import get_logger
from megavrl.rollout.config import SAMPLING_FIELDS, RolloutConfig
from megavrl.rollout.inputs import RolloutPrompt, as_rollout_prompt, to_vllm_prompt
from megavrl.rollout.outputs import RolloutGroup, group_from_request_output
from megavrl.rollout.weight_sync import SyncStats, push_weights
from megavrl.rollout.worker_extension import WORKER_EXTENSION

log = get_logger(__name__)


def cpu_core_share(local_rank: int | None = None, local_world_size: int | None = None,
                   cpus: list[int] | None = None) -> str | None:
    """The CPU cores an engine started by local rank ``local_rank`` of ``local_world_size`` processes
    on this node should run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` list ("2,3"): an even share
    of the cores this process may use. None for a process alone on its node (vLLM's own choice).

    vLLM's automatic binding (``auto``) picks the cores of the first NUMA node for local rank 0 of its
    own world, so every engine of a node (one per data-parallel replica, each in its own process)
    would bind its threads to the same cores and the engines would run one at a time."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    if local_world_size <= 1:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    per = max(1, len(cpus) // local_world_size)
    start = (local_rank * per) % len(cpus)
    return ",".join(str(c) for c in cpus[start:start + per])


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class RolloutEngine:
    """vLLM's offline engine started from a Hugging Face directory, sampling GRPO groups.

    Build it inside ``if __name__ == "__main__":`` (vLLM spawns workers). Use as a context
    manager, or call ``shutdown()``, to stop the worker processes.
    """

    def __init__(self, model_dir: str | os.PathLike, config: RolloutConfig | None = None):
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.config = config = config or RolloutConfig()
        self.on_cpu = _on_cpu()
        self.sleep_supported = not self.on_cpu
        self._updates_logged = False
        self.asleep = False
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype=config.dtype,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enforce_eager=self.on_cpu if config.enforce_eager is None else config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            logprobs_mode=config.vllm_logprobs_mode(),
            max_logprobs=0,  # only the sampled token's log-probability is ever requested
            limit_mm_per_prompt={"video": config.max_videos_per_prompt, "image": config.max_images_per_prompt},
            worker_extension_cls=WORKER_EXTENSION,
        )
        kv_mb = config.kv_cache_memory_mb if config.kv_cache_memory_mb is not None else (
            config.cpu_kv_cache_mb if self.on_cpu else None)
        if kv_mb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_mb * 2**20)
        if config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = config.max_num_seqs
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if self.on_cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split over steps: it rewinds the request's generator, which CPU generators
            # cannot do. Without chunked prefill, with a token budget that holds any prompt, no
            # prefill is split.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(kwargs.get("max_num_batched_tokens") or 0, config.max_model_len)
        if config.enable_sleep_mode:
            if self.sleep_supported:
                kwargs["enable_sleep_mode"] = True
            else:
                log.info("sleep mode is not available on vLLM's CPU backend: starting without it; "
                         "sleep() and wake_up() will do nothing")
        from megavrl.console import filter_library_handlers, verbose

        kwargs["use_tqdm_on_load"] = verbose()  # the weights of a local directory load in a blink
        kwargs.update(config.engine_kwargs)
        filter_library_handlers()  # transformers' processor warnings while the engine starts
        start = time.perf_counter()
        # vLLM's engine and worker processes are spawned inside LLM() and inherit this environment.
        no_dynamo = self.on_cpu and not config.cpu_compile_sampler
        saved = os.environ.get("TORCHDYNAMO_DISABLE")
        if no_dynamo:
            os.environ["TORCHDYNAMO_DISABLE"] = "1"
        cores = cpu_core_share() if self.on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ else None
        if cores:  # vLLM's automatic binding puts every engine of a node on the same cores
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
            log.info("vLLM CPU threads bound to cores %s (this process's share of the node)", cores)
        try:
            self.llm = LLM(**kwargs)
        finally:
            if cores:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            if no_dynamo:
                if saved is None:
                    os.environ.pop("TORCHDYNAMO_DISABLE", None)
                else:
                    os.environ["TORCHDYNAMO_DISABLE"] = saved
        hf_config = self.llm.llm_engine.model_config.hf_config
        text_config = getattr(hf_config, "text_config", hf_config)
        self.tied_embeddings = bool(getattr(text_config, "tie_word_embeddings", False)
                                    or getattr(hf_config, "tie_word_embeddings", False))
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self._video_token_id = getattr(hf_config, "video_token_id", None)
        self._image_token_id = getattr(hf_config, "image_token_id", None)
        vision = getattr(hf_config, "vision_config", None)
        self.pixel_multiple = (None if config.resize_in_vllm or vision is None
                               else vision.patch_size * vision.spatial_merge_size)
        self._mm_kwargs = {**({} if config.resize_in_vllm else {"do_resize": False}), **config.mm_processor_kwargs}
        log.info("vLLM rollout engine up in %.1f s: %s, %s, tp=%d, %s", time.perf_counter() - start,
                 Path(self.model_dir).name, str(self.dtype).removeprefix("torch."), config.tensor_parallel_size,
                 "CPU" if self.on_cpu else "GPU")

    # ---- sampling -------------------------------------------------------------------------------

    def sampling_params(self, seed: int | None = None, **overrides):
        """vLLM ``SamplingParams`` from the config, with fields of ``RolloutConfig`` overridden.

        seed: this request's own random seed; None draws from the engine's generator (seeded by
        ``config.seed`` at start-up).
        """
        from vllm import SamplingParams

        unknown = set(overrides) - set(SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"cannot override {sorted(unknown)} per call; sampling fields are "
                             f"{('seed',) + SAMPLING_FIELDS}")
        c = dataclasses.replace(self.config, **{k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(n=c.n, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              max_tokens=c.max_new_tokens, logprobs=0 if c.logprobs else None,
                              ignore_eos=c.ignore_eos, stop=list(c.stop) or None,
                              stop_token_ids=list(c.stop_token_ids) or None, seed=seed)

    def generate(self, prompts: Sequence[RolloutPrompt | str | Mapping[str, Any]], *,
                 seed: int | Sequence[int] | None = None,
                 use_tqdm: bool = False, **overrides) -> list[RolloutGroup]:
        """Sample ``n`` responses for every prompt in one vLLM call; one ``RolloutGroup`` per prompt.

        prompts: ``RolloutPrompt`` (text or token ids, with ``VideoInput`` / image items), a plain
            text prompt, a dict of ``RolloutPrompt`` fields, or a vLLM prompt dict
            ``{"prompt" | "prompt_token_ids", "multi_modal_data": {"video": [(frames, metadata)]},
            "mm_processor_kwargs"}`` as ``megavrl.rollout.inputs.vllm_prompt`` returns it.
        overrides: sampling fields of ``RolloutConfig`` for this call (n, temperature, top_p, top_k,
            max_new_tokens, ignore_eos, stop, stop_token_ids, logprobs), e.g. greedy evaluation
            with ``n=1, temperature=0``. ``max_new_tokens`` may also be one budget per prompt
            (e.g. each task its own).
        seed: makes this call reproducible on its own: prompt i samples with seed ``seed + i`` (so
            two copies of a prompt still get different responses), or with ``seed[i]`` given one
            seed per prompt (a prompt then samples the same whatever else is in the call, up to
            the numerics of batching). None: the engine's generator, reproducible only for the
            same sequence of calls since start-up.
        """
        if self.asleep and self.sleep_supported:
            raise RuntimeError("the rollout engine is asleep: call wake_up() before generate()")
        items = [as_rollout_prompt(p) for p in prompts]
        if not items:
            return []
        vllm_prompts = [to_vllm_prompt(p, i, pixel_multiple=self.pixel_multiple, mm_processor_kwargs=self._mm_kwargs,
                                       video_token_id=self._video_token_id, image_token_id=self._image_token_id)
                        for i, p in enumerate(items)]
        budgets = overrides.get("max_new_tokens")
        per_prompt = [{}] * len(items)
        if isinstance(budgets, Sequence):
            if len(budgets) != len(items):
                raise ValueError(f"{len(budgets)} max_new_tokens for {len(items)} prompts")
            per_prompt = [{"max_new_tokens": int(b)} for b in budgets]
        if seed is None and not isinstance(budgets, Sequence):
            params = self.sampling_params(**overrides)
        else:
            if seed is None:
                seeds = [None] * len(items)
            elif isinstance(seed, int):
                seeds = [seed + i for i in range(len(items))]
            else:
                seeds = [int(x) for x in seed]
            if len(seeds) != len(items):
                raise ValueError(f"{len(seeds)} seeds for {len(items)} prompts")
            params = [self.sampling_params(seed=s, **{**overrides, **own}) for s, own in zip(seeds, per_prompt)]
        outputs = self.llm.generate(vllm_prompts, params, use_tqdm=use_tqdm)
        with_logprobs = (params[0] if isinstance(params, list) else params).logprobs is not None
        return [group_from_request_output(out, i, item, with_logprobs)
                for i, (out, item) in enumerate(zip(outputs, items))]

    # ---- weights --------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       bucket_mb: float | None = None, rpc_guard=None) -> SyncStats:
        """Load full HF-named tensors into vLLM in place, bucket by bucket.

        named_tensors: ``(hf_name, tensor)`` pairs in a Qwen2.5-VL checkpoint layout, any dtype
            (cast to the engine's), on CPU or GPU. A subset is fine (a frozen vision tower need not
            be sent); ``SyncStats.params_not_updated`` lists vLLM parameters no tensor reached.
        bucket_mb: bucket size in MB (2**20 bytes); defaults to ``config.weight_sync_bucket_mb``.
        rpc_guard: entered around each call into the engine (see :func:`push_weights`).
        Afterwards the prefix cache and the encoder cache are reset: both hold results of the old
        weights (the KV of shared prompt prefixes, the vision tower's video embeddings).
        """
        if self.asleep and self.sleep_supported:
            log.info("updating weights while asleep: call wake_up(['weights']) first, unless the weights "
                     "were kept (sleep level 1 keeps a CPU copy, but new weights need GPU memory)")
        mb = bucket_mb if bucket_mb is not None else self.config.weight_sync_bucket_mb
        stats = push_weights(self.llm, named_tensors, bucket_bytes=int(mb * 2**20), dtype=self.dtype,
                             tied_embeddings=self.tied_embeddings, transport=self.config.weight_sync_transport,
                             shm_dir=self.config.weight_sync_shm_dir, rpc_guard=rpc_guard)
        with (rpc_guard or nullcontext)():
            self.reset_caches()
        if stats.params_not_updated:
            log.info("weight update left %d vLLM parameters unchanged (e.g. %s)", len(stats.params_not_updated),
                     ", ".join(stats.params_not_updated[:3]))
        # The first update is described; the later ones are in the step's scalars (weight_sync/*).
        log.log(logging.DEBUG if self._updates_logged else logging.INFO,
                "weights updated: %d tensors, %.1f MB in %d buckets over %s, %.2f s (%.0f MB/s)", stats.num_tensors,
                stats.bytes_moved / 1e6, stats.num_buckets, stats.transport, stats.seconds, stats.mb_per_s)
        self._updates_logged = True
        return stats

    def reset_caches(self) -> None:
        """Forget everything computed with the current weights: prefix KV cache and vision embeddings."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self.llm.llm_engine.reset_encoder_cache()

    # ---- placement ------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release vLLM's memory for training (level 1: weights to CPU RAM, KV cache dropped;
        level 2: both dropped, for when new weights will be pushed anyway). No-op on CPU."""
        if not self.sleep_supported:
            log.info("sleep(): vLLM's CPU backend has no sleep mode; keeping weights and KV cache")
            return
        if not self.config.enable_sleep_mode:
            raise RuntimeError("sleep() needs RolloutConfig(enable_sleep_mode=True)")
        self.llm.sleep(level=self.config.sleep_level)
        self.asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring memory back: ``["weights"]`` then (after ``update_weights``) ``["kv_cache"]``;
        None wakes both, weights first. No-op on CPU."""
        if not self.sleep_supported:
            log.info("wake_up(): vLLM's CPU backend has no sleep mode; nothing to do")
            return
        groups = [list(tags)] if tags is not None else [["weights"], ["kv_cache"]]
        for group in groups:
            fully_awake = self.llm.wake_up(tags=group)
        self.asleep = not fully_awake

    # ---- life cycle -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop vLLM's engine and worker processes."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
