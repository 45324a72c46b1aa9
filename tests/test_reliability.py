"""Reliability of train.py on CPU (real processes, gloo): determinism, exact resume after a crash, torchrun
restart after a killed rank, atomic checkpoints, resume=auto skipping corrupt files, train/loss over dp ranks.

Crashes are injected with tests/_fault_injector.py (loaded through ``SEQPAR_EXTRA_CALLBACKS``): ``SEQPAR_FAULT_AT_STEP=N`` (+ ``SEQPAR_FAULT_RANK=r``) makes
that rank ``os._exit(1)`` right before optimizer step N, on the first torchrun attempt only. Checkpoints
every 2 steps, crash before step 3: the run resumes from the step-2 checkpoint and redoes step 2.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "PL_GLOBAL_SEED",
             "SEQPAR_FAULT_AT_STEP", "SEQPAR_FAULT_RANK", "SEQPAR_EXTRA_CALLBACKS")
FAULT_INJECTOR = str(ROOT / "tests" / "_fault_injector.py") + ":callbacks"
STEPS, CKPT_EVERY, FAULT_STEP = 6, 2, 3
COMMON = ["--config", "configs/debug.yaml", f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
          "trainer.val_check_interval=4", "trainer.resume=auto"]
TOL = 1e-6  # CPU fp32: resumed losses must match the uninterrupted run to this (they are in fact bitwise equal)


def _train_module():
    name = "seqpar_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAIN)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc: int = 1, fault=None, restarts: int = 0, expect_rc: int = 0, timeout: int = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env["SEQPAR_FAULT_AT_STEP"], env["SEQPAR_FAULT_RANK"] = str(fault[0]), str(fault[1])
        env["SEQPAR_EXTRA_CALLBACKS"] = FAULT_INJECTOR  # tests/_fault_injector.py, loaded by the recipe
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--max-restarts", str(restarts), "--master_port", str(_free_port()), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == expect_rc, f"{' '.join(cmd)}: rc {p.returncode} != {expect_rc}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return out


def _losses_by_version(out_dir: Path) -> list:
    """[{step: train/loss}] per CSV log version (one version per attempt), in order."""
    runs = []
    for log in sorted((out_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(log) as f:
            runs.append({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return runs


def _assert_matches(got: dict, ref: dict, steps, what: str, tol: float = TOL) -> None:
    assert sorted(got) == list(steps), (what, sorted(got))
    diff = max(abs(got[s] - ref[s]) for s in steps)
    assert diff <= tol, f"{what}: max |loss - uninterrupted| = {diff:.3g} > {tol}: {got} vs {ref}"


def _assert_no_partial_files(ckpt_dir: Path) -> None:
    from seqpar.strategies.checkpointing import checkpoint_is_complete

    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    for n in names:
        ok, why = checkpoint_is_complete(str(ckpt_dir / n))
        assert ok, (n, why)


# ---------------------------------------------------------------------------------------- single process
SINGLE = [*COMMON, "model.overrides.dropout=0.1"]  # dropout: the RNG stream must be reproduced too


@pytest.fixture(scope="module")
def single_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_ref")
    _run([*SINGLE, f"trainer.out_dir={out}"])
    (losses,) = _losses_by_version(out)
    assert sorted(losses) == list(range(STEPS))
    return out, losses


def test_same_seed_same_losses_cpu(tmp_path, single_ref):
    _, ref = single_ref
    _run([*SINGLE, f"trainer.out_dir={tmp_path}", "trainer.deterministic=true"])
    (got,) = _losses_by_version(tmp_path)
    assert got == ref  # bitwise: same seed, same data order, same dropout masks
    _run([*SINGLE, "seed=1", f"trainer.out_dir={tmp_path / 'other_seed'}"])
    (other,) = _losses_by_version(tmp_path / "other_seed")
    assert other != ref  # the seed does matter (init, data order, dropout)


def test_single_process_crash_then_auto_resume_is_exact(tmp_path, single_ref):
    _, ref = single_ref
    out = _run([*SINGLE, f"trainer.out_dir={tmp_path}"], fault=(FAULT_STEP, 0), expect_rc=1)
    assert f"rank 0 exits before step {FAULT_STEP}" in out
    _assert_no_partial_files(tmp_path / "checkpoints")
    out = _run([*SINGLE, f"trainer.out_dir={tmp_path}"])  # the same command again: resume=auto
    assert f"resume={tmp_path / 'checkpoints'}" in out
    first, second = _losses_by_version(tmp_path)
    _assert_matches(first, ref, range(FAULT_STEP), "before the crash")
    _assert_matches(second, ref, range(CKPT_EVERY, STEPS), "after resume")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    # the sampler position travels in Lightning's loop state (ResumableDataLoader.state_dict)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "samples_consumed": 2 * STEPS}]


# ---------------------------------------------------------------------------------------- torchrun
SP2 = [*COMMON, "parallel.sp=2"]


@pytest.fixture(scope="module")
def sp2_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp2_ref")
    _run([*SP2, f"trainer.out_dir={out}"], nproc=2)
    (losses,) = _losses_by_version(out)
    assert sorted(losses) == list(range(STEPS)) and losses[STEPS - 1] < losses[0]
    return losses


def test_torchrun_restarts_after_a_rank_is_killed_and_resumes_exactly(tmp_path, sp2_ref):
    """SP=2 under torchrun --max-restarts=1: rank 1 dies before step 3; torchrun restarts both ranks, train.py
    (resume=auto) continues from the step-2 checkpoint and the remaining losses equal the uninterrupted run."""
    t0 = time.perf_counter()
    out = _run([*SP2, f"trainer.out_dir={tmp_path}"], nproc=2, fault=(FAULT_STEP, 1), restarts=1)
    assert f"rank 1 exits before step {FAULT_STEP}" in out
    assert f"resume={tmp_path / 'checkpoints'}" in out and f"done: step {STEPS}" in out
    runs = _losses_by_version(tmp_path)
    assert len(runs) == 2, runs  # two attempts
    _assert_matches(runs[0], sp2_ref, range(FAULT_STEP), "SP=2 before the kill")
    _assert_matches(runs[1], sp2_ref, range(CKPT_EVERY, STEPS), "SP=2 after the restart")
    _assert_no_partial_files(tmp_path / "checkpoints")
    print(f"restart run: {time.perf_counter() - t0:.1f}s")


def test_dp2_train_loss_is_the_mean_over_dp_ranks(tmp_path, sp2_ref):
    """dp=2 x batch 1 sees the same global batch as SP=2 x batch 2: the logged train/loss must be the mean over
    the dp ranks (rank 0's own loss alone would differ)."""
    _run([*COMMON, "parallel.sp=1", "data.batch_size=1", f"trainer.out_dir={tmp_path}"], nproc=2)
    (got,) = _losses_by_version(tmp_path)
    _assert_matches(got, sp2_ref, range(STEPS), "dp=2 vs sp=2", tol=2e-5)


# ---------------------------------------------------------------------------------------- checkpoint files
def test_auto_resume_skips_truncated_and_corrupt_checkpoints(tmp_path, single_ref):
    from seqpar.strategies.checkpointing import find_resume_checkpoint

    src, _ = single_ref
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(src / "checkpoints", ckpts)
    good = ckpts / "step0000006.ckpt"
    data = good.read_bytes()
    future = time.time() + 100
    planted = {"step0000099.ckpt": data[: len(data) // 2], "step0000098.ckpt": b"", "step0000097.ckpt": b"x" * 4096}
    for i, (name, content) in enumerate(planted.items()):
        (ckpts / name).write_bytes(content)
        os.utime(ckpts / name, (future - i, future - i))  # newer than every real checkpoint
    (ckpts / "step0000100.ckpt.tmp.12345").write_bytes(data)  # an interrupted atomic save: never a candidate
    os.utime(good, (future - 10, future - 10))
    with pytest.warns(UserWarning, match="skipping incomplete or corrupt checkpoint") as rec:
        assert find_resume_checkpoint(str(ckpts)) == str(good)
    assert {Path(str(w.message).split()[6]).name for w in rec if "skipping" in str(w.message)} == set(planted)
    assert find_resume_checkpoint(str(tmp_path / "nothing_here")) is None

    train = _train_module()  # train.py end to end (build only): resume=auto takes the newest complete file
    cfg = train.load_config([str(ROOT / "configs/debug.yaml")], [f"trainer.out_dir={tmp_path}", "trainer.resume=auto"])
    with pytest.warns(UserWarning, match="skipping"):
        trainer, _, _, ckpt_path, _ = train.build(cfg, train.resolve_layout(cfg))
    assert ckpt_path == str(good)
    from seqpar.strategies.checkpointing import AtomicCheckpointIO

    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    with pytest.raises(SystemExit, match="is not a complete checkpoint"):  # an explicit path must be complete
        train.main(["--config", "configs/debug.yaml", f"trainer.resume={ckpts / 'step0000099.ckpt'}"])


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from seqpar.strategies.checkpointing import AtomicCheckpointIO, checkpoint_is_complete

    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(10)}, str(path))
    assert torch.equal(torch.load(path)["w"], torch.arange(10)) and checkpoint_is_complete(str(path))[0]
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a checkpoint, then the "process dies"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.arange(1000)}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before  # the previous complete checkpoint is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # and no temporary file is left
