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
                 env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                          PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
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


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    """Every refusal is exit code 2 with a message naming the problem, before any heavy work."""
    from megatron_ratplus.checkpoint.convert_cli import main
    from megatron_ratplus.hf import write_hf_folder

    from ..hf.helpers import small_model
    model = small_model()
    good = write_hf_folder(model.state_dict(), model.config, tmp_path / "hf_ok")
    missing = write_hf_folder(model.state_dict(), model.config, tmp_path / "hf_missing")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(missing / "model.safetensors"))
    sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(missing / "model.safetensors"))
    truncated = tmp_path / "hf_truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((good / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5])
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "latest_checkpointed_iteration.txt").write_text("500")

    cases = [
        (["from-hf", str(missing), str(tmp_path / "o1")], "missing weight 'model.layers.0.mlp.up_proj.weight'"),
        (["from-hf", str(truncated), str(tmp_path / "o2")], "cannot be read as safetensors"),
        (["from-hf", str(tmp_path / "nowhere"), str(tmp_path / "o3")], "does not exist or is not a directory"),
        (["from-hf", str(tmp_path), str(tmp_path / "o4")], "holds no config.json"),
        (["from-hf", str(good), str(run_dir)], "already holds checkpoints"),
        (["from-llama", str(tmp_path / "nowhere"), str(tmp_path / "o5")], "Llama folder"),
        (["to-hf", str(tmp_path / "nothing"), str(a_file)], "is not a directory"),
        (["to-hf", str(tmp_path / "nothing"), str(tmp_path / "o6"), "--max-shard-size", "5XB"],
         "cannot parse a size"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "ratplus-convert: error: " in err and message in err and "Traceback" not in err, (argv, err)
    assert a_file.read_text() == "user data"
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest_checkpointed_iteration.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]
