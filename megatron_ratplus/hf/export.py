"""Write and read Hugging Face folders of RAT+ models.

``write_hf_folder`` produces a folder that loads offline with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``:

* ``config.json`` with ``auto_map`` (the classes live in the copied source files) and
  ``architectures``;
* ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` when the weights exceed ``max_shard_size``;
* ``configuration_ratplus.py`` and ``modeling_ratplus.py`` (self-contained: torch + transformers);
* ``generation_config.json``;
* tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
  when a ``tokenizer.json`` is given; it is wrapped in a ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from .configuration_ratplus import RATPlusConfig

SOURCE_FILES = ("configuration_ratplus.py", "modeling_ratplus.py")
AUTO_MAP = {
    "AutoConfig": "configuration_ratplus.RATPlusConfig",
    "AutoModel": "modeling_ratplus.RATPlusModel",
    "AutoModelForCausalLM": "modeling_ratplus.RATPlusForCausalLM",
}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"`` -> 500 * 2^20; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS | {"": 1}:
        raise ValueError(f"cannot parse a size from {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS.get(m.group(2).upper(), 1))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _written_bytes(t: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    """Bytes of ``t`` in the file: floating tensors are cast to ``dtype`` when one is given."""
    if dtype is not None and t.is_floating_point():
        return t.numel() * torch.empty((), dtype=dtype).element_size()
    return t.numel() * t.element_size()


def _shard(state_dict: Mapping[str, torch.Tensor], max_bytes: int, dtype: Optional[torch.dtype] = None):
    shards, current, size = [], [], 0
    for key in sorted(state_dict):
        n = _written_bytes(state_dict[key], dtype)
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current:
        shards.append(current)
    return shards


# Files an export writes besides the weights: an overwrite replaces them all, so no file of an
# earlier export (say its tokenizer) is left beside the new weights.
_EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json") + SOURCE_FILES


def _previous_export_files(out: Path) -> list:
    """The files of an earlier export in ``out``: the fixed names above, ``model.safetensors`` and
    the index with the shards it lists. Anything else (a user's own ``model-ema.safetensors``, a
    README) is not the export's to replace."""
    names = set(_EXPORT_FILES) | {SAFE_WEIGHTS}
    index = out / SAFE_INDEX
    if index.is_file():
        names.add(SAFE_INDEX)
        try:
            names.update(str(v) for v in json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, OSError, AttributeError):
            pass                          # a damaged index: its shards stay where they are
    return sorted(out / name for name in names if "/" not in name and (out / name).is_file())


def _replace_export(out: Path, staging: Path) -> None:
    """Move the staged export into ``out``. The previous export's files are first moved aside
    into ``out/.previous-export-<pid>``; if a move fails they are moved back, and if the process
    dies in between they are still there (nothing of a previous export is deleted before the new
    one is in place)."""
    old = _previous_export_files(out)
    backup = out / f".previous-export-{os.getpid()}"
    if old:
        backup.mkdir()
    moved_in = []
    try:
        for path in old:
            os.replace(path, backup / path.name)
        for new in sorted(staging.iterdir()):
            os.replace(new, out / new.name)
            moved_in.append(out / new.name)
    except BaseException:
        for path in moved_in:
            path.unlink(missing_ok=True)
        for path in old:
            if (backup / path.name).exists():
                os.replace(backup / path.name, path)
        if old:
            backup.rmdir()
        raise
    if old:
        shutil.rmtree(backup)


