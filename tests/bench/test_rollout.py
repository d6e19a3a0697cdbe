"""bench_rollout's transformers side ends each response exactly where it is told to."""
from __future__ import annotations

import torch

from bench.bench_rollout import ForcedLengths


def test_forced_lengths_suppress_eos_until_the_last_token_then_force_it():
    eos, vocab, width = 3, 10, 5
    forced = ForcedLengths([1, 3, 2], prompt_width=width, eos=eos)
    ended = []
    for step in range(3):
        input_ids = torch.zeros(3, width + step, dtype=torch.long)
        scores = forced(input_ids, torch.zeros(3, vocab))
        ended.append([bool(torch.isfinite(row).sum() == 1 and row[eos] == 0) for row in scores])
        for row, done in zip(scores, ended[-1]):
            if not done:  # EOS impossible, everything else untouched
                assert row[eos] == float("-inf") and torch.isfinite(row).sum() == vocab - 1
    # row 0 ends after 1 token, row 2 after 2, row 1 after 3
    assert ended == [[True, False, False], [False, False, True], [False, True, False]]
