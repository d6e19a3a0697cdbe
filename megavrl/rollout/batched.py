"""Roll out a whole dataset in engine-sized batches: the loop ``megavrl eval`` and ``megavrl select`` share.

The engine samples a batch of prompts in one ``generate`` call (vLLM schedules them together); a
dataset larger than a batch is fed in consecutive batches, with a progress bar, and each row's
sampling seed derived from the base seed and the row's place in the data order
(:func:`sampling_seed`), so the responses depend neither on the batching nor on how the rows are
split over engines.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from megavrl.rollout.inputs import rollout_prompt


def sampling_seed(seed: int, index: int) -> int:
    """The engine seed of the ``index``-th call (a training step, a batch of rows) of a run seeded
    with ``seed``: distinct for every (seed, index) pair that a run can reach."""
    return seed * 1_000_003 + index


def rollout_batches(engine, prepared: Iterable, *, total: int, desc: str, batch_size: int = 32,
                    seed: int | None = None, index_of: Callable[[int], int] = lambda j: j,
                    **generate_kwargs) -> Iterator[tuple[list, list]]:
    """Yield ``(prepared_batch, groups)`` for the first ``total`` prepared prompts of ``prepared``.

    ``generate_kwargs`` go to ``engine.generate`` (n, temperature, max_new_tokens ...). With
    ``seed``, the j-th prompt (0-based) samples with ``sampling_seed(seed, index_of(j))``:
    ``index_of`` maps it to its row in the whole data order when ``prepared`` is one shard of it,
    so that every row samples alike whatever the sharding.
    """
    from tqdm import tqdm

    done = 0
    batch: list = []
    with tqdm(total=total, desc=desc, unit="row", mininterval=2.0) as bar:
        def flush() -> tuple[list, list]:
            nonlocal done
            kwargs = dict(generate_kwargs)
            if seed is not None:
                kwargs["seed"] = [sampling_seed(seed, index_of(done + i)) for i in range(len(batch))]
            groups = engine.generate([rollout_prompt(p, i) for i, p in enumerate(batch)], **kwargs)
            out = (list(batch), groups)
            done += len(batch)
            bar.update(len(batch))
            batch.clear()
            return out

        if total <= 0:
            return
        for item in prepared:
            batch.append(item)
            if len(batch) == batch_size or done + len(batch) >= total:
                yield flush()
            if done >= total:
                return
        if batch:
            yield flush()
