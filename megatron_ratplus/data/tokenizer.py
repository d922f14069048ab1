"""Tokenizer identity (sha256 of tokenizer.json, vocab size, EOS) and local byte-level BPE training.

Any Hugging Face ``tokenizer.json`` works (for example the LLaMA-2 tokenizer the paper recipes
assume). The EOS token is taken from ``--eos-token``, else from a ``tokenizer_config.json`` next to
the file, else from the usual names (``<|endoftext|>``, ``</s>``, ...). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EOS = "<|endoftext|>"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")
MIN_BPE_VOCAB = 257  # 256 byte symbols + EOS


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str

    def to_dict(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
        }


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {exc}") from exc


def _config_eos(path: Path) -> str | None:
    config = path.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, OSError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer_info(path: str | os.PathLike, *, eos_token: str | None = None) -> TokenizerInfo:
    """Identify a tokenizer.json (or the one in a Hugging Face model folder): its sha256,
    vocabulary size (with added tokens) and EOS id."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {path} is a directory without a tokenizer.json")
        path = path / "tokenizer.json"
    tok = _load(path)
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary of {path}")
    else:
        candidates = [c for c in (_config_eos(path),) if c] + list(EOS_CANDIDATES)
        for candidate in candidates:
            eos_id = tok.token_to_id(candidate)
            if eos_id is not None:
                eos_token = candidate
                break
        else:
            raise ValueError(
                f"cannot tell which token of {path} ends a document (none of {', '.join(EOS_CANDIDATES)}); "
                f"name it with --eos-token"
            )
    return TokenizerInfo(
        path=path,
        sha256=file_sha256(path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=int(eos_id),
        eos_token=eos_token,
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    output: str | os.PathLike,
    eos_token: str = DEFAULT_EOS,
    min_frequency: int = 2,
) -> TokenizerInfo:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) on ``texts`` and save tokenizer.json.

    ``eos_token`` is the only special token and gets id 0. Training is deterministic for the same
    texts. The vocabulary may come out smaller than ``vocab_size`` on a tiny corpus (no more
    merges to learn); the manifest records the real size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    return load_tokenizer_info(output, eos_token=eos_token)
