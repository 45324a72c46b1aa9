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
             "SEQPAR_FAULT_AT_STEP", "SEQPAR_FAULT_RANK", "SEQPAR_EXTRA_CALLBACKS",
             "SEQPAR_SIGNAL_AT_STEP", "SEQPAR_SIGNAL_RANK", "SEQPAR_SIGNAL_READY")
FAULT_INJECTOR = str(ROOT / "tests" / "_fault_injector.py") + ":callbacks"
SIGNAL_HOOK = str(ROOT / "tests" / "_signal_hook.py") + ":callbacks"
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


def _cmd_env(args, nproc: int = 1, restarts: int = 0):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--max-restarts", str(restarts), "--master_port", str(_free_port()), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    return cmd, env


def _run(args, nproc: int = 1, fault=None, restarts: int = 0, expect_rc: int = 0, timeout: int = 240) -> str:
    cmd, env = _cmd_env(args, nproc, restarts)
    if fault is not None:
        env["SEQPAR_FAULT_AT_STEP"], env["SEQPAR_FAULT_RANK"] = str(fault[0]), str(fault[1])
        env["SEQPAR_EXTRA_CALLBACKS"] = FAULT_INJECTOR  # tests/_fault_injector.py, loaded by the recipe
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

    from seqpar.strategies.checkpointing import verify_checkpoint

    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    ckpts = [n for n in names if n.endswith(".ckpt")]
    assert sorted(n for n in names if not n.endswith(".ckpt")) == sorted(n + ".sha256" for n in ckpts), names
    for n in ckpts:
        ok, why = checkpoint_is_complete(str(ckpt_dir / n))
        assert ok, (n, why)
        ok, why = verify_checkpoint(str(ckpt_dir / n))
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
    with pytest.warns(UserWarning, match="skipping 3 incomplete or corrupt checkpoint") as rec:
        assert find_resume_checkpoint(str(ckpts)) == str(good)
    (line,) = [str(w.message) for w in rec if "skipping" in str(w.message)]
    assert all(name in line for name in planted) and line.endswith(f"resuming from {good}") and "\n" not in line
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


def _corrupt_payload(path: Path, member: str = "archive/data/0", nbytes: int = 4096) -> None:
    """Overwrite ``nbytes`` inside the stored payload of ``member`` (zip structure and pickle stay intact)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "r+b") as f:  # the local header: 30 bytes + name + extra, then the (stored) data
        f.seek(info.header_offset + 26)
        n_name, n_extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + n_name + n_extra
        assert info.compress_size >= nbytes + 64, (member, info.compress_size)
        f.seek(start + 64)
        f.write(b"\xff" * nbytes)  # NaN patterns in fp32


def test_corrupted_payload_is_skipped_by_checksum(tmp_path, single_ref):
    """4096 bytes overwritten inside archive/data/0 of last.ckpt: the zip is still 'complete', but its SHA-256
    differs from last.ckpt.sha256, so resume=auto skips it (one line) and takes the same step's step0000006."""
    from seqpar.strategies.checkpointing import checkpoint_is_complete, find_resume_checkpoint, verify_checkpoint

    src, _ = single_ref
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(src / "checkpoints", ckpts)
    _assert_no_partial_files(ckpts)
    last = ckpts / "last.ckpt"
    os.utime(ckpts / "step0000006.ckpt", (time.time() - 5, time.time() - 5))
    os.utime(last, None)  # last.ckpt is the newest
    _corrupt_payload(last)
    assert checkpoint_is_complete(str(last))[0]  # the structural check alone cannot see it
    ok, why = verify_checkpoint(str(last))
    assert not ok and "SHA-256 mismatch" in why
    with pytest.warns(UserWarning, match=r"skipping 1 .*last.ckpt \(SHA-256 mismatch"):
        assert find_resume_checkpoint(str(ckpts)) == str(ckpts / "step0000006.ckpt")
    train = _train_module()  # an explicit trainer.resume= path is verified too
    with pytest.raises(SystemExit, match="SHA-256 mismatch"):
        train.main(["--config", "configs/debug.yaml", f"trainer.resume={last}"])
    (ckpts / "last.ckpt.sha256").write_text("0" * 64 + "  1  last.ckpt\n")  # a wrong size is caught before hashing
    assert "size" in verify_checkpoint(str(last))[1]


