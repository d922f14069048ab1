"""ratplus-convert to-hf: what the export says besides the weights (end of document, start mode)."""
import json

import pytest

from megatron_ratplus.checkpoint.convert_cli import (ConvertError, _document_end, _trained_attention_mode,
                                                     from_hf, to_hf)
from megatron_ratplus.hf import write_hf_folder

from ..hf.helpers import small_model
from ..hf.test_export import make_tokenizer_json


def _dataset_dir(tmp_path, source_dataset, eos_id=2, eos_token="</s>"):
    """A tokenizer.json beside a prepared dataset's manifest (a real one, whose EOS record is
    rewritten to name a token of this tokenizer)."""
    d = tmp_path / "dataset"
    d.mkdir()
    make_tokenizer_json(d / "tokenizer.json")
    manifest = json.loads((source_dataset / "manifest.json").read_text())
    manifest["tokenizer"].update(eos_id=eos_id, eos_token=eos_token)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_document_end_comes_from_the_manifest_then_the_tokenizer(tmp_path, tiny_dataset):
    d = _dataset_dir(tmp_path, tiny_dataset, eos_id=1, eos_token="<s>")   # not a usual EOS name: the manifest's
    assert _document_end(d / "tokenizer.json", None) == (1, "<s>")
    assert _document_end(d / "tokenizer.json", "</s>") == (2, "</s>")     # named explicitly: wins
    with pytest.raises(ConvertError, match="--eos-token.*'<nope>' is not in the vocabulary"):
        _document_end(d / "tokenizer.json", "<nope>")
    bare = make_tokenizer_json(tmp_path / "bare.json")
    assert _document_end(bare, None) == (2, "</s>")                       # a usual EOS name


def test_sparse_only_training_exports_in_sparse_mode():
    def state(joint, mode):
        return {"run_config": {"train": {"joint": joint, "mode": mode}}}
    assert _trained_attention_mode(state(False, "sparse")) == "sparse"     # resolution adaptation
    assert _trained_attention_mode(state(True, "sparse")) is None           # joint: the model's own mode
    assert _trained_attention_mode(state(False, "dense")) is None
    assert _trained_attention_mode(None) is None


def test_to_hf_writes_eos_and_the_chosen_mode(tmp_path, tiny_dataset):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    d = _dataset_dir(tmp_path, tiny_dataset)
    vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
    model = small_model(vocab_size=vocab, dilation=4, local_window=2)
    ckpt = from_hf(str(write_hf_folder(model.state_dict(), model.config, tmp_path / "hf_in")), str(tmp_path / "ck"))
    out = to_hf(str(ckpt), str(tmp_path / "hf_out"), tokenizer=str(d), attention_mode="sparse")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["attention_mode"] == "sparse"
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    with pytest.raises(ConvertError, match="--eos-token needs a tokenizer"):
        to_hf(str(ckpt), str(tmp_path / "hf_none"), eos_token="</s>")


def test_to_hf_never_writes_into_a_checkpoint_directory(tmp_path):
    model = small_model()
    ckpt = from_hf(str(write_hf_folder(model.state_dict(), model.config, tmp_path / "hf_in")), str(tmp_path / "ck"))
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(ConvertError, match="holds Megatron checkpoints"):
        to_hf(str(ckpt), str(tmp_path / "ck"), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before


def test_tokenizer_of_a_relative_data_path_is_found_above_the_checkpoint(tmp_path, monkeypatch):
    """A run started in tmp_path with data.default_dir=data/ds saved to tmp_path/runs/x/ck: to-hf
    run from elsewhere still finds the tokenizer."""
    from megatron_ratplus.checkpoint.convert_cli import _tokenizer_from_run_config
    (tmp_path / "data" / "ds").mkdir(parents=True)
    make_tokenizer_json(tmp_path / "data" / "ds" / "tokenizer.json")
    ckpt = tmp_path / "runs" / "x" / "ck"
    ckpt.mkdir(parents=True)
    state = {"run_config": {"data": {"default_corpus": True, "streams": [], "default_dir": "data/ds"}}}
    monkeypatch.chdir(tmp_path / "runs")
    found = _tokenizer_from_run_config(state, str(ckpt))
    assert found is not None and found.resolve() == (tmp_path / "data" / "ds" / "tokenizer.json").resolve()
    assert _tokenizer_from_run_config({"run_config": {"data": {"streams": [{"local": "nowhere"}]}}}, str(ckpt)) is None


def test_from_llama_refuses_a_ratplus_folder_and_a_missing_calibration_text(tmp_path):
    from megatron_ratplus.checkpoint.convert_cli import _calibration_ids, from_llama
    model = small_model()
    folder = write_hf_folder(model.state_dict(), model.config, tmp_path / "hf")
    with pytest.raises(ConvertError, match="is a RAT\\+ Hugging Face folder: import it with from-hf"):
        from_llama(str(folder), str(tmp_path / "ck"), recurrence=True, gate_init="zeros")
    with pytest.raises(ConvertError, match="--calibration-text .* does not exist"):
        _calibration_ids(str(folder), str(tmp_path / "missing.txt"))
    (tmp_path / "text.txt").write_text("some text " * 100)
    with pytest.raises(ConvertError, match="needs the Llama folder's tokenizer"):
        _calibration_ids(str(folder), str(tmp_path / "text.txt"))


def test_to_hf_then_from_hf_gives_back_every_weight_of_the_checkpoint(tmp_path, megatron_world):
    """The export keeps Megatron's vocabulary padding rows (random here, as trained rows of a
    checkpoint are), so converting back restores the checkpoint exactly."""
    import torch

    from megatron_ratplus.checkpoint.hf_bridge import build_tp1_model, load_full_state_dict, save_full_state_dict
    args = dict(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=61, max_seq_len=16,
                dilation=4, local_window=1, initial_tokens=1)
    gen = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in build_tp1_model(args).state_dict().items()
          if not k.endswith("_extra_state")}
    assert sd["output_layer.weight"].shape[0] == 128           # 61 real rows, 67 padding rows
    save_full_state_dict(args, sd, tmp_path / "ck")
    from_hf(str(to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))), str(tmp_path / "back"))
    back_args, back = load_full_state_dict(tmp_path / "back")
    assert back_args["vocab_size"] == 61 and back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
