"""Checkpoint conversion HF <-> Megatron: round trips, resharding, outside readers, refusals.

The conversions run in worker processes (Megatron's CPU mode patches torch process-wide), through
the two entry points users type: ``megavrl convert ...`` and tools/convert_*.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavrl.checkpoint.hf_io import HFCheckpointReader
from megavrl.checkpoint.mapping import to_published
from tests.parallel.torchrun import REPO_ROOT, run_torchrun

PRESETS = ("tiny", "tiny-tied")


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A megavrl command or tool, as a user runs it: a fresh process, no RANK in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory under its published name."""
    with HFCheckpointReader(hf_dir) as reader:
        return {to_published(n): reader.read(to_published(n)) for n in reader.names()}


@pytest.fixture(scope="module")
def hf_dirs(tiny_hf_dir, tiny_tied_hf_dir):
    return {"tiny": Path(tiny_hf_dir), "tiny-tied": Path(tiny_tied_hf_dir)}


@pytest.fixture(scope="module")
def tp2_ckpts(hf_dirs, tmp_path_factory):
    """Both presets converted at TP=2, each command starting its processes itself: ``tiny`` at
    (TP 2, PP 1) with ``megavrl convert hf-to-megatron``, ``tiny-tied`` at (TP 2, PP 2) with
    tools/convert_hf_to_megatron.py (4 processes; the last stage's tied output weight is a copy of
    the embedding that must not be written twice)."""
    root = tmp_path_factory.mktemp("tp2")
    run(["-m", "megavrl.cli", "convert", "hf-to-megatron", "--hf-dir", str(hf_dirs["tiny"]),
         "--out", str(root / "tiny"), "--tp", "2", "--pp", "1", "--no-progress"])
    run(["tools/convert_hf_to_megatron.py", "--hf-dir", str(hf_dirs["tiny-tied"]), "--out", str(root / "tiny-tied"),
         "--tp", "2", "--pp", "2", "--no-progress"])
    return {p: root / p for p in PRESETS}


@pytest.fixture(scope="module")
def exported(tp2_ckpts, tmp_path_factory):
    """Each TP=2 checkpoint back to HF in fp32 and in bf16 (4 MB shards), in one process."""
    root = tmp_path_factory.mktemp("exported")
    args, out = [], {}
    for preset in PRESETS:
        for dtype in ("fp32", "bf16"):
            out[preset, dtype] = root / f"{preset}-{dtype}"
            args += [str(tp2_ckpts[preset]), str(out[preset, dtype]), dtype]
    run(["-m", "tests.checkpoint.convert_worker", "export", *args])
    return out


