"""ratplus-convert end to end: a TP=2 training checkpoint -> HF folder -> same logits -> back."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import tiny_cli_overrides
from ..torchrun import REPO, torchrun

pytestmark = pytest.mark.slow


def _run(*cmd, env=None):
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
    return proc


def test_tp2_checkpoint_to_hf_and_back(tmp_path, tiny_dataset):
    ck = tmp_path / "ck"
    torchrun("megatron_ratplus.training.cli", *tiny_cli_overrides(tiny_dataset, tmp_path, steps=3),
             "parallel.tensor_parallel=2", f"checkpoint.save_dir={ck}", nproc=2, module=True, timeout=600)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    conv = _run("-m", "megatron_ratplus.checkpoint.convert_cli", "to-hf", str(ck), str(hf_dir))
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    assert json.loads((hf_dir / "config.json").read_text())["auto_map"]
    # The tokenizer came from the dataset named in the checkpoint's run config.
    assert (hf_dir / "tokenizer.json").read_bytes() == (Path(tiny_dataset) / "tokenizer.json").read_bytes()
    conv = _run("-m", "megatron_ratplus.checkpoint.convert_cli", "from-hf", str(hf_dir), str(back))
    assert conv.returncode == 0, conv.stderr[-3000:]
    import os
    check = _run(str(Path(__file__).with_name("convert_check.py")), str(ck), str(hf_dir), str(back),
                 env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO)))
    assert check.returncode == 0, check.stderr[-4000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    for mode in ("dense", "sparse"):
        assert result[f"max_diff_{mode}"] < 1e-4 * max(1.0, result[f"scale_{mode}"]), result
    assert result["generated"] == 8 and result["round_trip_equal"], result


def test_to_hf_refuses_non_empty_output_and_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = _run("-m", "megatron_ratplus.checkpoint.convert_cli", "to-hf", str(tmp_path / "nothing"), str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (out / "keep.txt").read_text() == "user data"
    proc = _run("-m", "megatron_ratplus.checkpoint.convert_cli", "to-hf", str(tmp_path / "nothing"),
                str(tmp_path / "fresh"))
    assert proc.returncode == 2 and "error" in proc.stderr
