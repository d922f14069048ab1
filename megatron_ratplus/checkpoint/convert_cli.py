"""``ratplus-convert``: Megatron dist checkpoints <-> Hugging Face folders, and Llama imports.

    ratplus-convert to-hf   CKPT OUT_DIR [--tokenizer tokenizer.json|DATASET_DIR] [--eos-token TOKEN]
                            [--attention-mode dense|sparse] [--dtype bf16]
    ratplus-convert from-hf HF_DIR SAVE_DIR
    ratplus-convert from-llama LLAMA_DIR SAVE_DIR [--recurrence] [--gate-init auto|zeros|...]

``CKPT`` is a save directory (its latest complete checkpoint) or an ``iter_*`` directory, saved
at any TP/PP layout: it is loaded into a TP=1/PP=1 model in this process (dist_checkpointing
reshards), then mapped to the Hugging Face names documented in ``hf/modeling_ratplus.py``. The
output folder loads with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
Existing output directories are never overwritten unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..warning_filters import hide_in_child_processes
from .errors import CheckpointError
from .paths import TRACKER_NAME

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConvertError(ValueError):
    pass


def _tokenizer_from_run_config(train_state: Optional[dict], ckpt: str) -> Optional[Path]:
    """The dataset's tokenizer.json, found through the run config stored in the checkpoint. A
    relative data path was relative to the training's working directory, which is not recorded:
    it is tried against this directory, then against each folder above the checkpoint (a run's
    save_dir usually lies below the directory it was started from)."""
    run = (train_state or {}).get("run_config") or {}
    data = run.get("data") or {}
    candidates = [s.get("local") for s in data.get("streams") or [] if isinstance(s, dict)]
    if data.get("default_corpus") and not data.get("streams"):
        candidates.append(data.get("default_dir"))
    bases = [Path.cwd()] + list(Path(ckpt).resolve().parents)
    for directory in filter(None, candidates):
        for base in ([Path()] if Path(directory).is_absolute() else bases):
            if (base / directory / "tokenizer.json").is_file():
                return base / directory / "tokenizer.json"
    return None


def _resolve_tokenizer(arg: Optional[str], train_state: Optional[dict], ckpt: str) -> Optional[Path]:
    if arg:
        path = Path(arg)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConvertError(f"--tokenizer {arg}: no tokenizer.json there")
        return path
    return _tokenizer_from_run_config(train_state, ckpt)


def _document_end(tokenizer_json: Path, eos_token: Optional[str]) -> Optional[Tuple[int, str]]:
    """``(id, token)`` that ends a document, so generation stops there: the prepared dataset's
    manifest beside the tokenizer records the one training used; else ``eos_token``, a
    ``tokenizer_config.json`` beside it or a usual EOS name. None when nothing matches."""
    from ..data.manifest import read_manifest
    from ..data.tokenizer import load_tokenizer_info

    if eos_token is None:
        try:
            manifest = read_manifest(tokenizer_json.parent)
            return manifest.eos_id, manifest.eos_token
        except (ValueError, OSError):
            pass                           # not a prepared dataset: look at the tokenizer itself
    try:
        info = load_tokenizer_info(tokenizer_json, eos_token=eos_token)
    except ValueError as exc:
        if eos_token is not None:
            raise ConvertError(f"--eos-token: {exc}") from exc
        return None
    return info.eos_id, info.eos_token


def _trained_attention_mode(train_state: Optional[dict]) -> Optional[str]:
    """``"sparse"`` for a checkpoint trained only in sparse mode (the resolution adaptation), so
    its export runs the pattern it was adapted to; None (the model's own mode) otherwise."""
    train = ((train_state or {}).get("run_config") or {}).get("train") or {}
    return "sparse" if train.get("joint") is False and train.get("mode") == "sparse" else None


def _model_type(folder: str) -> Optional[str]:
    """``model_type`` of a Hugging Face folder's config.json (None when it has none or is unreadable:
    transformers then names the problem)."""
    try:
        return json.loads(Path(folder, "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _require_dir(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise ConvertError(f"{what} {path} does not exist or is not a directory")


def to_hf(ckpt: str, out_dir: str, *, tokenizer: Optional[str] = None, dtype: str = "fp32",
          overwrite: bool = False, max_shard_size: str = "5GB", eos_token: Optional[str] = None,
          attention_mode: Optional[str] = None) -> Path:
    from ..hf import hf_config_from_model_args, megatron_to_hf_state_dict, write_hf_folder
    from ..model.config import pad_vocab_size
    from .hf_bridge import load_full_state_dict, read_train_state

    from ..hf.export import parse_size

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out_dir} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out_dir} is not empty; choose another directory or pass --overwrite")
    if out.is_dir() and ((out / TRACKER_NAME).exists() or any(out.glob("iter_*"))):
        raise ConvertError(f"{out_dir} holds Megatron checkpoints; write the Hugging Face folder elsewhere")
    parse_size(max_shard_size)           # a bad --max-shard-size fails before the checkpoint is read
    model_args, state_dict = load_full_state_dict(ckpt)
    train_state = read_train_state(ckpt)
    cfg = hf_config_from_model_args(model_args, padded_vocab_size=pad_vocab_size(model_args["vocab_size"]))
    mode = attention_mode or _trained_attention_mode(train_state)
    if mode is not None:
        cfg.attention_mode = mode
    hf_sd = megatron_to_hf_state_dict(state_dict, cfg)
    tok = _resolve_tokenizer(tokenizer, train_state, ckpt)
    tokenizer_kwargs = None
    if tok is None:
        if eos_token is not None:
            raise ConvertError("--eos-token needs a tokenizer (give --tokenizer)")
        print("WARNING: the dataset named in the checkpoint's run config has no tokenizer.json here or above "
              "the checkpoint; writing the model WITHOUT a tokenizer (give --tokenizer DATASET_DIR)",
              file=sys.stderr)
    else:
        end = _document_end(tok, eos_token)
        if end is None:
            print(f"note: {tok} names no end-of-document token (give --eos-token); generation will not "
                  f"stop at one", file=sys.stderr)
        else:
            cfg.eos_token_id = end[0]
            tokenizer_kwargs = {"eos_token": end[1]}
    return write_hf_folder(hf_sd, cfg, out_dir, tokenizer_json=tok, max_shard_size=max_shard_size,
                           overwrite=overwrite, dtype=_DTYPES[dtype], tokenizer_kwargs=tokenizer_kwargs)


def from_hf(hf_dir: str, save_dir: str) -> Path:
    from ..hf import hf_to_megatron_state_dict, model_args_dict_from_hf_config, read_hf_folder
    from ..model.config import pad_vocab_size
    from .hf_bridge import check_import_target, save_full_state_dict

    _require_dir(hf_dir, "Hugging Face folder")
    check_import_target(Path(save_dir))
    hf_sd, cfg = read_hf_folder(hf_dir)
    args = model_args_dict_from_hf_config(cfg)
    sd = hf_to_megatron_state_dict(hf_sd, cfg, padded_vocab_size=pad_vocab_size(args["vocab_size"]))
    return save_full_state_dict(args, sd, save_dir)


def _calibration_ids(llama_dir: str, text_file: Optional[str], tokens: int = 2048, seq: int = 256):
    """A ``[B, seq]`` batch of the Llama tokenizer's ids for the calibrated gate init."""
    if not text_file:
        return None
    if not Path(text_file).is_file():
        raise ConvertError(f"--calibration-text {text_file} does not exist")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(llama_dir, local_files_only=True)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ConvertError(f"--calibration-text needs the Llama folder's tokenizer, which did not load from "
                           f"{llama_dir}: {exc}") from exc
    ids = tok(Path(text_file).read_text(errors="replace"))["input_ids"][:tokens]
    if len(ids) < seq:
        raise ConvertError(f"--calibration-text {text_file} gives {len(ids)} tokens; need at least {seq}")
    n = len(ids) // seq
    return torch.tensor(ids[:n * seq]).view(n, seq)


def from_llama(llama_dir: str, save_dir: str, *, recurrence: bool, gate_init: str,
               calibration_text: Optional[str] = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..hf import hf_to_megatron_state_dict, llama_to_ratplus, model_args_dict_from_hf_config
    from ..model.config import pad_vocab_size
    from .hf_bridge import check_import_target, save_full_state_dict

    _require_dir(llama_dir, "Llama folder")
    if _model_type(llama_dir) == "ratplus":     # else transformers asks to run its remote code
        raise ConvertError(f"{llama_dir} is a RAT+ Hugging Face folder: import it with from-hf")
    check_import_target(Path(save_dir))
    config = AutoConfig.from_pretrained(llama_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True).float()
    hf_sd, cfg = llama_to_ratplus(model.state_dict(), config, recurrence=recurrence, gate_init=gate_init,
                                  calibration_ids=_calibration_ids(llama_dir, calibration_text))
    args = model_args_dict_from_hf_config(cfg)
    sd = hf_to_megatron_state_dict(hf_sd, cfg, padded_vocab_size=pad_vocab_size(args["vocab_size"]))
    return save_full_state_dict(args, sd, save_dir)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratplus-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-hf", help="Megatron dist checkpoint -> Hugging Face folder")
    a.add_argument("checkpoint", help="save directory (latest) or iter_* directory")
    a.add_argument("output")
    a.add_argument("--tokenizer", help="tokenizer.json or a prepared dataset directory "
                                       "(default: the dataset named in the checkpoint's run config)")
    a.add_argument("--eos-token", help="the token that ends a document (default: the dataset manifest's, "
                                       "else tokenizer_config.json's or a usual EOS name)")
    a.add_argument("--attention-mode", choices=("dense", "sparse"),
                   help="the mode the exported model starts in (default: sparse for a checkpoint trained "
                        "only in sparse mode, such as a resolution adaptation, else the model's)")
    a.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="weights' dtype (default fp32)")
    a.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    a.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output directory (an earlier export's files are replaced, others kept)")
    b = sub.add_parser("from-hf", help="Hugging Face RAT+ folder -> Megatron checkpoint")
    b.add_argument("hf_dir")
    b.add_argument("save_dir")
    c = sub.add_parser("from-llama", help="Llama-style HF checkpoint -> RAT+ Megatron checkpoint")
    c.add_argument("llama_dir")
    c.add_argument("save_dir")
    c.add_argument("--recurrence", action="store_true", help="add the recurrence (gate initialised by --gate-init)")
    c.add_argument("--gate-init", default="auto",
                   help="auto | calibrated | zeros | zeros-kv2 | normal (see hf/conversion.py); auto = "
                        "calibrated when --calibration-text is given, else zeros")
    c.add_argument("--calibration-text", help="a text file of typical data for the calibrated gate init")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    hide_in_child_processes()
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "to-hf":
            out = to_hf(ns.checkpoint, ns.output, tokenizer=ns.tokenizer, dtype=ns.dtype,
                        overwrite=ns.overwrite, max_shard_size=ns.max_shard_size, eos_token=ns.eos_token,
                        attention_mode=ns.attention_mode)
        elif ns.command == "from-hf":
            out = from_hf(ns.hf_dir, ns.save_dir)
        else:
            out = from_llama(ns.llama_dir, ns.save_dir, recurrence=ns.recurrence, gate_init=ns.gate_init,
                             calibration_text=ns.calibration_text)
    except (ConvertError, ValueError, OSError, CheckpointError) as e:   # OSError: paths, unreadable files
        print(f"ratplus-convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"written": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
