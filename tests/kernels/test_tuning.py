"""LaunchConfig (seqpar.kernels.lightning_attn.tuning): an immutable value, derived with replace(), checked
at construction, read from SEQPAR_LA_CONFIG once; and the launch layer takes it as an argument."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from seqpar.kernels.lightning_attn import tuning
from seqpar.kernels.lightning_attn.tuning import DEFAULT, KernelLaunch, LaunchConfig, SegLong, from_env


def test_default_values_and_immutability():
    assert LaunchConfig() == DEFAULT and hash(LaunchConfig()) == hash(DEFAULT)
    assert DEFAULT.lookback == "fwd" and DEFAULT.state_bf16 == "auto" and DEFAULT.fuse_dkdv
    assert DEFAULT.fwd == KernelLaunch(BLK=64, num_warps=4, num_stages=2, tma=True)
    assert DEFAULT.scan.options() == {"num_warps": 4}  # no num_stages: Triton's default
    # TMA walks: the forward and the dv / dk+dv walks (the latter with its own pipeline depth), not the dq walk
    assert DEFAULT.tma == "auto" and DEFAULT.dv.tma and not DEFAULT.dqdk.tma
    assert DEFAULT.dv_fused.options(tma=True)["num_stages"] == 3 and DEFAULT.dv_fused.options()["num_stages"] == 2
    assert DEFAULT.seg_long == SegLong(waves=2, seg_max=64)
    # every walk steps by the plan's chunk unless a config says otherwise (tuning cannot import plan)
    from seqpar.kernels.lightning_attn.plan import CHUNK
    assert all(DEFAULT.kernel(kind, small).BT == CHUNK for kind in tuning.KINDS for small in (False, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.lookback = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.fwd.BLK = 128


def test_replace_merges_nested_dicts_and_leaves_the_original():
    cfg = DEFAULT.replace(fwd={"num_stages": 3, "maxnreg": 168}, waves=3, small={"scan": {"BLK": 16}})
    assert cfg.fwd == KernelLaunch(BLK=64, num_warps=4, num_stages=3, maxnreg=168, tma=True)
    assert cfg.fwd.options() == {"num_warps": 4, "num_stages": 3, "maxnreg": 168}
    assert cfg.waves == 3 and cfg.dqdk == DEFAULT.dqdk
    assert cfg.small.scan.BLK == 16 and cfg.small.fuse_dkdv is True and cfg.small.fwd == DEFAULT.small.fwd
    assert DEFAULT.fwd.num_stages == 2 and DEFAULT.waves == 2  # unchanged
    assert DEFAULT.replace() is DEFAULT
    # seg_long: None switches the rule off; a dict afterwards starts from the default values
    off = DEFAULT.replace(seg_long=None)
    assert off.seg_long is None and off.replace(seg_long={"waves": 3}).seg_long == SegLong(waves=3, seg_max=64)
    # to_dict round-trips
    assert DEFAULT.replace(**cfg.to_dict()) == cfg


def test_small_head_overrides_are_resolved():
    assert DEFAULT.kernel("scan", small=True).BLK == 32 and DEFAULT.kernel("scan", small=False).BLK == 64
    assert DEFAULT.kernel("fwd", small=True).num_stages == 3 and DEFAULT.kernel("fwd", small=False).num_stages == 2
    cfg = DEFAULT.replace(fuse_dkdv=False)
    assert cfg.fuse(small=False) is False and cfg.fuse(small=True) is True  # small.fuse_dkdv wins for D, E <= 64
    cfg = cfg.replace(small={"fuse_dkdv": None})
    assert cfg.fuse(small=True) is False


@pytest.mark.parametrize("overrides,match", [
    ({"foo": 1}, "'foo'"),
    ({"fwd": {"num_warp": 8}}, "'fwd.num_warp'"),
    ({"small": {"dqdk": {"stages": 3}}}, "'small.dqdk.stages'"),
    ({"seg_long": {"wave": 2}}, "'seg_long.wave'"),
])
def test_unknown_keys_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        DEFAULT.replace(**overrides)


@pytest.mark.parametrize("overrides,match", [
    ({"lookback": "both"}, "lookback"),
    ({"lookback": 1}, "lookback"),
    ({"state_bf16": "fp8"}, "state_bf16"),
    ({"fwd": {"BLK": 48}}, "fwd.*BLK"),
    ({"dqdk": {"num_warps": 3}}, "dqdk.*num_warps"),
    ({"dqdk": {"num_warps": True}}, "dqdk.*num_warps"),
    ({"dv": {"num_stages": 0}}, "dv.*num_stages"),
    ({"small": {"scan": {"BLK": 8}}}, "small.scan.*BLK"),
    ({"waves": 0}, "waves"),
    ({"seg_max": 2.5}, "seg_max"),
    ({"seg_chunks": 0}, "seg_chunks"),
    ({"seg_long": {"seg_max": 0}}, "seg_long.*seg_max"),
    ({"fuse_dkdv": 1}, "fuse_dkdv"),
    ({"fast_launch": "yes"}, "fast_launch"),
    ({"fp32_precision": "fp16"}, "fp32_precision"),
    ({"waves": {"x": 1}}, "waves"),
    ({"tma": "yes"}, "tma"),
    ({"dv": {"tma": 1}}, "dv.*tma"),
    ({"dv_fused": {"tma_stages": 0}}, "dv_fused.*tma_stages"),
    ({"fwd": {"BT": 48}}, "fwd.*BT"),
    ({"small": {"dqdk": {"BT": 512}}}, "small.dqdk.*BT"),
])
def test_bad_values_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        DEFAULT.replace(**overrides)


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError, match="fwd"):
        LaunchConfig(fwd=None)
    with pytest.raises(TypeError, match="small"):
        LaunchConfig(small={"fuse_dkdv": False})  # dicts go through replace()


def test_env_parsing():
    assert from_env({}) == DEFAULT
    env = {"SEQPAR_LA_CONFIG": json.dumps({"lookback": False, "dqdk": {"num_warps": 8}, "seg_long": None})}
    cfg = from_env(env)
    assert cfg == DEFAULT.replace(lookback=False, dqdk={"num_warps": 8}, seg_long=None)
    assert from_env({"SEQPAR_LA_CONFIG": '{"small": {"fuse_dkdv": false}}'}).fuse(small=True) is False
    assert from_env({"SEQPAR_POISON": "1", "SEQPAR_FP32_PRECISION": "tf32"}) == DEFAULT.replace(
        poison=True, fp32_precision="tf32")
    assert from_env({"SEQPAR_POISON": "0", "SEQPAR_LA_CONFIG": " "}) == DEFAULT
    with pytest.raises(ValueError, match="SEQPAR_LA_CONFIG"):
        from_env({"SEQPAR_LA_CONFIG": "{lookback: false"})
    with pytest.raises(ValueError, match="SEQPAR_LA_CONFIG"):
        from_env({"SEQPAR_LA_CONFIG": "[1, 2]"})
    with pytest.raises(ValueError, match="'fwd.blk'"):
        from_env({"SEQPAR_LA_CONFIG": '{"fwd": {"blk": 32}}'})
    assert from_env() is from_env()  # os.environ: read once


def test_env_is_read_once_per_process():
    """A fresh interpreter with SEQPAR_LA_CONFIG set: the calls that pass no config use it."""
    # tuning.py imports only the standard library: load it by path, without importing torch
    code = ("import importlib.util, os, sys; spec = importlib.util.spec_from_file_location('tuning', sys.argv[1]); "
            "tuning = sys.modules['tuning'] = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(tuning); c = tuning.from_env(); "
            "os.environ['SEQPAR_LA_CONFIG'] = '{}'; "
            "print(c.lookback, c.fwd.num_warps, tuning.resolve(None) is c)")
    env = dict(os.environ, SEQPAR_LA_CONFIG='{"lookback": true, "fwd": {"num_warps": 8}}')
    out = subprocess.run([sys.executable, "-c", code, tuning.__file__], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "8", "True"]


def test_entry_points_take_the_config_value():
    """chunk_lightning_attn(config=...) routes the value to the launchers (segment plan, look-back mode);
    a config that is not a LaunchConfig is a TypeError; two configs in one process do not share a plan."""
    from seqpar.kernels.lightning_attn import chunk, plan as plan_mod

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 130, 2, 16, generator=g).to(dev) for _ in range(3))
    s = torch.tensor([0.1, 0.6], device=dev)
    with pytest.raises(TypeError, match="config"):
        chunk.chunk_lightning_attn(q, k, v, s, 0.25, config={"lookback": False})
    outs = [chunk.chunk_lightning_attn(q, k, v, s, 0.25, None, True, config=DEFAULT.replace(seg_chunks=n, lookback=m))
            for n, m in ((1, "fwd"), (2, False), (3, True))]
    for o, ht in outs[1:]:
        assert torch.allclose(o, outs[0][0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(ht, outs[0][1], atol=1e-5, rtol=1e-4)
    p1 = plan_mod.get_plan(1, 130, 2, 16, 16, None, q.device, DEFAULT.replace(seg_chunks=1))
    p2 = plan_mod.get_plan(1, 130, 2, 16, 16, None, q.device, DEFAULT.replace(seg_chunks=2))
    assert (p1.seg_chunks, p2.seg_chunks) == (1, 2)
    assert plan_mod.get_plan(1, 130, 2, 16, 16, None, q.device, DEFAULT.replace(seg_chunks=1)) is p1
    assert tuning.resolve(None) is from_env()