def test_checksum_sidecar_written_last_and_removed_with_its_checkpoint(tmp_path, monkeypatch):
    from seqpar.strategies import checkpointing as C

    io = C.AtomicCheckpointIO()
    path = tmp_path / "step0000002.ckpt"
    io.save_checkpoint({"w": torch.arange(100.0)}, str(path))
    digest, size = C.file_sha256(str(path))
    assert (tmp_path / "step0000002.ckpt.sha256").read_text() == f"{digest}  {size}  step0000002.ckpt\n"
    # the checkpoint is renamed into place first; a crash before the sidecar's rename leaves the old sidecar,
    # which then fails verification (the file is skipped, never loaded unverified)
    real_write = C._write_atomic

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(C, "_write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.arange(200.0)}, str(path))
    monkeypatch.setattr(C, "_write_atomic", real_write)
    assert not C.verify_checkpoint(str(path))[0]
    io.remove_checkpoint(str(path))
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    """A write that fails with ENOSPC half-way: the save raises, the previous checkpoint and its checksum are
    untouched and verify, and no temporary file is left."""
    import errno

    from seqpar.strategies import checkpointing as C

    io = C.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(10.0)}, str(path))
    before = (path.read_bytes(), (tmp_path / "last.ckpt.sha256").read_bytes())
    budget = {"left": 3000}
    real_write = C._HashingWriter.write

    def full_disk(self, b):
        budget["left"] -= len(b)
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, b)

    monkeypatch.setattr(C._HashingWriter, "write", full_disk)
    with pytest.raises((OSError, RuntimeError)):  # torch's zip writer may re-raise it as a RuntimeError
        io.save_checkpoint({"w": torch.randn(100_000)}, str(path))
    monkeypatch.setattr(C._HashingWriter, "write", real_write)
    assert (path.read_bytes(), (tmp_path / "last.ckpt.sha256").read_bytes()) == before
    assert C.verify_checkpoint(str(path)) == (True, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


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
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temporary file


# ---------------------------------------------------------------------------------------- signals
SIGNAL_STEP = 2  # the signal arrives during step 2: the run finishes it and writes last.ckpt at global step 3


def _run_and_signal(args, tmp_path: Path, signum: int, rank: int = 0, nproc: int = 1, timeout: int = 240) -> str:
    """Run train.py, send ``signum`` from this process to global rank ``rank`` while it is at step SIGNAL_STEP
    (tests/_signal_hook.py parks it there), and return the output; the run must exit with status 0."""
    import signal as _signal

    cmd, env = _cmd_env(args, nproc)
    ready = tmp_path / f"ready_{signum}"
    env.update(SEQPAR_EXTRA_CALLBACKS=SIGNAL_HOOK, SEQPAR_SIGNAL_AT_STEP=str(SIGNAL_STEP),
               SEQPAR_SIGNAL_RANK=str(rank), SEQPAR_SIGNAL_READY=str(ready))
    log = tmp_path / f"signal_{signum}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                assert p.poll() is None, f"train.py ended (rc {p.returncode}) before step {SIGNAL_STEP}\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "train.py did not reach the signal step"
                time.sleep(0.05)
            os.kill(int(ready.read_text()), signum)  # a real signal to the (worker) process
            rc = p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
    out = log.read_text()
    assert rc == 0, f"rc {rc} after {_signal.Signals(signum).name}\n{out[-6000:]}"
    return out


def _check_stopped_and_resumed(tmp_path: Path, out: str, ref: dict, args, nproc: int, signame: str) -> None:
    stop = SIGNAL_STEP + 1
    assert f"received {signame}" in out and f"stopped by a signal after step {stop}" in out, out[-3000:]
    ckpts = tmp_path / "checkpoints"
    _assert_no_partial_files(ckpts)
    ck = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == stop  # the step in flight was finished and saved, none lost
    (first,) = _losses_by_version(tmp_path)
    _assert_matches(first, ref, range(stop), f"{signame}: before the signal")
    out = _run(args, nproc=nproc)  # the same command again: resume=auto continues at the saved step
    assert f"resume={ckpts / 'last.ckpt'}" in out and f"done: step {STEPS}" in out
    _, second = _losses_by_version(tmp_path)
    _assert_matches(second, ref, range(stop, STEPS), f"{signame}: after resume")


def test_sigint_finishes_the_step_saves_and_exits_0_then_resumes_exactly(tmp_path, single_ref):
    import signal

    _, ref = single_ref
    args = [*SINGLE, f"trainer.out_dir={tmp_path}"]
    out = _run_and_signal(args, tmp_path, signal.SIGINT)
    _check_stopped_and_resumed(tmp_path, out, ref, args, 1, "SIGINT")


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank_cleanly_then_resumes_exactly(tmp_path, sp2_ref):
    """SP=2 under torchrun: SIGTERM reaches rank 1 only; the ranks agree after the step, both write last.ckpt
    (global step 3, not a multiple of ckpt_every) and exit 0, so torchrun exits 0 without a restart."""
    import signal

    args = [*SP2, f"trainer.out_dir={tmp_path}"]
    out = _run_and_signal(args, tmp_path, signal.SIGTERM, rank=1, nproc=2)
    _check_stopped_and_resumed(tmp_path, out, sp2_ref, args, 2, "SIGTERM")


# ---------------------------------------------------------------------------------------- extending a run
EXT = ["--config", "configs/debug.yaml", "optim.min_lr_ratio=1.0", "trainer.ckpt_every=3", "trainer.val_check_interval=4"]


def test_extending_a_finished_run_repeats_the_longer_run_from_either_checkpoint_of_the_step(tmp_path):
    """max_steps=6, then max_steps=9 resumed: steps 6-8 (and their logged step numbers) equal an uninterrupted
    9-step run, from last.ckpt as from step0000006.ckpt (the same step); no last-v1.ckpt. (A constant LR,
    min_lr_ratio=1: the cosine schedule ends at max_steps, so extending a run changes its schedule.)"""
    _run([*EXT, "trainer.max_steps=9", f"trainer.out_dir={tmp_path / 'ref'}"])
    (ref,) = _losses_by_version(tmp_path / "ref")
    a, b = tmp_path / "a", tmp_path / "b"
    _run([*EXT, "trainer.max_steps=6", f"trainer.out_dir={a}"])
    shutil.copytree(a, b)
    _run([*EXT, "trainer.max_steps=9", f"trainer.out_dir={a}", f"trainer.resume={a / 'checkpoints' / 'last.ckpt'}"])
    _run([*EXT, "trainer.max_steps=9", f"trainer.out_dir={b}",
          f"trainer.resume={b / 'checkpoints' / 'step0000006.ckpt'}"])
    for run, which in ((a, "last.ckpt"), (b, "step0000006.ckpt")):
        first, second = _losses_by_version(run)
        _assert_matches(first, ref, range(6), f"first 6 steps ({which})")
        _assert_matches(second, ref, range(6, 9), f"extended from {which}")
        names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".ckpt"))
        assert names == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt", "step0000009.ckpt"], names


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    from seqpar.strategies.checkpointing import check_writable_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    train = _train_module()
    with pytest.raises(SystemExit, match=rf"config error: trainer.ckpt_dir: cannot create checkpoint directory {blocker}"):
        train.main(["--config", "configs/debug.yaml", f"trainer.out_dir={tmp_path}", f"trainer.ckpt_dir={blocker}"])
    assert "is not writable" in check_writable_dir("/proc")  # exists, but no file can be created in it (even as root)
    assert check_writable_dir(str(tmp_path / "new" / "dir")) is None and (tmp_path / "new" / "dir").is_dir()
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is removed


