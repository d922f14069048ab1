"""Recipe values and overrides: coerced to the field's type or refused with the key named."""
import pytest

from megatron_ratplus.training.config import ConfigError, load_config

RECIPE = "recipes/tiny-cpu.yaml"


@pytest.mark.parametrize("override,message", [
    ("train.joint=flase", "train.joint must be true or false, got 'flase'"),
    ("model.recurrence=flase", "model.recurrence must be true or false, got 'flase'"),
    ("train.joint=", "train.joint cannot be empty (null)"),
    ("train.clip_grad=", "train.clip_grad cannot be empty (null)"),
    ("train.clip_grad=-1", "train.clip_grad must be >= 0 (0: no clipping)"),
    ("train.warmup_fraction=1.5", "train.warmup_fraction must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("train.global_batch_size=true", "train.global_batch_size must be a number, got True"),
    ("model.norm_eps=abc", "model.norm_eps must be a number, got 'abc'"),
    ("model.rope_base=-1", "model.rope_base must be a positive number"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.min_lr=1.0", "train.min_lr must be in [0, train.lr=0.003]"),
    ("train.adam_beta1=1.5", "train.adam_beta1 must be in [0, 1)"),
    ("train.adam_eps=0", "train.adam_eps must be > 0"),
    ("train.recompute=foo", "train.recompute must be null, full or selective"),
    ("model.spec=foo", "model.spec must be auto, local or te"),
    ("model.kernel_backend=foo", "model.kernel_backend must be auto, fused or reference"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1"),
    ("checkpoint.save_interval=0", "checkpoint.save_interval must be >= 1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.readers_per_node=0", "data.readers_per_node must be >= 1"),
    ("logging.eval_iters=0", "logging.eval_iters must be >= 1"),
    ("parallel.virtual_pipeline_parallel=-1", "parallel.virtual_pipeline_parallel must be >= 2"),
    ("parallel.virtual_pipeline_parallel=1", "parallel.virtual_pipeline_parallel must be >= 2"),
    ("data.streams=/tmp/x", "data.streams must be a list of streams, e.g. data.streams=[{local: "),
    ("checkpoint.save_dir=[1, 2]", "checkpoint.save_dir must be a path (a string), got [1, 2]"),
    ("logging.metrics_jsonl={a: 1}", "logging.metrics_jsonl must be a path (a string)"),
    ("model.dilation=[16,16", "override model.dilation=[16,16: the value is not valid YAML"),
    ("train.max_tokens=inf", "train.max_tokens must be an integer, got 'inf'"),
    ("train.max_steps=.nan", "train.max_steps must be an integer, got nan"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("train: [1, 2]\n", "section 'train' must be a mapping, got list"),
    ("train:\n  max_steps: 3\nlogging: 5\n", "section 'logging' must be a mapping, got int"),
    ("trian:\n  max_steps: 3\n", "unknown section(s) ['trian']"),
    ("- train\n", "must be a mapping of sections"),
])
def test_recipe_sections_that_are_not_mappings_are_refused(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "r.yaml"), ["train.lr=1e-4"])
    assert message in str(err.value)


def test_values_are_coerced_to_the_declared_types():
    cfg = load_config(RECIPE, ["model.rope_base=5e5", "train.lr=3e-4", "train.max_tokens=1e6",
                               "data.streams=", "model.ffn_hidden_size=", "train.recompute=",
                               "train.joint=false", "model.recurrence=false"])
    assert cfg.model.overrides["rope_base"] == 500000.0 and cfg.train.lr == 3e-4
    assert cfg.train.max_tokens == 1_000_000 and isinstance(cfg.train.max_tokens, int)
    assert cfg.data.streams == [] and cfg.train.recompute is None
    assert cfg.train.joint is False and cfg.model.model_args().recurrence is False


def test_sequence_parallel_needs_a_sequence_that_splits_over_tensor_parallel():
    with pytest.raises(ConfigError, match="train.seq_len=63 is not divisible by tensor_parallel=2"):
        load_config(RECIPE, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.seq_len=63"])


def test_output_paths_that_cannot_be_written_are_refused_up_front(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    cases = [
        ("checkpoint.save_dir", str(a_file), "exists and is not a directory"),
        ("logging.tensorboard_dir", str(a_file), "exists and is not a directory"),
        ("data.default_dir", str(a_file), "exists and is not a directory"),
        ("logging.metrics_jsonl", str(a_file / "m.jsonl"), f"cannot be created: {a_file} is a file"),
        ("checkpoint.save_dir", str(a_file / "sub" / "ck"), f"cannot be created: {a_file} is a file"),
        ("logging.metrics_jsonl", str(tmp_path), "is a directory, not a file"),
    ]
    for key, value, message in cases:
        cfg = load_config(RECIPE, [f"{key}={value}"])
        with pytest.raises(ConfigError, match=f"{key}=.*{message}"):
            cfg.check_output_paths()
    assert a_file.read_text() == "user data"
    load_config(RECIPE, [f"checkpoint.save_dir={tmp_path / 'new' / 'ck'}"]).check_output_paths()
