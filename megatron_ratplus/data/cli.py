"""``ratplus-data``: prepare MDS token shards, build the default corpus, inspect a dataset.

    ratplus-data prepare INPUT... --output DIR --seq-len 4096 --tokenizer llama2/tokenizer.json
    ratplus-data prepare INPUT... --output DIR --seq-len 1024 --train-tokenizer --vocab-size 32000
    ratplus-data default-corpus --output DIR --seq-len 1024 --vocab-size 8192 [--size-mb 3 --seed 1234]
    ratplus-data default-corpus --text-out corpus.jsonl [--size-mb 3 --seed 1234]
    ratplus-data inspect DIR [--verify] [--json]
    ratplus-data validate DIR             (every shard file against its recorded hash; = inspect --verify)
    ratplus-data clean-shm [--force]      (streaming leftovers of crashed jobs; idle nodes only)

Errors in the inputs or arguments print one line naming the problem and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise text files into MDS shards of packed samples",
                       description="Tokenise .txt / .jsonl / .parquet inputs (files or directories) into MDS "
                                   "shards of samples of exactly seq_len + 1 tokens (documents joined by EOS).")
    p.add_argument("inputs", nargs="+", help="files or directories (searched recursively)")
    p.add_argument("--output", "-o", required=True, help="dataset directory to create")
    p.add_argument("--seq-len", type=int, required=True, help="model sequence length (samples hold seq_len + 1)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the inputs")
    p.add_argument("--vocab-size", type=int, help="vocabulary size for --train-tokenizer")
    p.add_argument("--eos-token", help="the token that ends a document (default: from the tokenizer)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl records / .parquet column (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents in val (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: the CPU cores, at most 32)")
    p.add_argument("--compression", default="zstd", help="shard compression: zstd (default) or none")
    p.add_argument("--shard-size", default="64mb", help="uncompressed shard size limit (default 64mb)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --output (only its own files are deleted)")


def _add_default(sub) -> None:
    p = sub.add_parser("default-corpus", help="the embedded default corpus (Python sources on this machine)",
                       description="Select the default corpus (the .py sources of the standard library, then of "
                                   "installed packages; deterministic given --seed) and write it as JSONL "
                                   "(--text-out) and/or prepare it as a dataset with a BPE trained on it (--output).")
    p.add_argument("--output", "-o", help="prepare the dataset in this directory (reused if identical)")
    p.add_argument("--text-out", help="write the corpus as JSONL here")
    p.add_argument("--size-mb", type=float, default=3.0, help="megabytes of text (default 3)")
    p.add_argument("--seed", type=int, default=1234, help="corpus sampling seed (default 1234)")
    p.add_argument("--seq-len", type=int, help="with --output")
    p.add_argument("--vocab-size", type=int, help="with --output: BPE vocabulary size")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of documents (files) in val (default 0.05, at least two documents)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --output: tokeniser processes (default: the CPU cores, at most 32)")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a dataset's manifest and counts")
    p.add_argument("directory")
    p.add_argument("--verify", action="store_true", help="check every shard file against its recorded hash")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check every shard file against the hash recorded when it was written",
                       description="Read every shard file of the dataset and compare it with the size and hash "
                                   "(xxh64) that its split's index.json records, and tokenizer.json with the "
                                   "manifest's sha256. Prints one line per damaged file; exit status 1 if any.")
    p.add_argument("directory")


def _add_clean(sub) -> None:
    p = sub.add_parser("clean-shm", help="remove streaming's leftover shared memory and lock files on this node",
                       description="Remove the shared memory (/dev/shm/NNNNNN_*) and lock files (TMPDIR/NNNNNN_*_filelock) "
                                   "that mosaicml-streaming leaves after crashed jobs. Only on an idle node: it also "
                                   "removes those of running jobs.")
    p.add_argument("--force", action="store_true", help="really delete (otherwise only list)")


def _cmd_clean(args) -> int:
    from .housekeeping import clean_streaming_leftovers

    shm, locks = clean_streaming_leftovers(dry_run=not args.force)
    verb = "removed" if args.force else "would remove (pass --force; only when no streaming job runs here)"
    print(f"{verb}: {len(shm)} shared-memory objects, {len(locks)} lock files")
    return 0


def _cmd_prepare(args) -> int:
    from .prepare import prepare_dataset

    if args.train_tokenizer and not args.vocab_size:
        raise ValueError("--train-tokenizer needs --vocab-size")
    if args.tokenizer and args.vocab_size:
        raise ValueError("--vocab-size goes with --train-tokenizer; a given tokenizer.json has its own vocabulary")
    result = prepare_dataset(
        args.inputs, args.output, seq_len=args.seq_len, tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        workers=args.workers, compression=args.compression, text_field=args.text_field,
        eos_token=args.eos_token, overwrite=args.overwrite, shard_size=args.shard_size, log=_log)
    _print_summary(result.manifest)
    print(f"prepared in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s with "
          f"{result.workers} worker(s))")
    return 0


def _cmd_default(args) -> int:
    if not args.output and not args.text_out:
        raise ValueError("give --output (prepare the dataset) and/or --text-out (write the corpus as JSONL)")
    if args.text_out:
        from .corpus import write_default_corpus_jsonl

        path = write_default_corpus_jsonl(args.text_out, size_mb=args.size_mb, seed=args.seed)
        print(f"wrote the default corpus to {path}")
    if args.output:
        if not args.seq_len or not args.vocab_size:
            raise ValueError("--output needs --seq-len and --vocab-size")
        from .default import prepare_default_dataset
        from .manifest import read_manifest

        path = prepare_default_dataset(args.output, seq_len=args.seq_len, vocab_size=args.vocab_size,
                                       size_mb=args.size_mb, seed=args.seed, workers=args.workers,
                                       val_fraction=args.val_fraction, log=_log)
        _print_summary(read_manifest(path))
    return 0


def _print_summary(m) -> None:
    print(f"dataset        {m.path}")
    print(f"tokenizer      {m.tokenizer_path} (sha256 {m.tokenizer_sha256[:16]}..., vocab {m.vocab_size}, "
          f"eos {m.eos_token!r} = {m.eos_id})")
    print(f"samples        seq_len {m.seq_len} (+1 = {m.seq_len + 1} tokens, {m.dtype}), "
          f"compression {m.compression or 'none'}, hashes {', '.join(m.hashes)}")
    for name, s in m.splits.items():
        print(f"{name:<14} {s.documents:>10,} documents {s.tokens:>14,} tokens {s.samples:>11,} samples "
              f"{s.shards:>5} shards (unused tail {s.unused_tail_tokens} tokens)")
    inputs = m.inputs
    skipped = [f"{k.replace('_', ' ')} {inputs[k]}" for k in
               ("undecodable_bytes", "bad_json_lines", "missing_text_field", "empty_documents") if inputs.get(k)]
    print(f"inputs         {inputs.get('files', '?')} files, {inputs.get('bytes', 0) / 1e6:.1f} MB"
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    for problem in inputs.get("problems", [])[:5]:
        print(f"               {problem}")
    if m.params:
        print(f"params         {json.dumps(m.params, sort_keys=True)}")


def _verify(directory) -> int:
    """Print what verification finds; 1 if anything is damaged or missing."""
    from .integrity import verify_shards

    check = verify_shards(directory)
    for p in check.problems:
        print(f"CORRUPT  {p}")
    hashed = ", ".join(f"{n} by {algo}" for algo, n in sorted(check.hashed.items()))
    if check.size_only:
        print(f"note: {check.size_only} of {check.files} shard files have no recorded hash (prepared without "
              f"hashes): checked for size only; prepare the dataset again to get hashes")
    summary = f"{check.files} shard files checked" + (f" ({hashed})" if hashed else "")
    print(f"verify: OK, {summary}" if not check.problems else f"verify: {len(check.problems)} problem(s); {summary}")
    return 1 if check.problems else 0


def _cmd_validate(args) -> int:
    return _verify(args.directory)


def _cmd_inspect(args) -> int:
    from .manifest import read_manifest

    m = read_manifest(args.directory)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        _print_summary(m)
        for split in m.splits:
            files = sorted((Path(args.directory) / split).glob("shard.*"))
            print(f"{split + '/':<14} {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB on disk")
    if args.verify:
        return _verify(args.directory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratplus-data", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_default(sub)
    _add_inspect(sub)
    _add_validate(sub)
    _add_clean(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"prepare": _cmd_prepare, "default-corpus": _cmd_default, "inspect": _cmd_inspect,
                "validate": _cmd_validate, "clean-shm": _cmd_clean}
    try:
        return commands[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"ratplus-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
