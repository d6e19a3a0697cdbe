"""Diagnostics on the top floor: they may import anything, nothing imports them.

- :mod:`megavrl.checks.parity`: Megatron logits against transformers' at any TP/PP (``megavrl check-parity``).
- :mod:`megavrl.checks.sync`: vLLM samples from the trainer's policy after the weight sync (``megavrl check-sync``).
- :mod:`megavrl.checks.gpu`: bf16 parity and a packed train step's MFU on real shapes, one GPU (``tools/gpu_check.sh``);
  ``bench/bench_actor_step.py`` reads its table of published shapes.
"""
