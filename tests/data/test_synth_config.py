"""`megavrl data synth` writes its data.yaml as a config layer (issue 21)."""
from megavrl.config import load_config


def test_synth_data_yaml_layers_with_config(synth_dir, tmp_path):
    """`data synth` writes a config layer, like `select`: --config base.yaml --config DIR/data.yaml."""
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  total_steps: 3\n")
    cfg = load_config([base, synth_dir / "data.yaml"])
    assert cfg.trainer.total_steps == 3
    assert [d.json_path for d in cfg.data.train] == [str(synth_dir / "train.jsonl")]
    assert [d.json_path for d in cfg.data.val] == [str(synth_dir / "val.jsonl")]
