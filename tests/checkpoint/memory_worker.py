"""Run in a subprocess by tests/checkpoint/test_convert_memory.py; prints one JSON line.

1. Bounded memory: a random bf16 Qwen2.5-VL of about 200 MB (hidden 1024, 8 layers, vocabulary
   8192: the largest tensor, the embedding, is 17 MB, a twelfth of the model) converted
   hf->megatron (TP=1) and back, each conversion in a child forked from this process after
   everything is imported; its peak RSS (VmHWM, reset when the child starts) minus its RSS at
   the start is the conversion's growth (the measurement of bench/bench_convert.py).
2. Both on-disk HF layouts with both tied and untied embeddings: the two tiny presets written in
   the layouts the shared fixtures do not use (untied in transformers' layout, tied in the
   published one), converted hf->megatron->hf in fp32 and compared bit for bit.

usage: memory_worker.py WORKDIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def to_megatron(work: Path, preset: str, layout: str) -> Path:
    from bench.bench_convert import measure
    from megavrl.checkpoint.tiny import make_tiny_model

    hf = make_tiny_model(work / f"{preset}-{layout}", preset=preset, seed=1, layout=layout)
    measure("h2m", hf, work / f"{preset}-{layout}-ckpt")  # in a forked child, as the large model
    return hf


def back_to_hf(work: Path, hf: Path) -> dict:
    """megatron->hf in fp32 in this process (after the last fork: a process that has run a
    conversion may hold threads a forked child would deadlock on), compared with the original."""
    import torch

    from megavrl.checkpoint.convert import convert_megatron_to_hf
    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.checkpoint.mapping import to_published

    out = hf.with_name(hf.name + "-out")
    convert_megatron_to_hf(hf.with_name(hf.name + "-ckpt"), out, dtype="fp32", progress=False)
    with HFCheckpointReader(hf) as original, HFCheckpointReader(out) as exported:
        names = sorted(to_published(n) for n in original.names())
        return {"disk_names": sorted(original.names()), "names_equal": names == sorted(exported.names()),
                "bit_exact": all(torch.equal(original.read(n), exported.read(n)) for n in names),
                "has_lm_head": "lm_head.weight" in names}


def main(workdir: str) -> None:
    from bench.bench_convert import _import_everything, _same_tensors, make_hf_dir, measure

    work = Path(workdir)
    _import_everything()
    info = make_hf_dir(work / "hf", hidden=1024, layers=8, vocab=8192)
    runs = {}
    for method, src, dst in (("h2m", "hf", "ckpt"), ("m2h", "ckpt", "hf_out")):
        r = measure(method, work / src, work / dst)
        runs[method] = {"growth": r["peak_rss"] - r["base_rss"], "seconds": r["seconds"]}
    tiny = {f"{p}/{lay}": to_megatron(work, p, lay) for p, lay in (("tiny", "transformers"), ("tiny-tied", "published"))}
    report = {"model": info, "runs": runs, "bit_exact": _same_tensors(work / "hf", work / "hf_out"),
              "layouts": {key: back_to_hf(work, hf) for key, hf in tiny.items()}}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
