"""Task datasets: read and mix annotation files, shard them over data-parallel ranks, decode
videos in the background, and resume from a saved position.

``VideoTaskDataset(config, builder, rank=r, world_size=w)`` reads every dataset of the config
once (bad rows are skipped and counted), then iterates prepared prompts::

    dataset = VideoTaskDataset(data_cfg, PromptBuilder.from_hf_dir(hf_dir), rank=dp_rank, world_size=dp_size)
    stream = iter(dataset)                  # endless by default: epoch after epoch
    batch = [next(stream) for _ in range(prompts_per_step)]   # PreparedPrompt objects
    state = dataset.state_dict()            # save with the checkpoint; load_state_dict() to resume

Order: each epoch, every dataset contributes ``weight * len`` rows (whole repeats, plus a random
subset for the fraction), the mix is shuffled with a generator seeded by ``(seed, epoch)`` and
rank ``r`` takes positions ``r, r + w, r + 2w, ...`` of it (the tail that does not divide by ``w``
is dropped for training, so all ranks run the same number of steps). All ranks compute the same
order from the seed alone: no communication.

A row whose video turns out to be missing, corrupt, too short, or shorter than its timestamps, or
whose prompt is too long, is skipped when it comes up (counted in :attr:`skips`, remembered so it
is not decoded again next epoch); the stream goes on with the next row.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterator, List, Optional

import numpy as np

from megavrl.data.config import DataConfig, DatasetSpec
from megavrl.data.readers import READERS
from megavrl.data.schema import EmptyDatasetError, RowError, Sample, SkipReport, check_within, validate_row
from megavrl.data.video import VideoError, VideoSampler
from megavrl.log import get_logger

log = get_logger(__name__)


# -------------------------------------------------------------------------------- reading


def apply_sampling(rows: list, sampling: str, seed: int) -> list:
    """Rows kept by a ``sampling`` rule: all | first:N | end:N | random:N (N a count or "N%")."""
    if sampling == "all":
        return rows
    how, amount = sampling.split(":", 1)
    n = round(len(rows) * float(amount[:-1]) / 100) if amount.endswith("%") else int(float(amount))
    n = max(0, min(n, len(rows)))
    if how == "first":
        return rows[:n]
    if how == "end":
        return rows[len(rows) - n:]
    keep = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in sorted(keep.tolist())]


def read_dataset(spec: DatasetSpec, skips: SkipReport, seed: int = 0, tolerance: float = 1.0,
                 check_videos_exist: bool = True) -> List[Sample]:
    """Valid rows of one annotation file, after its ``sampling`` rule. Bad rows go to ``skips``."""
    name = spec.display_name
    rows: List[Sample] = []
    if not os.path.isfile(spec.json_path):
        skips.add(spec.json_path, "unreadable_file", f"annotation file {spec.json_path!r} does not exist")
        return rows
    folder = spec.folder
    try:
        for index, (source, raw) in enumerate(READERS[spec.format](spec.json_path, spec.video_ext)):
            if isinstance(raw, RowError):
                skips.add(source, raw.kind, str(raw))
                continue
            try:
                sample = validate_row(raw, source, default_id=f"{name}:{index}", tolerance=tolerance)
            except RowError as exc:
                skips.add(source, exc.kind, str(exc))
                continue
            sample.video_path = sample.video if os.path.isabs(sample.video) else os.path.join(folder, sample.video)
            sample.dataset = name
            if check_videos_exist and not os.path.isfile(sample.video_path):
                skips.add(source, "video_not_found", f"video {sample.video_path!r} does not exist")
                continue
            rows.append(sample)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        skips.add(spec.json_path, "unreadable_file", f"annotation file could not be read: {exc}")
    # A per-file seed, so adding a dataset does not change another's random subset.
    file_seed = [seed, _stable_hash(spec.json_path)]
    kept = apply_sampling(rows, str(spec.sampling), file_seed)
    log.info("%s: %d rows (%d valid, sampling %s) from %s", name, len(kept), len(rows), spec.sampling, spec.json_path)
    return kept


def _stable_hash(text: str) -> int:
    h = 2166136261
    for byte in os.path.abspath(text).encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def read_datasets(specs: List[DatasetSpec], skips: SkipReport, seed: int, tolerance: float,
                  check_videos_exist: bool, source: Optional[str] = None) -> tuple[List[Sample], List[int]]:
    """All rows of ``specs`` (concatenated) and the row count of each; EmptyDatasetError if none."""
    samples: List[Sample] = []
    sizes: List[int] = []
    for spec in specs:
        rows = read_dataset(spec, skips, seed, tolerance, check_videos_exist)
        samples.extend(rows)
        sizes.append(len(rows))
    if not samples:
        where = f"data config {source!r}" if source else "the data config"
        names = ", ".join(repr(s.json_path) for s in specs) or "(no datasets listed)"
        raise EmptyDatasetError(f"{where} yields no usable rows from {names}. {skips.summary()}")
    return samples, sizes


# ------------------------------------------------------------------------------- iteration


class _Skipped:
    __slots__ = ("kind", "message")

    def __init__(self, kind: str, message: str):
        self.kind, self.message = kind, message


class VideoTaskDataset:
    """A sharded, resumable stream of prepared prompts over the datasets of a :class:`DataConfig`.

    Args:
        config: the data section.
        builder: a :class:`megavrl.data.prompt.PromptBuilder`; its vision geometry also sets the
            frame sampler's patch sizes. None: items are ``(Sample, SampledVideo)`` pairs.
        split: "train" or "val" (which dataset list of the config).
        rank, world_size: this process's data-parallel rank and the data-parallel size.
        epochs: stop after this many epochs (None: endless). Default: None for train, 1 for val.
        drop_last: drop the tail of the epoch that does not divide by world_size (default: train).
        prepare: replaces decode + prompt building: ``prepare(sample) -> item`` (tests, tools).

    Iterate once at a time (one live iterator per dataset); the position advances as items are
    delivered, so :meth:`state_dict` never counts prompts still in the prefetch queue.
    """

    def __init__(self, config: DataConfig, builder=None, split: str = "train", rank: int = 0, world_size: int = 1,
                 epochs: Optional[int] = None, drop_last: Optional[bool] = None,
                 prepare: Optional[Callable[[Sample], object]] = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.config = config
        self.builder = builder
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs if epochs is not None else (None if split == "train" else 1)
        self.drop_last = (split == "train") if drop_last is None else drop_last
        self.shuffle = config.shuffle and split == "train"
        self.seed = config.seed
        self.skips = SkipReport(name=f"data[{split}]")
        specs = config.train if split == "train" else config.val
        self.specs = specs
        self.samples, self.sizes = read_datasets(specs, self.skips, config.seed, config.timestamp_tolerance,
                                                 config.check_videos_exist, config.source)
        self.skips.log_summary(of=len(self.samples))
        spec = builder.spec if builder is not None else None
        self.sampler: VideoSampler = config.video.sampler(
            **({} if spec is None else dict(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                            temporal_patch_size=spec.temporal_patch_size)))
        self._prepare_fn = prepare
        self._bad: set = set()  # sample indices that failed once: not decoded again
        self.epoch = 0
        self.index = 0  # position in this rank's shard of the current epoch
        if not self.shard(0):
            raise EmptyDatasetError(f"{config.source or 'the data config'}: {len(self.samples)} rows cannot give "
                                    f"rank {rank} of {world_size} any row")

    # ------------------------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> List[int]:
        """Indices into :attr:`samples` for one epoch over all ranks (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order: List[int] = []
        start = 0
        for spec, size in zip(self.specs, self.sizes):
            idx = np.arange(start, start + size)
            start += size
            whole, frac = divmod(float(spec.weight), 1.0)
            parts = [idx] * int(whole)
            extra = int(round(frac * size))
            if extra:
                parts.append(np.sort(rng.choice(idx, size=extra, replace=False)))
            if parts:
                order.extend(np.concatenate(parts).tolist())
        if self.shuffle:
            order = [order[i] for i in rng.permutation(len(order)).tolist()]
        return order

    def shard(self, epoch: int) -> List[int]:
        """This rank's indices for ``epoch``."""
        order = self.epoch_order(epoch)
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world_size]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        """Items per epoch on this rank (before skips)."""
        return len(self.shard(self.epoch))

    # ------------------------------------------------------------------------------ items

    def prepare(self, sample: Sample):
        """Decode the row's video, check its times against the real duration, build the prompt."""
        if self._prepare_fn is not None:
            return self._prepare_fn(sample)
        start, end = sample.clip if sample.clip is not None else (None, None)
        video = self.sampler(sample.video_path, start, end)
        tol = self.config.timestamp_tolerance
        sample = replace(sample, timestamps=check_within(sample.timestamps, video.duration, tol, "timestamps"),
                         duration=sample.duration if sample.duration is not None else video.duration)
        if self.builder is None:
            return sample, video
        return self.builder.build(sample, video)

    def _prepare_safe(self, index: int):
        sample = self.samples[index]
        try:
            return self.prepare(sample)
        except (VideoError, RowError) as exc:
            return _Skipped(exc.kind, str(exc))
        except ValueError as exc:  # PromptTooLongError and bad templates
            return _Skipped(getattr(exc, "kind", "error"), str(exc))
        except Exception as exc:  # a run never dies on one bad row; the epoch guard catches systematic failure
            log.debug("data[%s]: %s failed", self.split, sample.source, exc_info=True)
            return _Skipped("error", f"{type(exc).__name__}: {exc}")

    def __iter__(self) -> Iterator:
        workers = self.config.num_workers
        window = max(1, workers) * self.config.prefetch
        while self.epochs is None or self.epoch < self.epochs:
            order = self.shard(self.epoch)
            delivered, started_at = 0, self.index
            pool = ThreadPoolExecutor(workers, thread_name_prefix="megavrl-data") if workers > 0 else None
            try:
                pending: deque = deque()
                cursor = self.index
                while True:
                    while len(pending) < window and cursor < len(order):
                        sample_index = order[cursor]
                        if sample_index in self._bad:
                            pending.append((cursor, sample_index, None))
                        elif pool is None:
                            pending.append((cursor, sample_index, self._prepare_safe(sample_index)))
                        else:
                            pending.append((cursor, sample_index, pool.submit(self._prepare_safe, sample_index)))
                        cursor += 1
                        if pool is None:
                            break
                    if not pending:
                        break
                    position, sample_index, job = pending.popleft()
                    item = job.result() if isinstance(job, Future) else job
                    self.index = position + 1
                    if item is None:  # known bad: already reported
                        continue
                    if isinstance(item, _Skipped):
                        self._bad.add(sample_index)
                        self.skips.add(self.samples[sample_index].source, item.kind, item.message)
                        continue
                    delivered += 1
                    yield item
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            if delivered == 0 and started_at == 0 and len(order) > 0:
                raise EmptyDatasetError(f"data[{self.split}] epoch {self.epoch}: no usable row: every one of the "
                                        f"{len(order)} rows of rank {self.rank} was skipped. {self.skips.summary()}")
            self.skips.log_summary()
            self.epoch += 1
            self.index = 0

    def take(self, n: int, iterator: Optional[Iterator] = None) -> list:
        """The next ``n`` items of ``iterator`` (a fresh one when None); fewer only at the end of a finite stream."""
        it = iterator if iterator is not None else iter(self)
        out = []
        for item in it:
            out.append(item)
            if len(out) == n:
                break
        return out

    def check_usable(self) -> None:
        """Raise EmptyDatasetError unless some row yields a prepared sample (its video decodes):
        run it before anything expensive starts. The stream's position is left as it was; rows found
        bad are remembered and not decoded again."""
        state = self.state_dict()
        try:
            first = self.take(1)
        finally:
            self.load_state_dict(state)
        if not first:
            raise EmptyDatasetError(f"data[{self.split}]: no usable row. {self.skips.summary()}")

    # ------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Position of the stream: epoch, index in this rank's shard, and the shuffling generator's
        state (the order of an epoch is a pure function of seed and epoch, so these are its state)."""
        return {"epoch": self.epoch, "index": self.index, "rng_state": {"seed": self.seed, "epoch": self.epoch},
                "world_size": self.world_size, "rank": self.rank, "consumed": self.index * self.world_size,
                "num_samples": len(self.samples), "skipped": self.skips.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. With a different world size, resumes at the same number of
        rows consumed over all ranks (rounded down to a whole step)."""
        seed = (state.get("rng_state") or {}).get("seed", self.seed)
        if seed != self.seed:
            log.warning("data[%s]: resuming with the saved data seed %d (config says %d)", self.split, seed, self.seed)
            self.seed = seed
        if state.get("num_samples") not in (None, len(self.samples)):
            log.warning("data[%s]: the saved position was taken over %s rows, now there are %d: the order differs",
                        self.split, state.get("num_samples"), len(self.samples))
        self.epoch = int(state["epoch"])
        if int(state.get("world_size", self.world_size)) == self.world_size:
            self.index = int(state["index"])
        else:
            self.index = int(state.get("consumed", 0)) // self.world_size
            log.warning("data[%s]: world size changed from %s to %d: resuming after %d rows per rank",
                        self.split, state.get("world_size"), self.world_size, self.index)
        self.index = min(self.index, len(self.shard(self.epoch)))

