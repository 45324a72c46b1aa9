"""Hostile input across the layers: the operator, the SP operator (2 gloo ranks), the model / LitLM, train.py.

Every bad input must stop with a clear ``ValueError`` / ``TypeError`` (or, for train.py, a one-line
``train.py: config error: ...``) instead of a deep traceback, a hang, or silently wrong numbers.
(Random shapes / decays through both backends: tests/kernels/test_properties.py; argument-by-argument
operator messages: tests/kernels/test_validation.py.)
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import set_check_finite
from seqpar.models import TNLConfig
from seqpar.models.lit import LitLM
from seqpar.models.transnormer import TransNormerLLM

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def check_finite():
    set_check_finite(True)
    yield
    set_check_finite(False)


def _qkvs(B=1, T=8, H=2, D=4, E=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, H, D, generator=g, dtype=dtype), torch.randn(B, T, H, D, generator=g, dtype=dtype),
            torch.randn(B, T, H, E, generator=g, dtype=dtype), torch.full((H,), 0.1))


def _with(i, x):
    a = list(_qkvs())
    a[i] = x
    return a


# ------------------------------------------------------------------------------------------ operator
q0, k0, v0, s0 = _qkvs()
OPERATOR_CASES = {
    # shapes
    "q not 4-D": (ValueError, "q must have 4 dimensions", lambda: lightning_attn(q0[0], k0, v0, s0)),
    "k != q shape": (ValueError, "k must have the shape of q", lambda: lightning_attn(q0, k0[:, :5], v0, s0)),
    "v length": (ValueError, "v must be", lambda: lightning_attn(q0, k0, v0[:, :3], s0)),
    "slopes shape": (ValueError, r"slopes must have shape \[H\]", lambda: lightning_attn(q0, k0, v0, s0[:1])),
    "state shape": (ValueError, "initial_state must have shape",
                    lambda: lightning_attn(q0, k0, v0, s0, initial_state=torch.zeros(1, 2, 4, 3))),
    # dtypes
    "int q": (TypeError, "q must be float16", lambda: lightning_attn(*[x.long() for x in (q0, k0, v0)], s0)),
    "mixed dtypes": (TypeError, "share one dtype", lambda: lightning_attn(q0, k0.half(), v0, s0)),
    "int slopes": (TypeError, "slopes must be a floating-point", lambda: lightning_attn(q0, k0, v0, s0.long())),
    "float cu_seqlens": (ValueError, "cu_seqlens must be a 1-D int32/int64",
                         lambda: lightning_attn(q0, k0, v0, s0, cu_seqlens=torch.tensor([0.0, 8.0]))),
    "triton fp64": (TypeError, "triton backend takes float16, bfloat16 or float32",
                    lambda: lightning_attn(q0.double(), k0.double(), v0.double(), s0, backend="triton")),
    "bad backend": (ValueError, "backend must be", lambda: lightning_attn(q0, k0, v0, s0, backend="cuda")),
    # devices
    "k on another device": (ValueError, "must be on one device", lambda: lightning_attn(q0, k0.to("meta"), v0, s0)),
    "slopes on another device": (ValueError, "slopes must be on q's device",
                                 lambda: lightning_attn(q0, k0, v0, s0.to("meta"))),
    # values
    "negative slope": (ValueError, "slopes must be finite and non-negative", lambda: lightning_attn(q0, k0, v0, -s0)),
    "nan slope": (ValueError, "slopes must be finite and non-negative", lambda: lightning_attn(q0, k0, v0, s0 * NAN)),
    # packed documents
    "cu_seqlens end != T": (ValueError, "end at T = 8", lambda: lightning_attn(q0, k0, v0, s0, cu_seqlens=torch.tensor([0, 5]))),
    "cu_seqlens decreasing": (ValueError, "non-decreasing",
                              lambda: lightning_attn(q0, k0, v0, s0, cu_seqlens=torch.tensor([0, 6, 3, 8]))),
    "cu_seqlens with B=2": (ValueError, "B == 1", lambda: lightning_attn(*_qkvs(B=2), cu_seqlens=torch.tensor([0, 8]))),
}


@pytest.mark.parametrize("name", list(OPERATOR_CASES))
def test_operator_rejects(name):
    exc, msg, call = OPERATOR_CASES[name]
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("which, value", [(0, NAN), (1, INF), (2, -INF), ("state", NAN)])
def test_operator_nonfinite_inputs_with_check_finite(check_finite, backend, which, value):
    q, k, v, s = _qkvs()
    h0 = torch.zeros(1, 2, 4, 4)
    if which == "state":
        h0[0, 1, 2, 3] = value
    else:
        (q, k, v)[which][0, 3, 1, 2] = value
    name = "initial_state" if which == "state" else "qkv"[which]
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        lightning_attn(q, k, v, s, initial_state=h0, backend=backend)


def test_operator_nonfinite_unchecked_by_default():
    q, k, v, s = _qkvs()
    q[0, 0, 0, 0] = NAN
    o, _ = lightning_attn(q, k, v, s)  # the check costs a pass + host sync: off unless asked for
    assert torch.isnan(o).any()


def test_operator_empty_is_empty():
    """The operator accepts T == 0 / B == 0 (an empty shard is legal under SP); the model refuses them."""
    q, k, v, s = _qkvs(T=0)
    h0 = torch.randn(1, 2, 4, 4)
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 2, 4) and torch.equal(ht, h0)
    o, _ = lightning_attn(*_qkvs(B=0))
    assert o.shape == (0, 8, 2, 4)


@pytest.mark.parametrize("scale", [NAN, INF])
def test_operator_rejects_nonfinite_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        lightning_attn(q0, k0, v0, s0, scale=scale)


# ------------------------------------------------------------------------------------------ SP operator, 2 gloo ranks
def _sp_worker(rank, port, out_dir):
    import torch.distributed as dist

    from seqpar.distributed import sp_lightning_attn

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    H, D = 2, 4
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 20, H, D, generator=g) for _ in range(3)]  # the whole sequence, same on both ranks
    slopes = torch.tensor([0.1, 0.5])
    res = {}

    def attempt(name, fn):
        try:
            fn()
            res[name] = "ok"
        except (ValueError, TypeError) as e:
            res[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a collective torn down by the other rank
            res[name] = f"other {type(e).__name__}: {e}"

    # 1. unequal shard lengths without cu_seqlens are legal (8 + 12 tokens): the result is the full sequence's
    lo, hi = (0, 8) if rank == 0 else (8, 20)
    o = sp_lightning_attn(*(x[:, lo:hi] for x in full), slopes)
    ref, _ = lightning_attn(*full, slopes)
    res["unequal_lengths_maxdiff"] = float((o - ref[:, lo:hi]).abs().max())
    # 2. bad input seen by every rank: all ranks raise before any collective, the group stays usable
    L = 10
    sh = [x[:, rank * L:(rank + 1) * L] for x in full]
    attempt("cu_total_mismatch", lambda: sp_lightning_attn(*sh, slopes, cu_seqlens=torch.tensor([0, 5, 30])))
    attempt("cu_float", lambda: sp_lightning_attn(*sh, slopes, cu_seqlens=torch.tensor([0.0, 20.0])))
    attempt("int_dtype", lambda: sp_lightning_attn(*(x.long() for x in sh), slopes))
    attempt("bad_mode", lambda: sp_lightning_attn(*sh, slopes, mode="tree"))
    attempt("k_shape", lambda: sp_lightning_attn(sh[0], sh[1][:, :4], sh[2], slopes))
    set_check_finite(True)
    bad_q = sh[0].clone()
    bad_q[0, 1, 0, 0] = NAN
    attempt("nan_q", lambda: sp_lightning_attn(bad_q, sh[1], sh[2], slopes))
    set_check_finite(False)
    o = sp_lightning_attn(*sh, slopes)  # still in step after all of the above
    res["after_errors_maxdiff"] = float((o - ref[:, rank * L:(rank + 1) * L]).abs().max())
    # 3. lengths that disagree with the global cu_seqlens on one rank only (8 vs 12 tokens, cu says 2 x 8):
    #    the rank whose shard does not fit raises a clear ValueError; its peer fails (no hang) once it leaves
    L1 = 8 if rank == 0 else 12
    sh1 = [x[:, :L1] for x in full]
    if rank == 1:
        attempt("length_mismatch", lambda: sp_lightning_attn(*sh1, slopes, cu_seqlens=torch.tensor([0, 3, 16])))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
        os._exit(0)  # leave as a crashed rank would, without the collective rank 0 is waiting in
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))  # before the call that is expected to fail
    attempt("length_mismatch", lambda: sp_lightning_attn(*sh1, slopes, cu_seqlens=torch.tensor([0, 3, 16])))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    os._exit(0)


def test_sp_operator_bad_input_two_gloo_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sp_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "an SP rank hung"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["unequal_lengths_maxdiff"] < 1e-5 and r["after_errors_maxdiff"] < 1e-5, r
        assert r["cu_total_mismatch"].startswith("ValueError: cu_seqlens[-1] = 30"), r
        assert r["cu_float"].startswith("ValueError: cu_seqlens must be a 1-D int32/int64"), r
        assert r["int_dtype"].startswith("TypeError: q must be float16"), r
        assert r["bad_mode"].startswith("ValueError: mode must be one of"), r
        assert r["k_shape"].startswith("ValueError: k must have the shape of q"), r
        assert r["nan_q"] == "ValueError: q contains NaN or inf", r
    assert r1["length_mismatch"].startswith("ValueError: cu_seqlens[-1] = 16 (global tokens) != group size 2 x local length 12"), r1
    # the peer does not hang: the consistency header tells it which rank rejected its inputs
    assert r0.get("length_mismatch", "").startswith("ValueError: sp_lightning_attn: SP rank(s) [1] of the group "
                                                    "rejected their own inputs"), r0


def test_strategy_rejects_sequence_not_divisible_by_sp():
    from seqpar.strategies import shard_batch

    x = torch.zeros(2, 7, dtype=torch.long)
    batch = {"input_ids": x, "labels": x}
    with pytest.raises(ValueError, match=r"T=7 is not divisible by sp_size=2.*T=8, padding labels with -100"):
        shard_batch(batch, 0, 2)


# ------------------------------------------------------------------------------------------ model / LitLM
@pytest.fixture(scope="module")
def model():
    return TransNormerLLM(TNLConfig.preset("tiny")).eval()


V = TNLConfig.preset("tiny").vocab_size
ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
MODEL_CASES = {
    "float ids": (ValueError, "input_ids must be an integer tensor", lambda m: m(ids.float())),
    "bool ids": (ValueError, "input_ids must be an integer tensor", lambda m: m(ids > 3)),
    "1-D ids": (ValueError, r"input_ids must be 2-D \[B, T\]", lambda m: m(ids[0])),
    "list ids": (TypeError, "input_ids must be a torch.Tensor", lambda m: m(ids.tolist())),
    "id >= vocab": (ValueError, r"input_ids must lie in \[0, vocab_size=256\)", lambda m: m(ids + V)),
    "negative id": (ValueError, r"input_ids must lie in \[0, vocab_size=256\)", lambda m: m(ids - V)),
    "label >= vocab": (ValueError, "labels must lie in", lambda m: m(ids, labels=ids + V)),
    "label -1": (ValueError, "labels must lie in", lambda m: m(ids, labels=ids * 0 - 1)),
    "labels shape": (ValueError, "labels must have the shape of input_ids", lambda m: m(ids, labels=ids[:, :4])),
    "float labels": (ValueError, "labels must be an integer tensor", lambda m: m(ids, labels=ids.float())),
    "cu_seqlens with B=2": (ValueError, "cu_seqlens needs packed input_ids with B == 1",
                            lambda m: m(ids, cu_seqlens=torch.tensor([0, 8]))),
    "cu_seqlens end": (ValueError, "end at T = 8", lambda m: m(ids[:1], cu_seqlens=torch.tensor([0, 5]))),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_rejects(model, name):
    exc, msg, call = MODEL_CASES[name]
    with pytest.raises(exc, match=msg):
        call(model)


EMPTY = {"T == 0": ids[:, :0], "B == 0": ids[:0]}


@pytest.mark.parametrize("which", list(EMPTY))
def test_litlm_rejects_empty_batches(which):
    lit = LitLM("tiny")
    x = EMPTY[which]
    with pytest.raises(ValueError, match="empty batch"):
        lit.training_step({"input_ids": x, "labels": x}, 0)
    with pytest.raises(ValueError, match="batch must be a dict with 'input_ids' and 'labels'"):
        lit.training_step({"input_ids": ids}, 0)


@pytest.mark.parametrize("which", list(EMPTY))
def test_model_rejects_empty_batches(model, which):
    with pytest.raises(ValueError, match="empty|B|T"):
        model(EMPTY[which], labels=EMPTY[which])


def test_litlm_nonfinite_loss_with_check_finite(check_finite):
    lit = LitLM("tiny")
    # NaN after every attention layer: the operator's input check passes, the loss is NaN
    lit.model.final_norm.register_forward_hook(lambda mod, inp, out: out * NAN)
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 0"):
        lit.training_step({"input_ids": ids, "labels": ids}, 0)


def test_check_finite_env_var_reaches_operator_and_loss():
    # (LitLM's loss check reads the same switch: seqpar.models.lit._check_finite_enabled)
    code = ("import torch; from seqpar import lightning_attn; from seqpar.kernels.lightning_attn import interface\n"
            "q = torch.full((1, 4, 1, 2), float('nan'))\n"
            "assert interface._check_finite\n"
            "try:\n    lightning_attn(q, q, q, torch.ones(1))\nexcept ValueError as e:\n    print(e)\n")
    env = dict(os.environ, SEQPAR_CHECK_FINITE="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "q contains NaN or inf" in p.stdout, p.stderr[-2000:]


# ------------------------------------------------------------------------------------------ train.py
def _train_module():
    name = "seqpar_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


CONFIG_CASES = [
    (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["data.seq_len=0"], "data.seq_len must be >= 1, got 0"),
    (["data.seq_len=1.5"], "could not be converted to Integer (key: data.seq_len)"),
    (["trainer.accelerator=cpu", "trainer.devices=4", "parallel.sp=4", "data.seq_len=66"],
     "data.seq_len=66 is not divisible by parallel.sp=4 (use e.g. data.seq_len=68)"),
    (["parallel.sp=0"], "parallel.sp must be >= 1 or null, got 0"),
    (["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["optim.betas=[0.9]"], "optim.betas must be two values in [0, 1), got [0.9]"),
    (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),
    (["trainer.ckpt_every=-1"], "trainer.ckpt_every must be >= 0"),
    (["trainer.keep_ckpts=0"], "trainer.keep_ckpts must be >= 1"),
    (["trainer.devices=two"], "trainer.devices must be auto or a positive int, got 'two'"),
    (["trainer.precision=fp8"], "trainer: Precision 'fp8' is invalid"),
    (["data.val_fraction=1.0"], "data.val_fraction must be in [0, 1), got 1.0"),
    (["data.max_bytes=0"], "data: max_bytes must be positive, got 0"),
    (["data.kind=foo"], "data kind must be one of ('corpus', 'memmap', 'recall'), got 'foo'"),
    (["data.kind=memmap", "data.path=/nonexistent/train.bin"], "data.path not found: /nonexistent/train.bin"),
    (["data.kind=recall", "model.overrides.vocab_size=16"], "data: num_pairs=16 needs at least"),
    (["model.overrides.dropout=1.5"], "model: TNLConfig.dropout must be in [0, 1), got 1.5"),
    (["model.overrides.n_layers=abc"], "model.overrides.n_layers must be int, got 'abc' (str)"),
    (["model.activation_checkpointing=maybe"],
     "model.activation_checkpointing must be one of ('none', 'selective', 'full', 'auto')"),
    (["model.overrides.activation_checkpointing=partial"],
     "model.overrides.activation_checkpointing must be one of ('none', 'selective', 'full', 'auto')"),
    (["model.overrides.vocab_size=100"], "data.kind=corpus is byte-level (256 tokens) but the model's vocab_size is 100"),
    (["model.overrides=3"], "Cannot assign int to Dict[str, Any] (key: model.overrides)"),
    (["model.compile_scope=layers"], "model.compile_scope must be auto, model or blocks, got 'layers'"),
    (["trainer.accelerator=cpu", "trainer.devices=2", "parallel.sp=2", "model.overrides.seq_chunk=64"],
     "model.overrides.seq_chunk=64 does not compose with parallel.sp=2"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_train_py_config_errors(overrides, message):
    train = _train_module()
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "configs/debug.yaml"), *overrides])
    text = str(e.value.code)
    assert text.startswith("train.py: config error: ") and "\n" not in text, text
    assert message in text, text


@pytest.mark.parametrize("content, message", [
    ("model: {preset: tiny\n  bad", "invalid YAML in"),
    ("- 1\n- 2\n", "Cannot merge incompatible container types"),
    ("trainer: 5\n", "int is not a subclass of TrainerConfig"),
    ("trainer:\n  max_stepz: 3\n", "Key 'max_stepz' not in 'TrainerConfig'"),
])
def test_train_py_malformed_yaml(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        _train_module().main(["--config", str(path)])
    text = str(e.value.code)
    assert text.startswith("train.py: config error: ") and "\n" not in text and message in text, text


def test_train_py_memmap_wrong_dtype(tmp_path):
    tokens = tmp_path / "train.bin"
    tokens.write_bytes(bytes(range(7)))  # 7 bytes: not a whole number of uint16 tokens
    with pytest.raises(SystemExit, match=r"data: .*size 7 is not a multiple of uint16"):
        _train_module().main(["--config", str(ROOT / "configs/debug.yaml"), "data.kind=memmap", f"data.path={tokens}"])
