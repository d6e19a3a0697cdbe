"""``megavrl train``: GRPO (or SFT) of Qwen2.5-VL on Megatron-Core with vLLM rollouts.

Placement (:mod:`megavrl.rl.placement`): every process holds its TP/PP shard of the actor (and of
the frozen reference). ``rollout.engines`` vLLM engines (default one per data-parallel replica)
each live on the first rank of their replica, with that engine's shard of the data stream. Each
step, every engine host takes its share of the step's prompts, rolls them out, scores them and
turns them into training sequences, which go to the ranks of its own replicas only; the metrics
are reduced over the engines; every data-parallel rank trains on its share with normalisers over
the whole step; the updated weights stream from each replica into its own engine (PP broadcast +
TP gather into full HF tensors, bucketed). One step:

    prompts -> rollout (n per prompt) -> rewards -> zero-variance filter -> advantages
      -> old / reference log-probs -> ppo_epochs x mini_batches of forward-backward + optimizer step
      -> weight sync -> metrics -> checkpoint / eval when due
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from megavrl.config_base import dump_yaml, to_dict
from megavrl.log import get_logger
from megavrl.parallel.collectives import all_gather_object, broadcast_object, global_rank
from megavrl.rl.batch import TrainSequence, padded_length
from megavrl.rl.learning_signal import LearningSignalCheck
from megavrl.rl.micro_batches import MicroBatching, micro_batch_metrics, rank_micro_batches

log = get_logger(__name__)


# --------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch and Megatron's model-parallel RNG streams, from one seed."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PhaseTimer:
    """Seconds spent per phase of a step (``time/<phase>`` metrics)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict:
        return {f"time/{k}": v for k, v in self.seconds.items()}


_FILLER = TrainSequence(input_ids=[0, 0], prompt_len=1, info={"padding": True})


def _outcome(experience):
    """What every rank learns of an engine host's experience: its metrics share (EngineShare), None
    (abandoned on a stop signal) or the failure."""
    if experience is None or isinstance(experience, _Rank0Failure):
        return experience
    return experience[1]


class NonFiniteStop(RuntimeError):
    """The run stopped after trainer.max_consecutive_nonfinite skipped steps (a checkpoint was saved)."""


