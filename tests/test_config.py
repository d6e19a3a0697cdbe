"""Config loading and validation: every failure names the field and the fix."""
import pytest

from megavrl.config import Config, ConfigError, dump_yaml, load_config, validate


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    a = write(tmp_path, "parallel:\n  tp: 2\noptimizer:\n  lr: 1.0e-5\n", "a.yaml")
    b = write(tmp_path, "optimizer:\n  lr: 2.0e-5\n", "b.yaml")
    cfg = load_config([a, b], ["trainer.total_steps=7", "model.freeze_vision=true", "checkpoint.dir=/x"])
    assert isinstance(cfg, Config)
    assert cfg.parallel.tp == 2 and cfg.parallel.pp == 1
    assert cfg.optimizer.lr == 2e-5  # the later file wins
    assert cfg.trainer.total_steps == 7 and cfg.model.freeze_vision is True
    assert cfg.checkpoint.dir == "/x"
    assert "tp: 2" in dump_yaml(cfg)


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field 'optimizer.lrr'.*Did you mean: 'lr'"):
        load_config(write(tmp_path, "optimizer:\n  lrr: 1.0\n"))
    with pytest.raises(ConfigError, match=r"override 'parallel.tpp=2'.*'parallel.tpp'.*'tp'"):
        load_config([], ["parallel.tpp=2"])
    with pytest.raises(ConfigError, match="unknown config field 'modle'"):
        load_config([], ["modle.hf_dir=x"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"'trainer.total_steps' has a bad value"):
        load_config([], ["trainer.total_steps=many"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config([], ["parallel.tp"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_world_size_not_divisible_by_tp_pp():
    cfg = load_config([], ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp \* parallel.pp = 2 \* 2 = 4"):
        validate(cfg, world_size=6, check_paths=False)
    validate(cfg, world_size=8, check_paths=False)


def test_bad_choices_and_ranges():
    for override, match in [("model.dtype=fp8", "model.dtype='fp8' is not one of"),
                            ("optimizer.lr=0", "optimizer.lr=0.0 must be > 0"),
                            ("parallel.backend=mpi", "parallel.backend='mpi'"),
                            ("optimizer.min_lr=1.0", "optimizer.min_lr=1.0 exceeds optimizer.lr")]:
        with pytest.raises(ConfigError, match=match):
            validate(load_config([], [override]), check_paths=False)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model.hf_dir is not set"):
        validate(load_config([]))
    with pytest.raises(ConfigError, match="model.hf_dir=.*has no config.json"):
        validate(load_config([], [f"model.hf_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="checkpoint.resume=.*does not exist"):
        validate(load_config([], [f"checkpoint.resume={tmp_path}/ckpt"]), check_paths=True)


def test_heads_not_divisible_by_tp(tiny_hf_dir):
    # tiny: 4 attention heads, 2 KV groups -> tp=4 splits heads but not the KV groups
    with pytest.raises(ConfigError, match=r"num_query_groups \(num_key_value_heads\)=2 is not divisible by "
                                          r"tensor_model_parallel_size \(parallel.tp\)=4"):
        validate(load_config([], [f"model.hf_dir={tiny_hf_dir}", "parallel.tp=4"]), world_size=4)
    validate(load_config([], [f"model.hf_dir={tiny_hf_dir}", "parallel.tp=2"]), world_size=2)


def test_other_model_type_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError, match="holds a 'llama' model"):
        validate(load_config([], [f"model.hf_dir={tmp_path}"]))


def test_subsystem_sections_validate_their_fields():
    cfg = load_config([], ["algorithm.kl_estimator=k2", "reward.format_mode=lenient", "selection.k=4",
                           "algorithm.name=sft"])
    assert cfg.algorithm.kl_estimator == "k2" and cfg.algorithm.loss_kwargs()["kl_estimator"] == "k2"
    assert cfg.reward.format_mode == "lenient" and cfg.selection.k == 4 and cfg.algorithm.name == "sft"
    for override, match in [("algorithm.kl_estimator=k9", "algorithm.kl_estimator='k9' is not one of"),
                            ("reward.answer_position=middle", "reward.answer_position='middle'"),
                            ("algorithm.name=ppo", "algorithm.name='ppo'"),
                            ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs=0 must be >= 1"),
                            ("selection.top_fraction=1.5", "selection.top_fraction=1.5 must be in")]:
        with pytest.raises(ConfigError, match=match):
            load_config([], [override])


@pytest.mark.parametrize("override,field", [
    ("optimizer.lr=nan", "optimizer.lr=nan"),
    ("optimizer.min_lr=.nan", "optimizer.min_lr=nan"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay=inf"),
    ("optimizer.adam_eps=-.inf", "optimizer.adam_eps=-inf"),
    ("optimizer.clip_grad=nan", "optimizer.clip_grad=nan"),
    ("optimizer.adam_beta1=nan", "optimizer.adam_beta1=nan"),
    ("optimizer.adam_beta2=inf", "optimizer.adam_beta2=inf"),
    ("data.timestamp_tolerance=inf", "data.timestamp_tolerance=inf"),
    ("data.train=[{json_path: a.jsonl, weight: .inf}]", "data.train[0].weight=inf"),
])
def test_nonfinite_numbers_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match="must be a finite number") as exc:
        validate(load_config([], [override]), check_paths=False)
    assert field in str(exc.value)


def test_nonfinite_number_set_in_python_is_refused_by_validate():
    cfg = load_config([])
    cfg.optimizer.lr = float("nan")
    with pytest.raises(ConfigError, match=r"optimizer.lr=nan must be a finite number"):
        validate(cfg, check_paths=False)


@pytest.mark.parametrize("overrides,fields", [
    (["data.video.min_pixels=50000", "data.video.max_pixels=40000"],
     ["data.video.max_pixels=40000", "data.video.min_pixels=50000"]),
    (["data.video.min_frames=8", "data.video.max_frames=4"], ["data.video.max_frames=4", "data.video.min_frames=8"]),
    (["data.video.min_frames=0"], ["data.video.min_frames=0"]),
    (["data.video.nframes=0"], ["data.video.nframes=0"]),
])
def test_video_bounds_out_of_order_are_refused_at_load(overrides, fields):
    with pytest.raises(ConfigError) as exc:
        load_config([], overrides)
    assert all(f in str(exc.value) for f in fields)


@pytest.mark.parametrize("overrides,fields", [
    # a prompt alone as long as the context: vLLM refuses it
    (["data.prompt.max_prompt_len=4096", "rollout.max_model_len=2048"],
     ["data.prompt.max_prompt_len=4096", "rollout.max_model_len=2048", "raise rollout.max_model_len"]),
    (["data.prompt.max_prompt_len=2048", "rollout.max_model_len=2048"], ["data.prompt.max_prompt_len=2048"]),
    # no room for a prompt at all
    (["rollout.max_new_tokens=2048", "rollout.max_model_len=2048"],
     ["rollout.max_new_tokens=2048", "rollout.max_model_len=2048"]),
    (["eval.max_new_tokens=4096", "rollout.max_model_len=2048"], ["eval.max_new_tokens=4096"]),
    # the longest prompt plus a full response does not fit: responses would be cut short
    (["data.prompt.max_prompt_len=2000", "rollout.max_new_tokens=100", "rollout.max_model_len=2048"],
     ["data.prompt.max_prompt_len=2000", "rollout.max_new_tokens=100", "rollout.max_model_len=2048", "2100"]),
    (["data.prompt.max_prompt_len=1900", "rollout.max_new_tokens=100", "eval.max_new_tokens=200",
      "rollout.max_model_len=2048"], ["data.prompt.max_prompt_len=1900", "eval.max_new_tokens=200"]),
    (["rollout.max_model_len=0"], ["rollout.max_model_len=0"]),
])
def test_prompt_and_response_lengths_must_fit_the_context(overrides, fields):
    with pytest.raises(ConfigError) as exc:
        validate(load_config([], overrides), check_paths=False)
    assert all(f in str(exc.value) for f in fields), str(exc.value)


def test_unset_prompt_length_is_what_the_context_leaves_after_a_response():
    cfg = validate(load_config([], ["rollout.max_model_len=1024", "rollout.max_new_tokens=24"]), check_paths=False)
    assert cfg.data.prompt.max_prompt_len == 1000
    cfg = validate(load_config([], ["rollout.max_model_len=1024", "rollout.max_new_tokens=24",
                                    "eval.max_new_tokens=100"]), check_paths=False)
    assert cfg.data.prompt.max_prompt_len == 924  # eval's responses are the longer ones here
    validate(load_config([]), check_paths=False)  # the defaults fit
    validate(load_config([], ["data.prompt.max_prompt_len=1000", "rollout.max_new_tokens=24",
                              "rollout.max_model_len=1024"]), check_paths=False)  # exactly full is fine


def test_example_configs_pass_validation():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")):
        validate(load_config(path), check_paths=False)


def test_unreadable_or_directory_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"optimizer:\n  lr: \xff\n")
    with pytest.raises(ConfigError, match=r"config file '.*latin1.yaml' is not UTF-8 text"):
        load_config(bad)


def test_a_removed_field_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"'parallel.sequence_parallel' was removed: it never took effect.*delete"):
        load_config([], ["parallel.sequence_parallel=true"])


def test_rollout_log_probs_follow_the_sampling_temperature():
    # GRPO scores responses under softmax(logits / T), the distribution vLLM sampled them from; the
    # rollout's own log-probs (token_mult_prob_error, TIS) must be of the same distribution.
    def rollout(*overrides):
        return validate(load_config([], list(overrides)), check_paths=False).rollout

    assert rollout().vllm_logprobs_mode() == "raw_logprobs"  # temperature 1
    assert rollout("rollout.temperature=0").vllm_logprobs_mode() == "raw_logprobs"
    assert rollout("rollout.temperature=0").scoring_temperature == 1.0
    hot = rollout("rollout.temperature=0.7")
    assert hot.vllm_logprobs_mode() == "processed_logprobs" and hot.scoring_temperature == 0.7
    with pytest.raises(ConfigError, match=r"rollout.logprobs_mode=raw_logprobs .* rollout.temperature=0.7.*"
                                          r"set rollout.logprobs_mode=auto"):
        rollout("rollout.temperature=0.7", "rollout.logprobs_mode=raw_logprobs")
    rollout("rollout.temperature=0.7", "rollout.logprobs_mode=raw_logprobs", "algorithm.name=sft")  # no GRPO
    with pytest.raises(ConfigError, match="logprobs_mode='raw'"):
        rollout("rollout.logprobs_mode=raw")