def write_hf_folder(hf_state_dict: Mapping[str, torch.Tensor], hf_config: RATPlusConfig,
                    out_dir: Union[str, os.PathLike], *, tokenizer_json: Optional[Union[str, os.PathLike]] = None,
                    max_shard_size: Union[int, str] = "5GB", overwrite: bool = False,
                    tokenizer_kwargs: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a loadable Hugging Face folder; returns its path.

    Refuses a non-empty ``out_dir`` unless ``overwrite=True``. The new folder is first written
    to a staging directory beside ``out_dir``; only when that succeeded are the files of an
    earlier export (weights, config, tokenizer, sources) replaced, so a refused or failed export
    leaves the previous one intact. Other files in ``out_dir`` are kept. ``dtype`` casts
    floating tensors (e.g. ``torch.bfloat16``). ``tokenizer_kwargs`` go to
    ``PreTrainedTokenizerFast`` (e.g. ``eos_token="</s>"``).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to write into it anyway")
    missing = {k for k in _expected_keys(hf_config)} - set(hf_state_dict)
    unexpected = set(hf_state_dict) - {k for k in _expected_keys(hf_config)}
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    max_bytes = parse_size(max_shard_size)
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_json} does not exist")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        _write_folder(staging, hf_state_dict, hf_config, max_bytes=max_bytes, dtype=dtype,
                      tokenizer_json=tokenizer_json, tokenizer_kwargs=tokenizer_kwargs)
        out.mkdir(exist_ok=True)
        _replace_export(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_folder(out: Path, hf_state_dict, hf_config: RATPlusConfig, *, max_bytes: int, dtype,
                  tokenizer_json, tokenizer_kwargs) -> None:
    """The export's files in the empty directory ``out``."""
    def prepared(key):
        t = hf_state_dict[key].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to("cpu").contiguous().clone()   # clone: shards must not share storage

    shards = _shard(hf_state_dict, max_bytes, dtype)
    total = sum(_written_bytes(t, dtype) for t in hf_state_dict.values())
    if len(shards) == 1:
        save_file({k: prepared(k) for k in shards[0]}, str(out / SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: prepared(k) for k in keys}, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        (out / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2, sort_keys=True))

    config = RATPlusConfig.from_dict(hf_config.to_dict())
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["RATPlusForCausalLM"]
    first = next(iter(hf_state_dict.values()))
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # transformers >= 4.56 calls it `dtype` (and warns on `torch_dtype`); older versions `torch_dtype`
    setattr(config, "dtype" if (major, minor) >= (4, 56) else "torch_dtype", _dtype_name(dtype or first.dtype))
    config.save_pretrained(str(out))
    here = Path(__file__).resolve().parent
    for name in SOURCE_FILES:
        shutil.copyfile(here / name, out / name)

    from transformers import GenerationConfig
    # Megatron's vocabulary padding rows are no tokens: generation never picks them.
    unpadded = getattr(config, "unpadded_vocab_size", None)
    padding_ids = list(range(unpadded, config.vocab_size)) if unpadded else []
    GenerationConfig(bos_token_id=getattr(config, "bos_token_id", None),
                     eos_token_id=getattr(config, "eos_token_id", None),
                     pad_token_id=getattr(config, "pad_token_id", None),
                     suppress_tokens=padding_ids or None).save_pretrained(str(out))

    if tokenizer_json is not None:
        from transformers import PreTrainedTokenizerFast
        # the model takes no token_type_ids: without this generate(**tok(text)) refuses them
        kwargs = {"model_input_names": ["input_ids", "attention_mask"], **(tokenizer_kwargs or {})}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **kwargs)
        tok.model_max_length = config.max_position_embeddings
        tok.save_pretrained(str(out))


def _expected_keys(cfg: RATPlusConfig):
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["output_gate_proj"] if cfg.output_gate else []) \
        + (["recurrence_gate_proj"] if cfg.recurrence else [])
    mlp = ["gate_proj", "up_proj", "down_proj"] if cfg.ffn_type == "swiglu" else ["up_proj", "down_proj"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"self_attn.{n}.weight" for n in attn] + [p + f"mlp.{n}.weight" for n in mlp]
    return keys


def read_hf_folder(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], RATPlusConfig]:
    """``(state_dict, RATPlusConfig)`` of a folder written by :func:`write_hf_folder` (or by
    ``save_pretrained`` of the RAT+ model), without executing the folder's code."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/config.json is not valid JSON: {e}") from e
    if raw.get("model_type") != "ratplus":
        raise ValueError(f"{path}/config.json has model_type={raw.get('model_type')!r}, expected 'ratplus'")
    config = RATPlusConfig.from_dict(raw)
    if (path / SAFE_INDEX).exists():
        with open(path / SAFE_INDEX) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif (path / SAFE_WEIGHTS).exists():
        files = [SAFE_WEIGHTS]
    else:
        raise FileNotFoundError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {path}")
    sd: Dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing (listed in {SAFE_INDEX})")
        try:
            sd.update(load_file(str(path / name)))
        except Exception as e:      # safetensors raises its own SafetensorError on a damaged file
            raise ValueError(f"{path / name} cannot be read as safetensors "
                             f"({type(e).__name__}: {e})") from e
    return sd, config
