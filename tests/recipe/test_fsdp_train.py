"""train.py with parallel.fsdp=true under torchrun (4 gloo CPU processes): trains, validates, checkpoints, and
the checkpoint resumes at dp 2 x sp 2 with fsdp, at dp 1 x sp 4 without fsdp and at world 1 with the
uninterrupted run's losses. The global batch is 2 sequences in every layout (batch_size is per dp rank)."""
from __future__ import annotations

import pytest

from test_train import _losses, _run  # noqa: E402  (tests/test_train.py helpers: torchrun on a free port)

COMMON = ["--config", "configs/debug.yaml", "trainer.max_steps=6", "trainer.ckpt_every=3",
          "trainer.val_check_interval=3"]
FSDP_DP2_SP2 = ["parallel.sp=2", "parallel.fsdp=true", "data.batch_size=1"]


def test_torchrun_fsdp_trains_checkpoints_and_resumes_under_any_layout(tmp_path):
    a = tmp_path / "a"
    out = _run([*COMMON, *FSDP_DP2_SP2, f"trainer.out_dir={a}"], nproc=4)
    assert "world=4 sp=2 dp=2 fsdp=True" in out and "done: step 6" in out
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(n + s for n in ("last.ckpt", "step0000003.ckpt", "step0000006.ckpt") for s in ("", ".sha256"))
    ref = _losses(a)
    assert sorted(ref) == list(range(6)) and ref[5] < ref[0]
    (log,) = list((a / "logs").glob("version_*/metrics.csv"))
    assert "val/loss" in log.read_text().splitlines()[0]  # validated

    ckpt = a / "checkpoints" / "step0000003.ckpt"
    runs = {
        "fsdp dp2 x sp2": (FSDP_DP2_SP2, 4),
        "dp1 x sp4, no fsdp": (["parallel.sp=4", "data.batch_size=2"], 4),
        "world 1": (["parallel.sp=1", "trainer.devices=1", "data.batch_size=2"], 1),
    }
    for i, (what, (args, nproc)) in enumerate(runs.items()):
        d = tmp_path / f"r{i}"
        _run([*COMMON, *args, f"trainer.out_dir={d}", f"trainer.resume={ckpt}"], nproc=nproc)
        got = _losses(d)
        assert sorted(got) == [3, 4, 5], (what, got)
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], rel=2e-5, abs=2e-5), (what, step, loss, ref[step])


def test_torchrun_fsdp_gradient_accumulation_equals_ddp(tmp_path):
    """trainer.accumulate_grad_batches=2 with fsdp (dp 2): the strategy keeps the micro-batch gradients local
    (FSDP2's set_requires_gradient_sync(False)) until the last one, and the losses equal DDP's (no_sync)."""
    common = ["--config", "configs/debug.yaml", "trainer.max_steps=3", "trainer.ckpt_every=0",
              "trainer.val_check_interval=null", "trainer.accumulate_grad_batches=2", "parallel.sp=1",
              "data.batch_size=1", "trainer.log_every=1"]
    losses = {}
    for fsdp in ("true", "false"):
        d = tmp_path / fsdp
        _run([*common, f"parallel.fsdp={fsdp}", f"trainer.out_dir={d}"], nproc=2)
        losses[fsdp] = _losses(d)
    assert sorted(losses["true"]) == sorted(losses["false"]) and len(losses["true"]) >= 3, losses
    for step, loss in losses["false"].items():
        assert losses["true"][step] == pytest.approx(loss, rel=2e-5, abs=2e-5), (step, losses)