@dataclass
class _Rank0Failure:
    """Broadcast by rank 0 instead of a batch when preparing it failed."""
    message: str
    error: BaseException | None = None

    def __getstate__(self):  # the exception itself stays on rank 0
        return {"message": self.message, "error": None}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run of a :class:`megavrl.config.Config`. ``engine``: an already started RolloutEngine to reuse (rank 0; tools and
    tests running several trainings in one process); its weights are replaced by the actor's."""

    def __init__(self, cfg, engine=None):
        from megavrl.checkpoint.manager import CheckpointManager
        from megavrl.parallel.config import validate_parallel
        from megavrl.parallel.distributed import init_distributed
        from megavrl.rl.actor import MegatronActor
        from megavrl.run_metrics import MetricsWriter

        self.cfg = cfg
        backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
        self.layout = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.trainer.seed, backend=backend)
        validate_parallel(cfg.parallel, world_size=self.layout.world_size)  # the rest: once, by the command
        self.grpo = cfg.algorithm.name == "grpo"
        # The recipe, chosen once: GRPO samples, scores and trains on its own responses; SFT trains on
        # the reference answers and needs the engine only to evaluate.
        self._experience_of_step = self._grpo_experience if self.grpo else self._sft_experience
        self._loss_fn = self._grpo_loss if self.grpo else self._sft_loss
        self.needs_engine = self.grpo or bool(cfg.data.val)
        self.signal_check = LearningSignalCheck(cfg.model.megatron_ckpt or cfg.model.hf_dir)
        out = Path(cfg.trainer.output_dir)
        self.output_dir = out
        self.ckpt_dir = Path(cfg.checkpoint.dir or out / "checkpoints")
        self.tb_dir = Path(cfg.logging.tensorboard_dir or out / "tensorboard")
        if global_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_yaml(cfg))
        t0 = time.perf_counter()
        convention = cfg.data.prompt.rope_convention
        # GRPO scores responses under the distribution vLLM sampled them from; SFT's cross-entropy at 1.
        temperature = cfg.rollout.scoring_temperature if self.grpo else 1.0
        common = dict(dtype=cfg.model.dtype, rope_convention=convention, temperature=temperature)
        self.actor = MegatronActor(
            cfg.model.hf_dir, cfg.parallel.tp, cfg.parallel.pp, trainable=True,
            freeze_vision=cfg.model.freeze_vision, freeze_projector=cfg.model.freeze_projector,
            recompute=cfg.model.recompute_activations, optimizer_config=cfg.optimizer,
            total_steps=cfg.trainer.total_steps, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            megatron_ckpt=cfg.model.megatron_ckpt, **common)
        self.ref = None
        if self.grpo and cfg.algorithm.kl_coef > 0:
            self.ref = MegatronActor(cfg.model.hf_dir, cfg.parallel.tp, cfg.parallel.pp, trainable=False,
                                     megatron_ckpt=cfg.model.megatron_ckpt, **common)
        log.info("Megatron actor%s built in %.1f s", " and reference" if self.ref else "", time.perf_counter() - t0)

        self.tokenizer = self._tokenizer()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.placement = self._place_engines()
        self.dataset = self.data_iter = None
        self.engine = engine if self.placement.hosts_engine else None
        self._owns_engine = engine is None
        if self.placement.hosts_engine:
            self._build_engine_host()
        self.ckpt = CheckpointManager(self.ckpt_dir, keep_last=cfg.checkpoint.keep_last)
        self._preemption = None  # the stop-signal handler while run() runs
        self.last_checkpoint: Path | None = None
        if global_rank() == 0:
            self.ckpt.remove_stale()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        # Seeded after everything is built (starting vLLM or building models draws random numbers),
        # so the training stream depends only on the seed, or on the checkpoint when resuming.
        seed_everything(cfg.trainer.seed)
        # An engine is given to each rank that holds one; every rank learns whether rank 0 was, and
        # every rank refuses when any given engine's log-probs are of another distribution (none
        # waits forever for a rank that raised alone).
        refusal = None
        if engine is not None and engine.config.vllm_logprobs_mode() != cfg.rollout.vllm_logprobs_mode():
            refusal = (f"the rollout engine given to rank {global_rank()} returns {engine.config.vllm_logprobs_mode()}, "
                       f"this run needs {cfg.rollout.vllm_logprobs_mode()} (rollout.temperature="
                       f"{cfg.rollout.temperature}): start one with this run's rollout config")
        refusals = [r for r in all_gather_object(refusal) if r]
        if refusals:
            raise ValueError(refusals[0])
        reused_engine = broadcast_object(engine is not None)
        resumed = self._resume()
        if not resumed and (reused_engine or cfg.model.megatron_ckpt):
            self.sync_weights()  # the engine holds other weights than the actor starts from
        self.resumed = resumed
        # A finished run started again (a requeue after the last step, a command run twice): nothing
        # to train, and nothing of its outputs (metrics, export, evaluation) is touched.
        self.already_complete = resumed and self.step >= cfg.trainer.total_steps and \
            broadcast_object(self._previous_status() if global_rank() == 0 else None) == "completed"
        self.metrics = MetricsWriter(self.tb_dir, console_every=cfg.logging.log_every,
                                     enabled=False if self.already_complete else None,
                                     resume_step=self.step if resumed else None, console_keys=[
            "reward/total", "reward/std", "reward/parse_fail_rate", "loss", "kl_loss", "entropy", "clip_fraction", "grad_norm",
            "token_mult_prob_error", "response_len/mean", "time/step", "throughput/tokens_per_s"])

    # ------------------------------------------------------------------ construction
    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.cfg.model.hf_dir)

    def _place_engines(self):
        """One engine per data-parallel replica, or ``rollout.engines`` of them (one when no engine
        is needed: SFT without evaluation); refuse a step that does not split over them."""
        from megavrl.config_base import ConfigError
        from megavrl.rl.placement import place_engines

        placement = place_engines(self.cfg.rollout.engines if self.needs_engine else 1)
        prompts = self.cfg.trainer.prompts_per_step
        if prompts % placement.engines:
            raise ConfigError(f"trainer.prompts_per_step={prompts} does not split over {placement.engines} rollout "
                              f"engines (rollout.engines={self.cfg.rollout.engines!r}): make it a multiple of "
                              f"{placement.engines}, or set rollout.engines to a divisor of it")
        if placement.engines > 1 and global_rank() == 0:
            log.info("%d rollout engines, one per %d data-parallel replica(s), on global ranks %s",
                     placement.engines, placement.replicas_per_engine, placement.host_ranks)
        return placement

    def _build_engine_host(self) -> None:
        from megavrl.data.datasets import VideoTaskDataset
        from megavrl.data.prompt import PromptBuilder

        cfg = self.cfg
        self.builder = PromptBuilder.from_hf_dir(cfg.model.hf_dir, cfg.data.prompt)
        self.dataset = VideoTaskDataset(cfg.data, builder=self.builder, split="train",
                                        rank=self.placement.engine_index, world_size=self.placement.engines)
        self.dataset.check_usable()  # before the engine starts: bad data fails in seconds
        self.data_iter = iter(self.dataset)
        if self.needs_engine and self.engine is None:
            from megavrl.rl.placement import engine_devices
            from megavrl.rollout.engine import RolloutEngine
            from megavrl.rollout.shm import remove_stale_shm

            remove_stale_shm(cfg.rollout.weight_sync_shm_dir)

            t0 = time.perf_counter()
            devices = self.placement.host_local_devices[:max(1, cfg.rollout.tensor_parallel_size)]
            with engine_devices(devices) if torch.cuda.is_available() and self.placement.engines > 1 else nullcontext():
                self.engine = RolloutEngine(cfg.model.hf_dir, cfg.rollout)
            log.info("vLLM engine started in %.1f s", time.perf_counter() - t0)

    def _previous_status(self) -> str | None:
        """The status an earlier run in this output directory left in run_status.json, if any."""
        import json

        try:
            return json.loads((self.output_dir / "run_status.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def _resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` points at, if any; True when resumed."""
        from megavrl.checkpoint.manager import restore_rng_state

        path = self.ckpt.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return False
        loaded = self.ckpt.load(path, self.actor.sharded_state_dict(for_loading=True), shared_keys=("data",))
        self.actor.load_sharded(loaded.sharded)
        self.step = loaded.step
        state = loaded.rank_state or {}
        if "rng" in state:
            restore_rng_state(state["rng"])
        self._load_data_position(broadcast_object(state.get("data") if global_rank() == 0 else None))
        self.nonfinite_total = int(loaded.metadata.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(loaded.metadata.get("nonfinite_in_a_row", 0))
        self.last_checkpoint = Path(path)
        log.info("resumed from %s at step %d (Adam step %d)", path, self.step, self.actor.optim.adam_step())
        self.sync_weights()
        return True

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from megavrl.rl.preemption import PreemptionHandler

        cfg = self.cfg
        if self.already_complete:
            if global_rank() == 0:
                print(f"megavrl train: {self.output_dir} already holds the complete run ({self.step} steps, "
                      f"checkpoint {self.last_checkpoint}); nothing to do. Raise trainer.total_steps to train "
                      f"further, or use another trainer.output_dir.", flush=True)
            return {"step": self.step, "interrupted": False, "signal": None, "already_complete": True,
                    "checkpoint": str(self.last_checkpoint), "before": {}, "after": {},
                    "tensorboard": str(self.tb_dir), "nonfinite_steps": self.nonfinite_total}
        self._write_status("running")
        interrupted = None  # the signal that stopped the run
        saved_step = self.step if self.resumed else None  # the checkpoint of this step exists
        with PreemptionHandler(grace_s=cfg.trainer.preemption_grace_s) as preemption:
            self._preemption = preemption
            before = self.evaluate("before") if self.step == 0 else {}
            while self.step < cfg.trainer.total_steps:
                at_start = self._resume_state()
                metrics = self.train_step(preemption)
                if metrics is None:  # a stop signal arrived before the update: save the step as it began
                    if saved_step != self.step:
                        self.save(rank_state=at_start)
                    interrupted = self._stopped_by(preemption)
                    break
                self.step += 1
                self.metrics.write(self.step, metrics)
                if self.grpo and global_rank() == 0:
                    self.signal_check.check(self.step, metrics)
                if self.nonfinite_in_a_row >= cfg.trainer.max_consecutive_nonfinite:
                    path = self.save()
                    self._write_status("stopped_nonfinite", checkpoint=path)
                    raise NonFiniteStop(
                        f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(trainer.max_consecutive_nonfinite={cfg.trainer.max_consecutive_nonfinite}): stopped "
                        f"at step {self.step} with checkpoint {path}. Lower optimizer.lr or check the data.")
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    self.save()
                    saved_step = self.step
                stop = preemption.should_stop()
                if not stop and cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 \
                        and self.step < cfg.trainer.total_steps:
                    self.evaluate(f"step{self.step}")
                if stop:
                    if saved_step != self.step:
                        self.save()
                    interrupted = self._stopped_by(preemption)
                    break
            if interrupted is None:
                final = self.save() if saved_step != self.step else self.last_checkpoint
                # A signal now leaves the steps done but the export and the final eval to the resumed run.
                if preemption.should_stop():
                    interrupted = self._stopped_by(preemption)
                elif cfg.checkpoint.export_hf_at_end:
                    self.export_hf(final, self.output_dir / "hf")
            after = self.evaluate("after") if interrupted is None else {}
            self._preemption = None
        self.metrics.close()
        latest = self.last_checkpoint
        summary = {"step": self.step, "interrupted": interrupted is not None, "signal": interrupted,
                   "checkpoint": str(latest) if latest else None, "before": before, "after": after,
                   "tensorboard": str(self.tb_dir), "nonfinite_steps": self.nonfinite_total}
        self._write_status("interrupted" if interrupted is not None else "completed", checkpoint=latest,
                           signal=interrupted)
        if global_rank() == 0:
            self._print_summary(summary)
        return summary

    def _stopped_by(self, preemption) -> int:
        """The signal that stopped the run (SIGTERM when it reached another rank only)."""
        import signal

        waited = preemption.seconds_since_signal
        log.warning("stopped at step %d on %s; checkpoint written%s", self.step,
                    signal.Signals(preemption.received).name if preemption.received else "another rank's signal",
                    f" {waited:.1f} s after it" if waited is not None else "")
        # Every rank reports the same signal: rank 0's if it got one.
        return broadcast_object(int(preemption.received or signal.SIGTERM) if global_rank() == 0 else None)

    def _resume_state(self) -> dict:
        """What a checkpoint of the current step boundary stores beside the sharded tensors: this
        rank's RNG streams and, on rank 0, the position of every engine's data shard."""
        from megavrl.checkpoint.manager import capture_rng_state

        state = {"rng": capture_rng_state()}
        mine = self.dataset.state_dict() if self.dataset is not None else None
        # Called at every step boundary: with one engine, rank 0 holds the only shard (no collective).
        shards = [mine] if self.placement.engines == 1 else self.placement.from_every_engine(mine)
        if global_rank() == 0:
            state["data"] = {"engines": self.placement.engines, "shards": shards}
        return state

    def _load_data_position(self, data: dict | None) -> None:
        """Put every engine's data shard where the checkpoint left it. Saved with another number of
        engines (another data-parallel size), the stream resumes after the rows the slowest shard had
        consumed, with a warning: rows the other shards had already taken are seen again."""
        if data is None or self.dataset is None:
            return
        shards = data["shards"] if "shards" in data else [data]  # checkpoints before engines per replica
        if len(shards) == self.placement.engines:
            state = shards[self.placement.engine_index]
        else:
            state = min(shards, key=lambda st: (st["epoch"], st.get("consumed", 0)))
            if self.placement.engine_index == 0:
                log.warning("the checkpoint's data stream was split over %d rollout engines, this run has %d: "
                            "resuming every shard after the %d rows of epoch %d the slowest shard had consumed",
                            len(shards), self.placement.engines, state.get("consumed", 0), state["epoch"])
        self.dataset.load_state_dict(state)
        self.data_iter = iter(self.dataset)

    def _write_status(self, status: str, **extra) -> None:
        """``run_status.json`` in the output directory (and at $MEGAVRL_STATUS_FILE when set): how the
        run ended, for launchers and job scripts that decide whether to requeue."""
        import json

        if global_rank() != 0:
            return
        record = {"status": status, "step": self.step, "total_steps": self.cfg.trainer.total_steps,
                  **{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()}}
        text = json.dumps(record) + "\n"
        targets = [self.output_dir / "run_status.json"]
        if os.environ.get("MEGAVRL_STATUS_FILE"):
            targets.append(Path(os.environ["MEGAVRL_STATUS_FILE"]))
        for target in targets:
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)

    def close(self) -> None:
        """Stop the rollout engine (rank 0) and any process it left; close the metrics."""
        from megavrl.parallel.process_tree import kill_descendants

        if self.engine is not None and self._owns_engine:
            try:
                self.engine.shutdown()
            except Exception as e:  # already dead (e.g. killed by the stop signal)
                log.info("rollout engine shutdown: %s", e)
            self.engine = None
            kill_descendants()
        self.metrics.close()

    def train_step(self, preemption=None) -> dict | None:
        """One step; None when a stop signal arrived before its update (the step is abandoned:
        nothing but the RNG streams and the data position has changed, and the caller saves
        those as they were when the step began)."""
        from megavrl.rl.experience import share_metrics

        timer = PhaseTimer()
        t0 = time.perf_counter()
        with timer("rollout"):
            mine = self._experience_or_failure(preemption) if self.placement.hosts_engine else None
            # Every rank learns how every engine fared (and its metrics share, no pixels) ...
            outcomes = self.placement.from_every_engine(_outcome(mine))
            failed = [(g, o) for g, o in enumerate(outcomes) if isinstance(o, _Rank0Failure)]
            if failed:
                if isinstance(mine, _Rank0Failure) and mine.error is not None:
                    raise mine.error
                g, failure = failed[0]
                raise RuntimeError(f"the rollout engine on global rank {self.placement.host_ranks[g]} failed while "
                                   f"preparing step {self.step + 1}: {failure.message}")
            if any(o is None for o in outcomes) or (preemption is not None and preemption.should_stop()):
                log.warning("step %d abandoned before its update: it runs again after resuming", self.step + 1)
                return None
            # ... and only the ranks of an engine's replicas receive its sequences.
            sequences = self.placement.broadcast_in_group(mine[0] if self.placement.hosts_engine else None)
        metrics = share_metrics(outcomes, self.cfg.algorithm.advantage_kwargs() if self.grpo else None)
        n_tokens = sum(o.train_tokens for o in outcomes)
        if n_tokens:
            metrics.update(self._update(sequences, timer))
            if self.grpo:
                with timer("weight_sync"):
                    metrics.update(self._sync_after_update(preemption))
        metrics.update(timer.metrics())
        metrics["time/step"] = time.perf_counter() - t0
        metrics["throughput/tokens_per_s"] = n_tokens / metrics["time/step"]
        metrics["memory/peak_mb"] = peak_memory_mb()
        metrics["lr"] = self.actor.optim.lr
        metrics["nonfinite/total"] = self.nonfinite_total
        return metrics

    def _experience_or_failure(self, preemption):
        """This engine's ``(sequences, share)``; a failure is returned (and shared) instead of raised,
        so that the other ranks, waiting for the batch, stop too instead of hanging until the
        timeout. With a stop signal received, a failure is the rollout engine killed by it: the step
        is abandoned (None)."""
        from megavrl.rl.preemption import StopRequested

        try:
            if preemption is None:
                return self._experience()
            with preemption.interruptible():
                return self._experience()
        except StopRequested:
            log.warning("stop signal during the rollout: abandoning the step")
            return None
        except Exception as e:
            if preemption is not None and preemption.received is not None:
                log.warning("rollout interrupted by the stop signal (%s): abandoning the step", _first_line(e))
                return None
            return _Rank0Failure(message=f"{type(e).__name__}: {_first_line(e)}", error=e)

    def _sync_after_update(self, preemption) -> dict:
        from megavrl.rl.preemption import StopRequested

        try:
            return self.sync_weights(preemption)
        except (Exception, StopRequested) as e:
            if preemption is None or preemption.received is None:
                raise
            # The update is applied and is in the checkpoint that follows; the engine was killed by
            # the stop signal and gets the weights when the run resumes.
            log.warning("weight sync interrupted by the stop signal (%s)", _first_line(e))
            return {}

    # ------------------------------------------------------------------ rank 0: experience
    def _next_prompts(self, n: int) -> list:
        from megavrl.data.schema import EmptyDatasetError

        items = self.dataset.take(n, self.data_iter)
        if len(items) < n:
            raise EmptyDatasetError(f"the training stream ended after {len(items)} of {n} prompts")
        return items

    def _experience(self) -> tuple:
        sequences, share = self._experience_of_step()
        share.skipped_rows = self.dataset.skips.total
        share.train_tokens = sum(len(s) for s in sequences)
        return sequences, share

    def _sft_experience(self):
        from megavrl.rl.experience import EngineShare, sft_sequences

        prompts = self.cfg.trainer.prompts_per_step // self.placement.engines
        return sft_sequences(self._next_prompts(prompts), self.tokenizer), EngineShare()

    def _grpo_experience(self):
        """This engine's share of the step: sample -> score -> keep informative groups ->
        advantages -> training sequences. Prompt j of engine g is prompt ``j * E + g`` of the step,
        and samples with the seed that prompt has whatever the number of engines."""
        from megavrl.rl.advantages import group_advantages
        from megavrl.rl.experience import EngineShare, grpo_sequences, keep_informative, sample, score_groups
        from megavrl.rollout.batched import sampling_seed

        cfg, place = self.cfg, self.placement
        n_prompts = cfg.trainer.prompts_per_step // place.engines
        refills = cfg.selection.max_refills if cfg.algorithm.filter_zero_variance else None
        prepared = self._next_prompts(n_prompts + (refills or 0))
        base = sampling_seed(cfg.trainer.seed, self.step)
        groups = sample(self.engine, prepared, seeds=[base + j * place.engines + place.engine_index
                                                      for j in range(len(prepared))], rollout_config=cfg.rollout)
        rewards = score_groups(groups, prepared, cfg.reward)
        share = EngineShare(tasks=[p.sample.task for p in prepared[:n_prompts]], rewards=rewards[:n_prompts])
        kept, share.filter_counts = keep_informative(groups, prepared, rewards, n_prompts, refills)
        if not kept:
            log.warning("step %d: every group of engine %d had zero reward variance: nothing to train on",
                        self.step, place.engine_index)
            return [], share
        groups, prepared, rewards = (list(x) for x in zip(*kept))
        totals = [[r.total for r in rs] for rs in rewards]
        adv, _ = group_advantages(torch.tensor(totals, dtype=torch.float32), **cfg.algorithm.advantage_kwargs())
        build = grpo_sequences(groups, prepared, adv, rewards)
        share.kept_totals = totals
        share.response_lengths = [[len(s) for s in g.samples] for g in groups]
        share.truncated = [sum(s.finish_reason == "length" for s in g.samples) for g in groups]
        share.prompt_lengths = [p.num_tokens for p in prepared]
        share.mismatched_prompts = build.mismatched_prompts
        return build.sequences, share

    # ------------------------------------------------------------------ all ranks: update
    def _update(self, sequences: list[TrainSequence], timer: PhaseTimer) -> dict:
        """Train on the step's sequences. ``sequences`` are this rank's engine group's; the k replicas
        of the group share them, and every mini-batch's loss is normalised over the whole step's
        mini-batch (all engines), with the same number of micro-batches on every rank."""
        cfg = self.cfg
        alg = cfg.algorithm
        place = self.placement
        seq_len = padded_length(sequences) if sequences else padded_length([_FILLER])
        how = MicroBatching(cfg.trainer.micro_batch_size, cfg.trainer.max_tokens_per_micro_batch, cfg.trainer.packing,
                            same_shape=cfg.parallel.pp > 1)
        minis = [sequences[i::alg.mini_batches] for i in range(alg.mini_batches)]
        # Per mini-batch and engine: response tokens and sequences, for normalisers over the whole step.
        sizes = place.from_every_engine([(sum(s.response_len for s in m), len(m)) for m in minis])
        normalisers = [(sum(e[i][0] for e in sizes), sum(e[i][1] for e in sizes)) for i in range(len(minis))]
        kept = [i for i, (_, n_seqs) in enumerate(normalisers) if n_seqs > 0]  # empty everywhere: skipped
        minis = [minis[i] for i in kept]
        normalisers = [normalisers[i] for i in kept]
        # The group's k replicas share its sequences; every DP rank runs as many micro-batches.
        cuts = [rank_micro_batches(m, place.replica_in_group, place.replicas_per_engine, how, self.pad_id, seq_len)
                for m in minis]
        batches = [cut.batches for cut in cuts]
        need_old = self.grpo and (alg.ppo_epochs > 1 or len(minis) > 1)
        with timer("logprobs"):
            for mb_list in batches:
                for key, model in (("old_logprobs", self.actor if need_old else None), ("ref_logprobs", self.ref)):
                    if model is None:
                        continue
                    values = model.logprobs(mb_list, seq_len)
                    if values is not None:
                        for b, v in zip(mb_list, values):
                            b[key] = v
        totals: dict[str, float] = {}
        n_updates = skipped = 0
        grad_norms = []
        with timer("train"):
            for _ in range(alg.ppo_epochs):
                for (num_tokens, num_seqs), mb_list in zip(normalisers, batches):
                    loss_fn = self._loss_fn(num_tokens, num_seqs)
                    result = self.actor.train_step(mb_list, seq_len, loss_fn)
                    n_updates += 1
                    if not result.applied:
                        skipped += 1
                    elif result.grad_norm is not None:
                        grad_norms.append(result.grad_norm)
                    for k, v in result.metrics.items():
                        totals[k] = totals.get(k, 0.0) + v
        metrics = {k: v / n_updates for k, v in totals.items()}
        if skipped:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: %d of %d updates skipped (non-finite loss or gradient)", self.step, skipped, n_updates)
        else:
            self.nonfinite_in_a_row = 0
        metrics["nonfinite/skipped_updates"] = skipped
        metrics.update(micro_batch_metrics(cuts))
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return metrics

    def _sft_loss(self, num_tokens: int, num_seqs: int):
        """Cross-entropy of one mini-batch, normalised over its response tokens on all DP ranks."""
        from megavrl.rl.policy_loss import sft_loss

        return lambda batch, logprobs, entropy: sft_loss(logprobs, batch["loss_mask"], num_tokens, entropy)

    def _grpo_loss(self, num_tokens: int, num_seqs: int):
        """The policy loss of one mini-batch, with normalisers over the whole mini-batch (all DP ranks)."""
        from megavrl.rl.policy_loss import policy_loss

        kwargs = self.cfg.algorithm.loss_kwargs()
        if self.ref is None:
            kwargs["kl_coef"] = 0.0

        def grpo_loss(batch, logprobs, entropy):
            old = batch.get("old_logprobs")
            return policy_loss(
                logprobs, logprobs.detach() if old is None else old, batch["advantages"], batch["loss_mask"],
                ref_logprobs=batch.get("ref_logprobs"), rollout_logprobs=batch.get("rollout_logprobs"),
                entropy=entropy, global_num_tokens=num_tokens, global_num_seqs=num_seqs,
                max_response_len=self.cfg.rollout.max_new_tokens, **kwargs)
        return grpo_loss

    # ------------------------------------------------------------------ weights, checkpoints, eval
    def sync_weights(self, preemption=None) -> dict:
        """Stream the actor's weights into the vLLM engine (all ranks take part). With ``preemption``,
        a stop signal ends rank 0's calls into the engine (which the signal may have killed) while
        the other ranks' collectives are still completed."""
        if not self.needs_engine:
            return {}
        if not self.placement.syncs_weights:  # this replica feeds no engine: nothing to export
            return {}
        stats = self.actor.sync_weights_into(
            self.engine if self.placement.hosts_engine else None,
            rpc_guard=preemption.interruptible if preemption is not None else None)
        return {} if stats is None else {"weight_sync/seconds": stats.seconds, "weight_sync/mb_per_s": stats.mb_per_s}

    def save(self, rank_state: dict | None = None) -> Path:
        """Checkpoint the run at ``self.step``: model, optimizer, LR schedule, RNG streams, data
        position, counters. rank_state: the RNG/data state to store (default: the current one; an
        abandoned step passes the state it began with). Saving leaves every RNG stream as it found it
        (Megatron's writer draws random numbers), so a resumed run continues exactly like an
        uninterrupted one. The stop signals are blocked while the writer's processes are forked, so
        a signal sent to the whole process group cannot kill them mid-save."""
        from megavrl.checkpoint.manager import capture_rng_state, restore_rng_state
        from megavrl.rl.preemption import signals_blocked

        current = capture_rng_state()
        state = rank_state if rank_state is not None else self._resume_state()
        with signals_blocked():
            path = self.ckpt.save(self.step, self.actor.sharded_state_dict(), rank_state=state,
                                  metadata={"config": to_dict(self.cfg), "nonfinite_total": self.nonfinite_total,
                                            "nonfinite_in_a_row": self.nonfinite_in_a_row,
                                            "adam_step": self.actor.optim.adam_step()},
                                  hf_files_from=self.cfg.model.hf_dir)
        restore_rng_state(current)
        self.last_checkpoint = path
        return path

    def export_hf(self, ckpt: Path, out: Path) -> None:
        """Convert the checkpoint just saved into a Hugging Face directory (rank 0).

        Runs ``megavrl convert megatron-to-hf`` in a child process: the converter streams tensor by
        tensor from the distributed checkpoint (bounded memory) and needs no live process group.
        """
        import subprocess
        import sys

        from megavrl.dtypes import short_dtype_name

        if global_rank() == 0:
            dtype = "bf16" if self.cfg.model.dtype == "auto" else short_dtype_name(self.cfg.model.dtype)
            cmd = [sys.executable, "-m", "megavrl.cli", "convert", "megatron-to-hf", "--ckpt", str(ckpt),
                   "--out", str(out), "--dtype", dtype, "--force"]
            # A clean single-process job: none of torchrun's variables (with TORCHELASTIC_USE_AGENT_STORE
            # the child's rendezvous would wait for torchrun's agent store forever).
            torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
            env = {k: v for k, v in os.environ.items()
                   if k not in torchrun_vars and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}
            result = subprocess.run(cmd, env=env)
            if result.returncode != 0:
                log.error("HF export failed (exit %d); convert later with: %s", result.returncode, " ".join(cmd[2:]))
            else:
                log.info("exported the trained model to %s (Hugging Face format)", out)
        torch.distributed.barrier()

    def evaluate(self, tag: str) -> dict:
        """Greedy evaluation on data.val: every engine decodes its shard of the rows, rank 0 scores
        them all and writes the report."""
        if not self.cfg.data.val:
            return {}
        from megavrl.eval.runner import predict, report
        from megavrl.rl.placement import interleave
        from megavrl.rl.preemption import StopRequested

        if not self.grpo and self.step > 0:  # SFT updates do not stream into the engine each step
            self._sync_after_update(self._preemption)
        t0 = time.perf_counter()
        records = None
        if self.placement.hosts_engine:
            try:
                with self._preemption.interruptible() if self._preemption is not None else nullcontext():
                    records = predict(self.engine, self.cfg, self.builder, self.placement.engine_index,
                                      self.placement.engines)
            except StopRequested:
                records = "stopped"
        shards = self.placement.from_every_engine(records)
        if any(r == "stopped" for r in shards):
            if global_rank() == 0:
                log.warning("evaluation %r abandoned: a stop signal arrived", tag)
            return {}
        result = None
        if global_rank() == 0:
            out = Path(self.cfg.eval.output_dir or self.output_dir / "eval") / tag
            result = report(interleave([records for records, _ in shards]), self.cfg, out,
                            seconds=time.perf_counter() - t0, model=self._eval_model_name(), step=self.step,
                            val_rows=max(rows for _, rows in shards))
            self.metrics.write(self.step, {k: v for k, v in result.items() if isinstance(v, (int, float))},
                               prefix="eval/")
        return broadcast_object(result)

    def _eval_model_name(self) -> str:
        """What an evaluation scores: the model the run started from, trained for ``self.step`` steps."""
        start = self.cfg.model.megatron_ckpt or self.cfg.model.hf_dir
        return f"{start} + {self.step} steps in {self.output_dir}" if self.step else str(start)

    def _print_summary(self, summary: dict) -> None:
        from megavrl.console import fmt
        from megavrl.eval.report import headline_keys
        from megavrl.eval.summary import blind_note

        lines = [f"megavrl train: {summary['step']} steps{' (interrupted)' if summary['interrupted'] else ''}"]
        for k in headline_keys({**summary["before"], **summary["after"]}):
            b, a = summary["before"].get(k), summary["after"].get(k)
            lines.append(f"  eval {k}: before {fmt(b)} -> after {fmt(a)}{blind_note(k, summary['before'], summary['after'])}")
        if summary["before"] or summary["after"]:
            eval_dir = Path(self.cfg.eval.output_dir or self.output_dir / "eval")
            lines.append(f"  every metric: {eval_dir}/{{before,after}}/metrics.md")
        lines.append(f"  TensorBoard logs: {summary['tensorboard']}  (tensorboard --logdir {summary['tensorboard']})")
        print("\n".join(lines), flush=True)
