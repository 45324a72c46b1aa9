"""train.py: config handling (in-process) and real runs under torchrun (gloo, 2 CPU processes) with resume."""
from __future__ import annotations

import csv
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def _train_module():
    name = "seqpar_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAIN)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc: int = 1, timeout: int = 300) -> str:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


def _losses(out_dir: Path) -> dict:
    (log,) = list((out_dir / "logs").glob("version_*/metrics.csv"))
    with open(log) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.nope=1"], "Key 'nope' not in 'TrainerConfig'"),
        (["trainer.max_steps=abc"], "could not be converted to Integer"),
        (["trainer.accelerator=cpu", "trainer.devices=2", "parallel.sp=3"], "parallel.sp=3 must divide the world size 2"),
        (["trainer.accelerator=cpu", "trainer.devices=2", "parallel.sp=2", "data.seq_len=63"],
         "data.seq_len=63 is not divisible by parallel.sp=2 (use e.g. data.seq_len=64)"),
        (["trainer.accelerator=cpu", "model.overrides.d_modl=8"], "unknown TNLConfig fields ['d_modl']"),
        (["trainer.accelerator=cpu", "model.preset=huge"], "unknown TNLConfig preset 'huge'"),
        (["trainer.accelerator=cpu", "data.kind=memmap"], "needs a path"),
        (["trainer.accelerator=cpu", "data.packed=true"], "need batch_size=1"),
        (["trainer.accelerator=cpu", "trainer.resume=/nonexistent.ckpt"], "checkpoint not found"),
        (["--config", "configs/nonexistent.yaml"], "config file not found"),
        (["parallel.sp_mode=tree", "trainer.accelerator=cpu"], "sp_mode must be allgather or ring"),
        (["trainer.max_steps"], "overrides must be key=value"),
        (["trainer.accelerator=cpu", "trainer.logger=mlflow"], "trainer.logger must be csv, tensorboard or wandb"),
    ],
)
def test_config_errors_are_one_line(overrides, message, capsys):
    train = _train_module()
    with pytest.raises(SystemExit) as e:
        train.main(overrides)
    text = str(e.value.code)
    assert text.startswith("train.py: config error: ") and "\n" not in text, text
    assert message in text, text


def test_tensorboard_logger_needs_tensorboard(monkeypatch, tmp_path):
    train = _train_module()
    import seqpar.recipe.layout

    monkeypatch.setattr(seqpar.recipe.layout, "_importable", lambda name: False)
    with pytest.raises(SystemExit) as e:
        train.main(["trainer.accelerator=cpu", "trainer.logger=tensorboard", f"trainer.out_dir={tmp_path}"])
    assert "trainer.logger=tensorboard needs the tensorboard package (pip install tensorboard)" in str(e.value.code)


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    _run(["--config", "configs/debug.yaml", "trainer.max_steps=3", "trainer.logger=tensorboard",
          f"trainer.out_dir={tmp_path}"])
    assert list(tmp_path.glob("logs/version_0/events.out.tfevents.*"))


def test_configs_load_and_merge():
    train = _train_module()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = train.load_config([str(path)], ["trainer.max_steps=7"])
        assert cfg.trainer.max_steps == 7, path
        assert cfg.data.seq_len % (cfg.parallel.sp or 1) == 0, path
    cfg = train.load_config([str(ROOT / "configs/tnl-1b.yaml")], ["parallel.sp=4", "model.overrides.n_layers=2"])
    assert (cfg.model.preset, cfg.parallel.sp, cfg.model.overrides.n_layers) == ("tnl-1b", 4, 2)
    assert cfg.model.overrides.activation_checkpointing is True
    default = train.load_config([], [])
    assert train.load_config([str(ROOT / "configs/default.yaml")], []) == default  # default.yaml == no args


# ------------------------------------------------------------------------------------------ runs
def test_torchrun_sp2_checkpoint_resumes_under_sp2_and_sp1(tmp_path):
    common = ["--config", "configs/debug.yaml", "trainer.max_steps=6", "trainer.ckpt_every=3",
              "trainer.val_check_interval=3"]
    a = tmp_path / "a"
    out = _run([*common, "parallel.sp=2", f"trainer.out_dir={a}"], nproc=2)
    assert "world=2 sp=2 dp=1" in out
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir())
    want = ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt"]  # written once, by rank 0, with their checksums
    assert ckpts == sorted(want + [n + ".sha256" for n in want]), ckpts
    ref = _losses(a)
    assert sorted(ref) == list(range(6)) and ref[5] < ref[0]

    ckpt = a / "checkpoints" / "step0000003.ckpt"
    b = tmp_path / "b"  # same layout
    _run([*common, "parallel.sp=2", f"trainer.out_dir={b}", f"trainer.resume={ckpt}"], nproc=2)
    c = tmp_path / "c"  # one process, no SP
    _run([*common, "parallel.sp=1", "trainer.devices=1", f"trainer.out_dir={c}", f"trainer.resume={ckpt}"])
    for run in (b, c):
        got = _losses(run)
        assert sorted(got) == [3, 4, 5], got  # resumed after step 3, mid-epoch, at the next batch
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (run.name, step, loss, ref[step])
