"""Tests of ``strategy="lightning_sp"`` on CPU (gloo, real processes).

Multi-process runs go through ``tests/strategies/_sp_worker.py`` in a subprocess: Lightning's default
launcher re-runs ``sys.argv`` for ranks 1..N-1, which must be that script, not pytest. The single-process
reference runs in-process (no launcher). Same data, same global batch (dp x batch_size = 2).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqpar.strategies as sps
from seqpar.strategies import LightningSPStrategy, shard_batch

WORKER = Path(__file__).with_name("_sp_worker.py")
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS", "SLURM_NTASKS", "SLURM_JOB_NAME")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _worker_module():
    spec = importlib.util.spec_from_file_location("_sp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_worker(tmp: Path, *args: str, timeout: int = 240) -> dict:
    out = tmp / "out"
    cmd = [sys.executable, str(WORKER), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((out / "result.json").read_text())
    result["params"] = torch.load(out / "params.pt")
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single process, no SP, batch 2."""
    out = tmp_path_factory.mktemp("ref")
    old = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        _worker_module().run(devices=1, sp=1, batch_size=2, out=str(out), strategy="auto")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    result = json.loads((out / "result.json").read_text())
    result["params"] = torch.load(out / "params.pt")
    assert result["shapes"] == [[2, 64]] * 4
    return result


def _assert_same_training(res, ref):
    assert len(res["losses"]) == len(ref["losses"]) == 4
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    # losses after step 1 depend on the gradients: they are the full-sequence gradients
    assert ref["losses"][-1] < ref["losses"][0]
    for k, v in ref["params"].items():
        torch.testing.assert_close(res["params"][k], v, rtol=1e-4, atol=1e-4, msg=f"parameter {k}")


# ------------------------------------------------------------------------------------------ in-process
def test_registered_in_every_installed_tree():
    import pytorch_lightning as pl

    s = pl.strategies.StrategyRegistry.get("lightning_sp")
    assert isinstance(s, pl.strategies.DDPStrategy) and isinstance(s, LightningSPStrategy)
    assert s._sp_size_arg is None and s.sp_mode == "allgather"
    assert pl.strategies.StrategyRegistry.get("lightning_sp_spawn")._start_method == "spawn"
    assert set(sps.STRATEGY_CLASSES) >= {"pytorch_lightning"}
    try:
        import lightning.pytorch as L
    except ImportError:
        pass
    else:
        s2 = L.strategies.StrategyRegistry.get("lightning_sp")
        assert isinstance(s2, L.strategies.DDPStrategy) and not isinstance(s2, pl.strategies.DDPStrategy)
    sps.register_strategies()  # idempotent
    assert pl.strategies.StrategyRegistry["lightning_sp"]["strategy"] is LightningSPStrategy