_KILLED_WRITER = r"""
import os, sys, time, torch
from seqpar.strategies import checkpointing as C
path, marker = sys.argv[1], sys.argv[2]
C.AtomicCheckpointIO().save_checkpoint({"w": torch.arange(1000.0)}, path)  # a complete previous checkpoint
real = C._HashingWriter.write
def slow(self, b):
    n = real(self, b)
    if self.n > 4096 and not os.path.exists(marker):
        self.f.flush()
        open(marker, "w").close()
        time.sleep(60)  # SIGKILLed here, half-way through the new checkpoint
    return n
C._HashingWriter.write = slow
C.AtomicCheckpointIO().save_checkpoint({"w": torch.randn(1_000_000)}, path)
"""


def test_process_killed_during_a_checkpoint_write_leaves_the_previous_one_valid(tmp_path):
    """A real process SIGKILLed in the middle of writing last.ckpt: last.ckpt and its checksum are the previous
    complete save, the partial temporary file is never a resume candidate."""
    import signal

    from seqpar.strategies.checkpointing import find_resume_checkpoint, verify_checkpoint

    path, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(marker)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, f"writer ended early (rc {p.returncode})"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    partial = [n for n in os.listdir(tmp_path) if ".tmp." in n]
    assert len(partial) == 1 and os.path.getsize(tmp_path / partial[0]) > 4096  # the interrupted write
    assert verify_checkpoint(str(path)) == (True, "")
    assert torch.equal(torch.load(path)["w"], torch.arange(1000.0))
    assert find_resume_checkpoint(str(tmp_path)) == str(path)


def test_data_order_follows_the_samples_consumed_not_lightnings_epoch():
    """A loader restored from {"epoch": 0, "samples_consumed": 20} continues pass 0 at sample 20 even when
    Lightning calls set_epoch(1) first (what it does after an end-of-fit checkpoint), and its next pass is
    pass 1 when Lightning says epoch 2."""
    from seqpar.data.sampling import make_loader

    data = list(range(40))
    ref = make_loader(data, 2, shuffle=True, seed=3)
    passes = []
    for e in range(2):
        ref.sampler.set_epoch(e)
        passes.append([int(x) for b in ref for x in b])
    assert sorted(passes[0]) == data and passes[1] != passes[0]

    resumed = make_loader(data, 2, shuffle=True, seed=3)
    resumed.load_state_dict({"epoch": 0, "samples_consumed": 20})
    resumed.sampler.set_epoch(1)  # Lightning's epoch counter after an end-of-fit checkpoint
    assert [int(x) for b in resumed for x in b] == passes[0][20:]
    assert resumed.state_dict() == {"epoch": 0, "samples_consumed": 40}
    resumed.sampler.set_epoch(2)
    assert [int(x) for b in resumed for x in b] == passes[1]
    ended = make_loader(data, 2, shuffle=True, seed=3)
    ended.load_state_dict({"epoch": 0, "samples_consumed": 40})  # saved after the last batch of pass 0
    ended.sampler.set_epoch(0)  # Lightning still counts epoch 0 (saved mid-step)
    assert [int(x) for b in ended for x in b] == passes[1]
