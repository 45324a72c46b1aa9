"""The seqpar command end to end on the CPU: prepare -> a 20-step train -> generate / eval / export /
from_pretrained, and the per-step log lines under torchrun (2 gloo ranks, no progress bar)."""
from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")
STEP_LINE = re.compile(r"^step (\d+) \| loss \d+\.\d+ \| lr \S+ \| grad-norm \d+\.\d+ \| tokens/s \S+ \| tokens/GPU/s \S+$")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BPE tokenizer prepared from a stdlib source file and a tiny model trained 20 steps on it."""
    tmp = tmp_path_factory.mktemp("cli")
    src = os.path.join(os.path.dirname(os.__file__), "json", "decoder.py")
    data = tmp / "data"
    assert cli(["prepare", "--input", src, "--out", str(data), "--tokenizer", "train-bpe", "--vocab-size", "320",
                "--val-fraction", "0.1", "--no-progress"]) == 0
    run = tmp / "run"
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "data.kind=memmap", f"data.path={data}",
            "data.seq_len=32", "trainer.max_steps=20", "trainer.log_every=5", "trainer.val_check_interval=10",
            "trainer.ckpt_every=0", f"trainer.out_dir={run}"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {"data": data, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "stdout": p.stdout, "stderr": p.stderr}


def test_train_output(trained):
    lines = trained["stdout"].splitlines()
    steps = [int(STEP_LINE.match(l).group(1)) for l in lines if STEP_LINE.match(l)]
    assert steps == [5, 10, 15, 20], trained["stdout"]
    assert any(l.startswith("step 10 | val loss ") for l in lines)
    summary = [l for l in lines if l.startswith("done: ")]
    assert len(summary) == 1 and "steps 20" in summary[0] and "best val loss" in summary[0]
    assert str(trained["ckpt"]) in summary[0]
    assert (trained["run"] / "loss.png").stat().st_size > 1000
    out = trained["stdout"] + trained["stderr"]
    for noise in ("Total Flops", "\U0001f4a1 Tip", "`weights_only` was not set", "\r"):
        assert noise not in out, noise
    assert "preset: tiny" not in out  # the config is in <out_dir>/config.yaml, not dumped
    assert (trained["run"] / "config.yaml").read_text().count("preset: tiny") == 1


def test_generate_eval_export(trained, tmp_path, capsys):
    from seqpar.data.tokenizer import load_tokenizer
    from seqpar.models import TransNormerLLM
    from seqpar.models.export import load_checkpoint

    ckpt = str(trained["ckpt"])
    tok = load_tokenizer(str(trained["data"] / "tokenizer.json"))
    model, info = load_checkpoint(ckpt)
    assert model.config.vocab_size == tok.vocab_size and info["tokenizer"]["json"]  # vocab from meta.json

    # generate: the prompt, then the greedy continuation decoded with the checkpoint's tokenizer
    capsys.readouterr()
    assert cli(["generate", "--ckpt", ckpt, "--prompt", "def decode(", "--max-new-tokens", "12",
                "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    prompt = torch.tensor([tok.encode("def decode(")])
    want = model.generate(prompt, 12, temperature=0, eos_id=tok.eos_id)
    assert text == "def decode(" + tok.decode([i for i in want[0, prompt.shape[1]:].tolist() if i != tok.eos_id]) + "\n"
    assert cli(["generate", "--ckpt", ckpt, "--prompt", "x", "--max-new-tokens", "5", "--top-p", "0.9",
                "--top-k", "20", "--seed", "1"]) == 0

    # eval: the whole val split (the data directory comes from the checkpoint); in one window it equals the
    # model's loss over the split
    import numpy as np

    val = torch.from_numpy(np.fromfile(trained["data"] / "val.bin", dtype=np.uint16).astype(np.int64))
    with torch.no_grad():
        ref = model(val[None, :-1], labels=val[None, 1:]).loss.item()
    capsys.readouterr()
    assert cli(["eval", "--ckpt", ckpt, "--seq-len", str(len(val) - 1)]) == 0
    line = capsys.readouterr().out
    loss = float(re.search(r"loss (\d+\.\d+)", line).group(1))
    ppl = float(re.search(r"ppl (\d+\.\d+)", line).group(1))
    assert abs(loss - ref) < 1e-4 and math.isclose(ppl, math.exp(ref), rel_tol=1e-3)
    assert f"tokens {len(val) - 1}" in line
    assert cli(["eval", "--ckpt", ckpt]) == 0  # training's seq_len windows
    assert 0 < float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1)) < math.log(tok.vocab_size) + 1
    assert cli(["eval", "--ckpt", ckpt, "--data", str(trained["data"]), "--split", "train", "--seq-len", "64"]) == 0

    # export + from_pretrained: bit-identical logits
    out = tmp_path / "export"
    assert cli(["export", "--ckpt", ckpt, "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    loaded = TransNormerLLM.from_pretrained(str(out))
    x = torch.randint(0, tok.vocab_size, (2, 40))
    assert torch.equal(loaded(x).logits, model(x).logits)
    capsys.readouterr()
    assert cli(["generate", "--ckpt", str(out), "--prompt", "def decode(", "--max-new-tokens", "12",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text  # the exported directory generates the same text


def test_cli_errors(trained, tmp_path, capsys):
    assert cli(["generate", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqpar generate: error: ") and err.count("\n") == 1
    assert cli(["eval", "--ckpt", str(trained["ckpt"]), "--data", str(tmp_path)]) == 2
    assert "meta.json" in capsys.readouterr().err
    assert cli(["prepare", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    import runpy

    argv = sys.argv
    sys.argv = ["seqpar", "--help"]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_module("seqpar", run_name="__main__")  # python -m seqpar
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert e.value.code == 0 and "prepare" in out and "generate" in out and "export" in out


def test_step_lines_under_torchrun(tmp_path):
    """torchrun --nproc-per-node 2, SP=2, progress bar off: rank 0 prints every log_every-th step once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "debug.yaml"), "parallel.sp=2",
           "trainer.max_steps=4", "trainer.log_every=2", "trainer.val_check_interval=null", "trainer.ckpt_every=0",
           "trainer.progress_bar=false", f"trainer.out_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [int(STEP_LINE.match(l).group(1)) for l in p.stdout.splitlines() if STEP_LINE.match(l)]
    assert steps == [2, 4], p.stdout
    assert "\r" not in p.stdout and p.stdout.count("done: steps 4") == 1


def test_wandb_logger_needs_wandb(monkeypatch, tmp_path):
    import seqpar.recipe.layout
    from seqpar.recipe import main as train_main

    monkeypatch.setattr(seqpar.recipe.layout, "_importable", lambda name: False)
    with pytest.raises(SystemExit) as e:
        train_main(["trainer.accelerator=cpu", "trainer.logger=wandb", f"trainer.out_dir={tmp_path}"])
    assert str(e.value.code) == ("train.py: config error: trainer.logger=wandb needs the wandb package "
                                 "(pip install wandb), or use trainer.logger=csv")