# ------------------------------------------------------------------------------- round trip


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_tp2_is_bit_exact(preset, hf_dirs, exported):
    """HF -> Megatron (TP=2) -> HF gives back every tensor bit for bit (fp32), and the bf16 export
    is exactly the bf16 cast of the original; names are the published ones, no lm_head when tied."""
    original = hf_tensors(hf_dirs[preset])
    fp32 = hf_tensors(exported[preset, "fp32"])
    assert sorted(fp32) == sorted(original)
    assert all(torch.equal(fp32[n], original[n]) for n in original), [n for n in original
                                                                        if not torch.equal(fp32[n], original[n])]
    bf16 = hf_tensors(exported[preset, "bf16"])
    assert all(bf16[n].dtype == torch.bfloat16 and torch.equal(bf16[n], original[n].to(torch.bfloat16))
               for n in original)
    assert ("lm_head.weight" in fp32) == (preset == "tiny")
    assert all(n.startswith(("visual.", "model.", "lm_head.")) for n in fp32)


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_directory_is_complete(hf_dirs, exported):
    """Size-capped shards listed by model.safetensors.index.json, config.json with the new dtype,
    and every non-weight file of the source (tokenizer, chat template, processor, generation)."""
    from safetensors import safe_open

    out = exported["tiny", "bf16"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:
        with safe_open(str(out / f), framework="pt") as h:
            assert sorted(h.keys()) == sorted(k for k, v in index["weight_map"].items() if v == f)
            sizes = [h.get_slice(k).get_shape() for k in h.keys()]
        assert (out / f).stat().st_size < 4e6 + 1e5 or len(sizes) == 1  # --max-shard-size 4MB
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in hf_tensors(out).values())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "qwen2_5_vl"
    source_files = {p.name for p in hf_dirs["tiny"].iterdir() if not p.name.endswith(".safetensors")}
    assert source_files <= {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"} <= source_files


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_directory_layout(tp2_ckpts):
    """dist/ (Megatron torch_dist, a file per rank), hf/ (no weights), megavrl_checkpoint.json."""
    tied = json.loads((tp2_ckpts["tiny-tied"] / "megavrl_checkpoint.json").read_text())
    assert (tied["tp"], tied["pp"], tied["world_size"]) == (2, 2, 4)
    assert len(list((tp2_ckpts["tiny-tied"] / "dist").glob("*.distcp"))) == 4
    ckpt = tp2_ckpts["tiny"]
    assert json.loads((ckpt / "dist" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in (ckpt / "dist").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
    assert not list((ckpt / "hf").glob("*.safetensors"))
    marker = json.loads((ckpt / "megavrl_checkpoint.json").read_text())
    assert {k: marker[k] for k in ("step", "world_size", "tp", "pp", "dtype")} == {
        "step": 0, "world_size": 2, "tp": 2, "pp": 1, "dtype": "float32"}
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


# ------------------------------------------------------------------------------- resharding


@pytest.mark.slow
@pytest.mark.distributed
def test_saved_at_tp2_loads_at_tp1_pp2_and_tp1_pp1(tp2_ckpts, hf_dirs, tmp_path):
    """The TP=2 checkpoint, loaded as the trainer loads it at (1, 2), (1, 1) and (2, 1), gives the
    logits of the HF weights loaded directly (text + video batch through pipeline_forward):
    identical at TP=1 (same arithmetic), within fp32 summation-order noise at TP=2."""
    run_torchrun(["-m", "tests.checkpoint.convert_worker", "logits", str(tp2_ckpts["tiny"]), str(hf_dirs["tiny"]),
                  str(tmp_path), "hf", "1,2", "1,1", "2,1"], nproc=2, timeout=300)
    ref = torch.load(tmp_path / "hf_tp1_pp1.pt")
    assert ref.shape[-1] == 728 and ref.abs().max() > 0.1
    assert torch.equal(torch.load(tmp_path / "ckpt_tp1_pp2.pt"), ref)
    assert torch.equal(torch.load(tmp_path / "ckpt_tp1_pp1.pt"), ref)
    torch.testing.assert_close(torch.load(tmp_path / "ckpt_tp2_pp1.pt"), ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_checkpoint_root_exports(hf_dirs, tmp_path):
    """A checkpoint the trainer wrote (MegatronActor with Adam states, CheckpointManager, Megatron's
    own writer, TP=2, no hf/) exports from its root (newest complete step) with --hf-config."""
    root = tmp_path / "run" / "checkpoints"
    run_torchrun(["-m", "tests.checkpoint.convert_worker", "trainer-save", str(hf_dirs["tiny"]), str(root), "2", "1"],
                 nproc=2, timeout=300)
    (root / "step_00000009").mkdir()  # an incomplete later save (no marker) is skipped
    proc = run(["-m", "megavrl.cli", "convert", "megatron-to-hf", "--ckpt", str(root), "--out", str(tmp_path / "hf"),
                "--hf-config", str(hf_dirs["tiny"]), "--dtype", "fp32", "--no-progress"])
    assert "step_00000007" in proc.stderr
    original, back = hf_tensors(hf_dirs["tiny"]), hf_tensors(tmp_path / "hf")
    assert sorted(back) == sorted(original) and all(torch.equal(back[n], original[n]) for n in original)


@pytest.mark.slow
@pytest.mark.distributed
def test_check_parity_of_a_megatron_checkpoint(tp2_ckpts, hf_dirs):
    """``megavrl check-parity --ckpt``: the TP=2 checkpoint loaded at (1, 2) against transformers."""
    proc = run(["-m", "megavrl.cli", "check-parity", "--hf-dir", str(hf_dirs["tiny"]), "--ckpt", str(tp2_ckpts["tiny"]),
                "--tp", "1", "--pp", "2", "--kinds", "video", "--tolerance", "1e-4"])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ckpt"] == str(tp2_ckpts["tiny"]) and report["pp"] == 2
    assert report["max_abs_logit_diff"] < 1e-4 and report["argmax_agreement"] == 1.0


# ------------------------------------------------------------------------------- outside readers


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_directory_loads_in_transformers(hf_dirs, exported):
    """transformers loads the export (both presets) and gives the original's logits exactly on a
    video prompt built by the exported processor; in bf16 the dtype comes from config.json."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megavrl.checks.parity import build_parity_batches

    for preset in PRESETS:
        batch = build_parity_batches(exported[preset, "fp32"], kinds=("video",))["video"]
        logits = []
        for d in (hf_dirs[preset], exported[preset, "fp32"]):
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                logits.append(model(**batch).logits)
        assert torch.equal(logits[0], logits[1]), preset
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported["tiny-tied", "bf16"])
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.distributed
def test_exported_directory_generates_in_vllm(hf_dirs, exported, tmp_path):
    """vLLM (CPU) serves the exported directory and samples from a video prompt; the sampled
    tokens' log-probabilities are transformers' on the ORIGINAL directory (same weights)."""
    import numpy as np

    from megavrl.rollout import RolloutConfig, RolloutEngine, RolloutPrompt
    from tests.rollout.helpers import (decode_video, hf_response_logprobs, hf_video_inputs, video_prompt,
                                       write_test_video)

    video = decode_video(write_test_video(tmp_path / "v.mp4"), num_frames=8)
    prompt = video_prompt("what moves in the video")
    config = RolloutConfig(dtype="float32", max_model_len=2048, cpu_kv_cache_mb=128, n=2, max_new_tokens=8, seed=0)
    with RolloutEngine(exported["tiny", "fp32"], config) as engine:
        group = engine.generate([RolloutPrompt(prompt=prompt, videos=[video])])[0]
    assert len(group.samples) == 2 and all(len(s.token_ids) >= 1 for s in group.samples)
    inputs = hf_video_inputs(str(hf_dirs["tiny"]), prompt, video)
    reference = hf_response_logprobs(str(hf_dirs["tiny"]), inputs, [s.token_ids for s in group.samples])
    for sample, ref in zip(group.samples, reference):
        np.testing.assert_allclose(sample.logprobs, ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def refusals(hf_dirs, tmp_path_factory):
    """Every refusal case of tests/checkpoint/convert_worker.py (run_error_cases), in one process:
    {case: (exception type name, message)}."""
    proc = run(["-m", "tests.checkpoint.convert_worker", "errors", str(hf_dirs["tiny"]), str(hf_dirs["tiny-tied"]),
                str(tmp_path_factory.mktemp("refusals") / "work")])
    cases = [json.loads(line[len("CASE "):]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    return {c["case"]: (c["error"], c["message"]) for c in cases}


def _refused(refusals, case: str, error: str, *fragments: str) -> str:
    kind, message = refusals[case]
    assert kind == error, (case, kind, message)
    for fragment in fragments:
        assert fragment in message, (case, fragment, message)
    return message


@pytest.mark.slow
def test_hf_missing_tensor_is_named(refusals):
    _refused(refusals, "h2m_missing", "CheckpointMismatchError",
             "missing tensors (1): model.layers.1.mlp.up_proj.weight")


@pytest.mark.slow
def test_hf_unexpected_tensor_is_named(refusals):
    _refused(refusals, "h2m_unexpected", "CheckpointMismatchError",
             "unexpected tensors (1): model.layers.9.mlp.up_proj.weight")


@pytest.mark.slow
def test_hf_shape_mismatch_gives_both_shapes(refusals):
    _refused(refusals, "h2m_shape", "CheckpointMismatchError",
             "visual.blocks.0.attn.qkv.weight: safetensors hold (300, 128), config.json implies (384, 128)")


@pytest.mark.slow
def test_hf_config_that_disagrees_with_its_weights(refusals):
    message = _refused(refusals, "h2m_config", "CheckpointMismatchError", "ffn 384", "shape mismatches (12)",
                       "model.layers.0.mlp.gate_proj.weight: safetensors hold (512, 256), "
                       "config.json implies (384, 256)")
    assert "missing" not in message and "unexpected" not in message


@pytest.mark.slow
def test_other_model_types_are_refused(refusals):
    _refused(refusals, "h2m_model_type", "ValueError", "model_type='llama'", "Qwen2.5-VL")
    _refused(refusals, "m2h_model_type", "ValueError", "model_type='llama'", "Qwen2.5-VL")


@pytest.mark.slow
def test_layout_the_sizes_do_not_allow(refusals):
    _refused(refusals, "h2m_tp", "ValueError", "tensor_model_parallel_size=3")


@pytest.mark.slow
def test_non_empty_output_needs_force(refusals):
    _refused(refusals, "h2m_out_not_empty", "FileExistsError", "pass --force")
    _refused(refusals, "m2h_out_not_empty", "FileExistsError", "pass --force")


@pytest.mark.slow
def test_megatron_checkpoint_against_a_config_that_disagrees(refusals):
    """A --hf-config with 3 layers for a 4-layer checkpoint: each stacked tensor, both shapes."""
    _refused(refusals, "m2h_config_layers", "CheckpointMismatchError", "does not match the HF config", "3 layers",
             "language_model.decoder.layers.mlp.linear_fc1.weight: checkpoint holds (4, 1024, 256), "
             "the config implies (3, 1024, 256)", "pass --hf-config")


@pytest.mark.slow
def test_megatron_missing_and_unexpected_tensors_are_named(refusals):
    """Tied checkpoint read with an untied config: no output layer; and the other way round."""
    _refused(refusals, "m2h_missing_untied", "CheckpointMismatchError",
             "missing tensors (1): language_model.output_layer.weight")
    _refused(refusals, "m2h_unexpected_tied", "CheckpointMismatchError",
             "unexpected tensors (1): language_model.output_layer.weight")


@pytest.mark.slow
def test_not_a_checkpoint_and_checkpoint_without_hf_files(refusals):
    _refused(refusals, "m2h_not_a_checkpoint", "FileNotFoundError", "is not a megavrl checkpoint",
             "megavrl_checkpoint.json")
    _refused(refusals, "m2h_no_hf_files", "FileNotFoundError", "pass --hf-config")


def test_cli_refuses_before_starting_processes(hf_dirs, tmp_path, capsys):
    """hf-to-megatron checks its arguments before launching tp*pp processes: exit code 2, one line."""
    from megavrl.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(hf_dirs["tiny"]), "--out", str(tmp_path / "full"),
                 "--tp", "2"]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(hf_dirs["tiny"]), "--out", str(tmp_path / "o"),
                 "--tp", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in capsys.readouterr().err
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--tp", "2"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_checkpoint_metadata_cannot_run_code(tmp_path):
    """The .metadata pickle is read with an allow-list: a pickle naming os.system is refused."""
    import pickle

    from megavrl.checkpoint.dist_io import DistCheckpointReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        DistCheckpointReader(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_objects_cannot_run_code(tmp_path):
    """A ShardedObject whose bytes need arbitrary unpickling is refused before Megatron's loader
    (which unpickles them unrestricted) sees it: check_safe_to_load raises, nothing runs."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    from megavrl.checkpoint.dist_io import check_safe_to_load

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    blob = pickle.dumps([Evil()])
    (tmp_path / "__0_0.distcp").write_bytes(blob)
    key = "language_model.decoder.layers.self_attention.linear_qkv._extra_state/shard_0_1"
    meta = Metadata(state_dict_metadata={key: BytesStorageMetadata()},
                    storage_data={MetadataIndex(key): _StorageInfo("__0_0.distcp", 0, len(blob))})
    (tmp_path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(pickle.UnpicklingError, match="needs arbitrary unpickling"):
        check_safe_to_load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_safetensors_writer_streams_in_plan_order(tmp_path):
    from safetensors.torch import load_file

    from megavrl.checkpoint.safetensors_writer import ShardedSafetensorsWriter, parse_size
    from megavrl.checkpoint.tensor_spec import TensorSpec

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("5 parsecs")
    tensors = {"a": torch.randn(10, 10), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(30, 10).bfloat16(),
               "d": torch.randn(3)}
    plan = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=500) as w:
        with pytest.raises(ValueError, match="plan order"):
            w.write("b", tensors["b"])
        for k, v in tensors.items():
            w.write(k, v)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
                                   "c": "model-00002-of-00003.safetensors", "d": "model-00003-of-00003.safetensors"}
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / f))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_output_replaced_only_once_the_new_one_is_complete(tmp_path):
    """--force: the old directory is moved aside and removed only after the new one is in place."""
    from megavrl.checkpoint.convert import _check_out, _move_into_place, _new_tmp_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="pass --force"):
        _check_out(out, force=False)
    _check_out(out, force=True)
    tmp = _new_tmp_dir(out)
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    _move_into_place(tmp, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new.txt"]


def test_read_ahead_keeps_order_passes_errors_and_stops_with_the_caller():
    import threading

    from megavrl.checkpoint.convert import _read_ahead

    assert list(_read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise KeyError("bad tensor")

    with pytest.raises(KeyError, match="bad tensor"):
        list(_read_ahead(failing()))

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    ahead = _read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # the caller stops (e.g. a write failed): the reader thread ends, bounded ahead
    assert not any(t.name == "megatron-to-hf-reader" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1
