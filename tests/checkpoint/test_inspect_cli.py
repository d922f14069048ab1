"""ratplus-ckpt inspect / list on real checkpoints, and clear errors (exit 2) on bad ones."""
import json
import shutil
import subprocess
import sys

import pytest

from megatron_ratplus.checkpoint import CheckpointManager
from megatron_ratplus.checkpoint.inspect_cli import main

from ..torchrun import REPO
from .helpers import build, run_config, train_step


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory, megatron_world):
    path = tmp_path_factory.mktemp("inspect") / "ckpt"
    cfg = run_config()
    objs = build(cfg)
    mgr = CheckpointManager(path)
    for step in (5, 7):
        train_step(objs, step)
        mgr.save(step, objs.model, objs.optimizer, objs.scheduler,
                 {"step": step, "consumed_tokens": step * 64, "run_config": cfg.to_dict(),
                  "model_args": objs.model_args.to_dict()})
    return path


def test_inspect_text(save_dir, capsys):
    assert main(["inspect", str(save_dir)]) == 0
    out = capsys.readouterr().out
    assert "iter_0000007" in out
    assert "iteration        7" in out
    assert "tokens consumed  448" in out
    assert "saved layout     TP=1 PP=1 DP=1 (world size 1)" in out
    assert "num_layers = 4" in out and "train.lr = 0.003" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["decoder.layers.self_attention.linear_in.weight", "(4,", "320,", "64)", "float32"] in lines
    assert ["embedding.word_embeddings.weight", "(128,", "64)", "float32"] in lines
    assert any(parts and parts[0] == "optimizer.state.exp_avg.output_layer.weight" for parts in lines)


def test_inspect_json_of_an_iter_dir(save_dir, capsys):
    assert main(["inspect", str(save_dir / "iter_0000005"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["iteration"] == 5 and d["consumed_tokens"] == 320
    assert d["model_args"]["hidden_size"] == 64 and d["run_config"]["train"]["seq_len"] == 16
    tensors = {t["name"]: t for t in d["tensors"]}
    assert tensors["decoder.layers.mlp.linear_fc1.weight"] == {
        "name": "decoder.layers.mlp.linear_fc1.weight", "shape": [4, 256, 64], "dtype": "float32"}
    assert d["optimizer"] == "plain" and d["has_scheduler_state"]


def test_list_shows_complete_and_incomplete(save_dir, tmp_path, capsys):
    target = tmp_path / "ckpt"
    shutil.copytree(save_dir, target)
    shutil.copytree(save_dir / "iter_0000007", target / "iter_0000009")
    (target / "iter_0000009" / "metadata.json").unlink()
    assert main(["list", str(target)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("iter_")}
    assert set(rows) == {"iter_0000005", "iter_0000007", "iter_0000009"}
    assert "complete" in rows["iter_0000005"] and "tokens=320" in rows["iter_0000005"]
    assert "<- latest" in rows["iter_0000007"]
    assert "INCOMPLETE" in rows["iter_0000009"] and "metadata.json" in rows["iter_0000009"]
    assert main(["list", str(target), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(c["iteration"], c["complete"]) for c in listing["checkpoints"]] == \
        [(5, True), (7, True), (9, False)]
    assert listing["tracker"] == 7


def test_errors_exit_2(save_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "iter_0000001"
    shutil.copytree(save_dir / "iter_0000005", broken)
    shard = max(broken.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "incomplete or corrupt" in err and "truncated" in err
    (tmp_path / "not-a-ckpt").mkdir()
    assert main(["inspect", str(tmp_path / "not-a-ckpt")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert main(["list", str(tmp_path / "missing")]) == 2
    assert main(["list", str(broken)]) == 2
    assert "use 'ratplus-ckpt inspect" in capsys.readouterr().err


def test_command_line_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_ratplus.checkpoint.inspect_cli", "inspect",
                           str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "ratplus-ckpt: error:" in proc.stderr and "does not exist" in proc.stderr
