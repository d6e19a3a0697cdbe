"""Video data: sampling, Qwen2.5-VL preprocessing, prompts, task datasets, synthetic tasks.

- :mod:`megavrl.data.video`: ``VideoSampler`` (decord; qwen-vl-utils' frame and size rules).
- :mod:`megavrl.data.preprocess`: ``preprocess_video`` / ``preprocess_images`` (HF processor outputs).
- :mod:`megavrl.data.prompt`: ``PromptConfig``, ``PromptBuilder`` -> ``PreparedPrompt``.
- :mod:`megavrl.data.schema`: the row schema (``Sample``), validation, ``SkipReport``.
- :mod:`megavrl.data.readers`: Charades-STA, ActivityNet Captions, NExT-GQA, MVBench, Temporal-R1.
- :mod:`megavrl.data.config`: ``DataConfig`` (YAML), ``DatasetSpec``, ``VideoConfig``.
- :mod:`megavrl.data.datasets`: ``VideoTaskDataset`` (mixing, sharding, prefetch, resume).
- :mod:`megavrl.data.synth`: synthetic mp4 tasks (``megavrl data synth``).

Nothing heavy is imported here, so ``import megavrl.data.<module>`` pays only for what it uses.
"""
