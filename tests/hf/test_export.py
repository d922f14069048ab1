"""write_hf_folder -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True), offline."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_ratplus.hf import read_hf_folder, write_hf_folder
from megatron_ratplus.hf.export import parse_size

from .helpers import small_model, tokens


def make_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def forward(self, x):\n    return self.proj(x) + x\n" * 4,
            "the quick brown fox jumps over the lazy dog " * 4]
    trainer = trainers.BpeTrainer(vocab_size=61, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return path


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("5 parsecs")


def test_folder_loads_offline_with_trust_remote_code(tmp_path):
    model = small_model(dilation=[4, 1], local_window=2, initial_tokens=1, attention_mode="sparse",
                        hidden_act="silu", bos_token_id=1, eos_token_id=2)
    out = tmp_path / "export"
    tok_json = make_tokenizer_json(tmp_path / "tokenizer.json")
    write_hf_folder(model.state_dict(), model.config, out, tokenizer_json=tok_json, max_shard_size=30_000,
                    tokenizer_kwargs=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"))
    files = set(os.listdir(out))
    assert {"config.json", "configuration_ratplus.py", "modeling_ratplus.py", "generation_config.json",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= files
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1                                   # sharded at 30 kB
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ratplus.RATPlusForCausalLM"
    assert cfg["model_type"] == "ratplus" and cfg["architectures"] == ["RATPlusForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    sd, rcfg = read_hf_folder(out)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert rcfg.dilation == [4, 1] and rcfg.attention_mode == "sparse"

    ids = tokens(2, 17)
    with torch.no_grad():
        want = model(ids).logits
    torch.save({"ids": ids, "logits": want,
                "gen": model.generate(ids[:1, :5], max_new_tokens=12, do_sample=False)}, tmp_path / "expected.pt")
    # A fresh process, offline, that knows nothing of megatron_ratplus: only the folder.
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "RATPlusForCausalLM", type(model)
        assert "megatron_ratplus" not in sys.modules and "megatron_ratplus" not in type(model).__module__
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            got = model(exp["ids"]).logits
        torch.testing.assert_close(got, exp["logits"], rtol=1e-6, atol=1e-6)
        gen = model.generate(exp["ids"][:1, :5], max_new_tokens=12, do_sample=False)
        assert torch.equal(gen, exp["gen"]), (gen, exp["gen"])
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        assert tok.eos_token == "</s>" and tok.decode(tok("def forward(x)")["input_ids"]) == "def forward(x)"
        print("LOADED-OK")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "LOADED-OK" in res.stdout, res.stderr[-3000:]


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    model = small_model()
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_hf_folder(model.state_dict(), model.config, out)
    write_hf_folder(model.state_dict(), model.config, out, max_shard_size=30_000, overwrite=True)
    assert (out / "model.safetensors.index.json").exists()
    write_hf_folder(model.state_dict(), model.config, out, overwrite=True)          # one file now
    assert (out / "model.safetensors").exists() and (out / "notes.txt").exists()
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    sd, _ = read_hf_folder(out)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_state_dict_must_match_config(tmp_path):
    model = small_model()
    sd = dict(model.state_dict())
    sd.pop("model.layers.0.self_attn.recurrence_gate_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        write_hf_folder(sd, model.config, tmp_path / "y")


def test_bf16_export(tmp_path):
    model = small_model()
    write_hf_folder(model.state_dict(), model.config, tmp_path / "b", dtype=torch.bfloat16)
    sd, cfg = read_hf_folder(tmp_path / "b")
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "b" / "config.json").read_text()).get("torch_dtype", json.loads(
        (tmp_path / "b" / "config.json").read_text()).get("dtype")) == "bfloat16"


def test_shards_are_sized_in_the_exported_dtype(tmp_path):
    """max_shard_size limits the files as written: a bf16 export of fp32 weights that fits one
    shard in bf16 is one model.safetensors, and its shards are filled up to the limit."""
    model = small_model()
    bf16_bytes = sum(t.numel() * 2 for t in model.state_dict().values())
    out = write_hf_folder(model.state_dict(), model.config, tmp_path / "one", dtype=torch.bfloat16,
                          max_shard_size=bf16_bytes)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    out = write_hf_folder(model.state_dict(), model.config, tmp_path / "two", dtype=torch.bfloat16,
                          max_shard_size=bf16_bytes // 2 + 4096)
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 2


def test_megatron_padding_rows_are_suppressed_in_generation(tmp_path):
    """An export that keeps Megatron's padding rows never generates their ids."""
    from megatron_ratplus.hf import RATPlusForCausalLM
    model = small_model()
    cfg = type(model.config).from_dict({**model.config.to_dict(), "unpadded_vocab_size": 40})
    write_hf_folder(model.state_dict(), cfg, tmp_path / "p")
    gen = json.loads((tmp_path / "p" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(40, cfg.vocab_size))
    loaded = RATPlusForCausalLM.from_pretrained(tmp_path / "p").eval()
    out = loaded.generate(tokens(1, 5), max_new_tokens=6, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    assert len(out.scores) == 6
    for scores in out.scores:
        assert torch.isneginf(scores[:, 40:]).all() and torch.isfinite(scores[:, :40]).all()


def test_overwrite_is_checked_first_and_replaces_every_file_of_the_old_export(tmp_path):
    model = small_model()
    out = tmp_path / "x"
    write_hf_folder(model.state_dict(), model.config, out, tokenizer_json=make_tokenizer_json(tmp_path / "t.json"))
    (out / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "tokenizer.json" in before
    # A refused export (state dict not matching the config) leaves the previous one intact.
    broken = dict(model.state_dict())
    broken.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing"):
        write_hf_folder(broken, model.config, out, overwrite=True)
    with pytest.raises(ValueError, match="cannot parse a size"):
        write_hf_folder(model.state_dict(), model.config, out, overwrite=True, max_shard_size="5XB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Re-exported without a tokenizer: the old tokenizer files go, the user's file stays.
    write_hf_folder(model.state_dict(), model.config, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and not names & {"tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    with pytest.raises(NotADirectoryError):
        write_hf_folder(model.state_dict(), model.config, out / "notes.txt", overwrite=True)


def test_exported_tokenizer_feeds_generate_directly(tmp_path):
    """generate(**tok(text)) works: the tokenizer returns no token_type_ids the model would refuse,
    and its EOS is the one given."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tokenizer_json = make_tokenizer_json(tmp_path / "t.json")
    model = small_model(vocab_size=Tokenizer.from_file(str(tokenizer_json)).get_vocab_size())
    out = write_hf_folder(model.state_dict(), model.config, tmp_path / "x", tokenizer_json=tokenizer_json,
                          tokenizer_kwargs={"eos_token": "</s>"})
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok("def forward(self, x):", return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"} and tok.eos_token == "</s>"
    got = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert got.shape[1] == batch["input_ids"].shape[1] + 3


def test_overwrite_keeps_files_the_export_does_not_own(tmp_path):
    """Only the previous export's weights (model.safetensors, the index and its shards) are
    replaced: a user's model-ema.safetensors beside them stays."""
    model = small_model()
    out = tmp_path / "x"
    write_hf_folder(model.state_dict(), model.config, out, max_shard_size=4000)
    old_shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    (out / "model-ema.safetensors").write_bytes(b"user weights")
    write_hf_folder(model.state_dict(), model.config, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert (out / "model-ema.safetensors").read_bytes() == b"user weights"
    assert "model.safetensors" in names and not names & set(old_shards)
    assert "model.safetensors.index.json" not in names and not [n for n in names if "previous-export" in n]
    read_hf_folder(out)


@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_an_overwrite_that_fails_midway_leaves_the_previous_export(tmp_path, monkeypatch, fail_at):
    from megatron_ratplus.hf import export
    model = small_model()
    out = tmp_path / "x"
    write_hf_folder(model.state_dict(), model.config, out, tokenizer_json=make_tokenizer_json(tmp_path / "t.json"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.replace, []

    def failing_replace(src, dst):
        if ".staging-" in str(src):               # a move of the new export into place
            calls.append(src)
            if len(calls) > fail_at:
                raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_hf_folder(small_model(seed=1).state_dict(), model.config, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
