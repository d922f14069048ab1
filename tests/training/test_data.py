"""TrainingData: reader placement, and what it refuses before the first step."""
import pytest
import torch

from megatron_ratplus.training.config import ConfigError
from megatron_ratplus.training.data import TrainingData, readers_per_node_from_hosts


@pytest.mark.parametrize("hosts,expected", [
    (["a"], 1),
    (["a"] * 4, 4),                       # PP>1 on Megatron's rank order: every reader on the first node
    (["a", "a", "b", "b"], 2),
    (["a", "b", "c"], 1),
])
def test_readers_per_node_from_their_hosts(hosts, expected):
    assert readers_per_node_from_hosts(hosts) == expected


@pytest.mark.parametrize("hosts", [["a", "b", "a", "b"], ["a", "a", "a", "b"]])
def test_readers_that_streaming_cannot_describe_are_refused(hosts):
    with pytest.raises(ConfigError, match="equal contiguous blocks .*data.readers_per_node"):
        readers_per_node_from_hosts(hosts)


def build(streams, **kwargs):
    return TrainingData(streams, seq_len=64, micro_batch_size=2, seed=0, device=torch.device("cpu"), **kwargs)


def test_datasets_are_checked_against_the_model_and_each_other(megatron_single_process, tiny_dataset,
                                                             tmp_path):
    from megatron_ratplus.data import prepare_default_dataset
    local = [{"local": str(tiny_dataset)}]
    data = build(local, vocab_size=512, eval_micro_batches=1)
    assert len(data.val_loader) >= 1 and data.validation_microbatches(1)[0].shape == (2, 65)

    # A remote-only stream is checked against the model's vocabulary too (its manifest is fetched).
    remote = [{"remote": str(tiny_dataset)}]
    with pytest.raises(ConfigError, match="tokenizer has 512 tokens .*model's vocab_size is 100"):
        build(remote, vocab_size=100, cache_dir=str(tmp_path / "cache"))

    other = tmp_path / "other"
    prepare_default_dataset(other, seq_len=64, vocab_size=300, size_mb=0.3, seed=7)
    with pytest.raises(ConfigError, match="validation data .* another tokenizer"):
        build(local, val_streams=[{"local": str(other)}], vocab_size=512)
    # A foreign tokenizer larger than the model's vocabulary: the mismatch is reported, not the vocabulary.
    larger = tmp_path / "larger"
    prepare_default_dataset(larger, seq_len=64, vocab_size=700, size_mb=0.3, seed=7)
    with pytest.raises(ConfigError, match="validation data .* another tokenizer"):
        build(local, val_streams=[{"local": str(larger)}], vocab_size=512)

    with pytest.raises(ConfigError, match=r"logging.eval_iters global batches, 100000 micro-batches per "
                                          r"data-parallel rank, but the validation split gives \d+ per rank"):
        build(local, vocab_size=512, eval_micro_batches=100_000)


def test_a_stream_that_is_not_a_dataset_is_a_config_error(megatron_single_process, tmp_path):
    """A data.streams path with a typo, or a folder of raw text instead of a prepared dataset, is refused
    on every rank with its message (a ConfigError: ratplus-pretrain exits 2). The reader's
    FileNotFoundError had escaped the every-rank refusal: a traceback on the readers while their
    model-parallel peers waited in the collective."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match="raw has no manifest.json: not a dataset prepared by"):
        build([{"local": str(tmp_path / "raw")}], vocab_size=512)
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        build([{"local": str(tmp_path / "nowhere")}], vocab_size=512)


def test_resuming_over_other_data_is_a_config_error_with_a_way_out(megatron_single_process, tiny_dataset,
                                                                    tmp_path):
    from megatron_ratplus.data import prepare_default_dataset
    data = build([{"local": str(tiny_dataset)}], vocab_size=512)
    data.next_microbatches(1)
    state = data.state_dict()
    other = tmp_path / "other"
    prepare_default_dataset(other, seq_len=64, vocab_size=512, size_mb=0.3, seed=7)
    with pytest.raises(ConfigError, match="data position does not fit .*checkpoint.init_from"):
        build([{"local": str(other)}], vocab_size=512).load_state_dict(state)


def test_a_default_dir_holding_another_dataset_is_a_config_error(megatron_single_process, tiny_dataset):
    from megatron_ratplus.training.config import load_config
    from megatron_ratplus.training.data import resolve_streams
    cfg = load_config("recipes/tiny-cpu.yaml", [f"data.default_dir={tiny_dataset}", "data.default_size_mb=0.2",
                                                "data.default_vocab_size=512"])
    with pytest.raises(ConfigError, match=rf"data.default_dir: {tiny_dataset} already holds a different dataset"):
        resolve_streams(cfg, seq_len=64)


def test_verify_shards_stops_the_run_naming_a_damaged_shard(megatron_single_process, tiny_dataset, tmp_path):
    """``data.verify_shards``: a shard damaged in place (same size) is named before the first step; without
    the option the loader is built (streaming would only notice when it decompresses that shard)."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = sorted((copy / "val").glob("shard.*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    build([{"local": str(copy)}], vocab_size=512)
    with pytest.raises(ConfigError, match=rf"split 'val'.*{shard.name}"):
        build([{"local": str(copy)}], vocab_size=512, verify_shards=True)


def test_validation_reads_the_first_samples_in_storage_order_and_training_is_shuffled(megatron_single_process,
                                                                                       tiny_dataset):
    """Every evaluation sees the validation split's first samples, unshuffled (so evaluations are
    comparable and cover the first eval_iters × global_batch_size samples); training is shuffled."""
    from streaming import StreamingDataset

    data = build([{"local": str(tiny_dataset)}], vocab_size=512, eval_micro_batches=2)

    def stored(split, n):
        ds = StreamingDataset(local=str(tiny_dataset), split=split, shuffle=False, batch_size=1)
        return [ds[i]["tokens"].tolist() for i in range(n)]

    first = [b.tolist() for b in data.validation_microbatches(2)]
    assert [row for b in first for row in b] == stored("val", 4)
    data.next_microbatches(3)
    assert [b.tolist() for b in data.validation_microbatches(2)] == first
    train = [row for b in data.next_microbatches(4) for row in b.tolist()]
    assert train != stored("train", 14)[6:14]