def test_import_seqpar_registers():
    code = ("import seqpar, pytorch_lightning as pl; s = pl.strategies.StrategyRegistry.get('lightning_sp'); "
            "print(type(s).__module__, type(s).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["seqpar.strategies.lightning_sp", "LightningSPStrategy"]


def test_trainer_layout_and_errors():
    import pytorch_lightning as pl

    t = pl.Trainer(strategy="lightning_sp", accelerator="cpu", devices=4, logger=False)
    s = t.strategy
    assert s.sp_size == 4 and s.dp_size == 1  # sp_size=None: all devices of the node
    t = pl.Trainer(strategy=LightningSPStrategy(sp_size=2), accelerator="cpu", devices=4, logger=False)
    assert (t.strategy.sp_size, t.strategy.dp_size, t.strategy.distributed_sampler_kwargs) == (
        2, 2, {"num_replicas": 2, "rank": 0})
    with pytest.raises(ValueError, match=r"lightning_sp: sp=3 must divide the world size 4 \(choose among \[1, 2, 4\]\)"):
        pl.Trainer(strategy=LightningSPStrategy(sp_size=3), accelerator="cpu", devices=4, logger=False)
    with pytest.raises(ValueError, match="sp_mode"):
        LightningSPStrategy(sp_mode="tree")
    with pytest.raises(ValueError, match="sp_size"):
        LightningSPStrategy(sp_size=0)


def test_shard_batch():
    ids = torch.arange(2 * 8).view(2, 8)
    emb = torch.randn(2, 8, 3)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    batch = {"input_ids": ids, "labels": ids + 100, "emb": emb, "cu_seqlens": cu, "other": torch.ones(2, 5), "n": 7}
    parts = [shard_batch(batch, r, 4) for r in range(4)]
    for r, p in enumerate(parts):
        assert torch.equal(p["input_ids"], ids[:, 2 * r: 2 * r + 2]) and p["input_ids"].is_contiguous()
        assert torch.equal(p["labels"], ids[:, 2 * r: 2 * r + 2] + 100)
        assert torch.equal(p["emb"], emb[:, 2 * r: 2 * r + 2])
        assert p["cu_seqlens"] is cu and p["other"] is batch["other"] and p["n"] == 7
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), ids)
    x, y = shard_batch((ids, ids + 1), 1, 2)  # tuple batches
    assert torch.equal(x, ids[:, 4:]) and torch.equal(y, ids[:, 4:] + 1)
    assert shard_batch(batch, 0, 1) is batch
    with pytest.raises(ValueError, match=r"T=8 is not divisible by sp_size=3.*T=9"):
        shard_batch(batch, 0, 3)


# ------------------------------------------------------------------------------------------ processes
def test_sp2_spawn_matches_single_process(tmp_path, reference):
    """devices=2, sp=2 (dp=1), batch 2, spawn launcher, SeqDataModule."""
    res = _run_worker(tmp_path, "--devices", "2", "--sp", "2", "--batch-size", "2", "--strategy", "lightning_sp_spawn")
    assert [(l["sp_rank"], l["dp_rank"], l["model_sp_group_size"]) for l in res["layouts"]] == [(0, 0, 2), (1, 0, 2)]
    assert all(l["sampler"] == {"num_replicas": 1, "rank": 0} for l in res["layouts"])
    assert all(l["group_from_layout"] for l in res["layouts"])
    assert res["shapes"] == [[2, 32]] * 4  # T sliced for the SP rank before the copy
    _assert_same_training(res, reference)


def test_dp2_sp2_popen_matches_single_process(tmp_path, reference):
    """devices=4, sp=2, dp=2, batch 1 per dp rank, default (popen) launcher, a plain DataLoader: the
    DistributedSampler that Lightning injects must be keyed on the dp coordinate."""
    res = _run_worker(tmp_path, "--devices", "4", "--sp", "2", "--batch-size", "1", "--plain-loader")
    got = [(l["global_rank"], l["dp_rank"], l["sp_rank"], l["sampler"]["rank"], l["sampler"]["num_replicas"])
           for l in res["layouts"]]
    assert got == [(0, 0, 0, 0, 2), (1, 0, 1, 0, 2), (2, 1, 0, 1, 2), (3, 1, 1, 1, 2)]  # contiguous SP groups
    assert res["shapes"] == [[1, 32]] * 4
    _assert_same_training(res, reference)


def test_unknown_and_misplaced_keyword_arguments_are_type_errors():
    for bad in ({"sharding_strategy": "FULL_SHARD"}, {"zero_stage": 3}):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument\(s\) \['{next(iter(bad))}'\]"):
            LightningSPStrategy(**bad)
    with pytest.raises(TypeError, match=r"\['find_unused_parameters'\] configure the DDP wrapper"):
        LightningSPStrategy(fsdp=True, find_unused_parameters=True)
    with pytest.raises(TypeError, match="fsdp must be a bool"):
        LightningSPStrategy(fsdp="yes")
    s = LightningSPStrategy(sp_size=2, fsdp=True, start_method="spawn")
    assert s.fsdp and "fsdp=True" in repr(s)
    assert LightningSPStrategy(static_graph=True).fsdp is False  # DDP's own arguments still pass through
