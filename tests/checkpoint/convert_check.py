"""Subprocess check for test_convert_cli: an exported HF folder reproduces the Megatron model.

argv: CKPT HF_DIR BACK_CKPT. Loads the checkpoint at TP=1 (whatever layout saved it), builds the
Megatron model, compares its logits with the HF model loaded by AutoModelForCausalLM (offline,
trust_remote_code) in dense and sparse mode, checks generation runs with the compact cache, and
that the from-hf round trip gives identical tensors. Prints one JSON line.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main():
    ckpt, hf_dir, back = sys.argv[1:4]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ratplus.checkpoint.hf_bridge import build_tp1_model, load_full_state_dict
    from megatron_ratplus.model import set_attention_mode

    args, sd = load_full_state_dict(ckpt)
    model = build_tp1_model(args)
    model.load_state_dict(sd, strict=False)
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids = tok("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n", return_tensors="pt")["input_ids"][:, :48]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    out = {"vocab": args["vocab_size"], "tokens": ids.shape[1]}
    with torch.no_grad():
        for mode in ("dense", "sparse"):
            set_attention_mode(model, mode)
            hf.set_attention_mode(mode)
            mg = model(ids, pos, None)[..., :args["vocab_size"]]
            hl = hf(ids).logits[..., :args["vocab_size"]]
            out[f"max_diff_{mode}"] = (mg - hl).abs().max().item()
            out[f"scale_{mode}"] = mg.abs().max().item()
        gen = hf.generate(ids[:, :16], max_new_tokens=8, do_sample=False)
        out["generated"] = gen.shape[1] - 16
    args2, sd2 = load_full_state_dict(back)
    out["round_trip_equal"] = args2["num_layers"] == args["num_layers"] and all(
        torch.equal(sd[k], sd2[k]) for k in sd)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
