"""The Triton backend (chunk.py) against the float64 quadratic reference: o, ht and every gradient.

On a machine without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on CPU tensors, so the shapes stay small; with a GPU the same tests run on CUDA.
The tests pass their launch config (CFG, a LaunchConfig) to chunk_lightning_attn: outputs are
NaN-poisoned before the kernels run (poison=True), so an element that no program writes fails the
comparison, and small segments (seg_chunks=1) make every case cross several segments, so the segment
scan, the carried state and the reverse scan are exercised as on long sequences.

Tolerances (relative error ||x - ref|| / ||ref||):
* fp32: 1e-4 (fp32 dots: the interpreter, or input_precision="ieee" on GPU; measured ~1e-7).
* bf16 / fp16: max(1e-2, 2 x the error of the naive torch implementation run in that dtype), for o, ht
  and every gradient, dslopes included (FlashAttention's rule); the fp32 state of bf16 inputs ("split"
  state products) is also checked on its own: ht and dh0 within 1e-4.
* fp32 dslopes is a sum of large terms of both signs (q.dq - k.dk cancel to O(lambda) under strong
  decay), so its error is also allowed an absolute part relative to the magnitude of those terms.
"""
import importlib

import pytest
import torch

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import naive_quadratic_lightning_attn
from seqpar.kernels.lightning_attn.interface import validate_inputs
from seqpar.kernels.lightning_attn.tuning import DEFAULT

chunk = importlib.import_module("seqpar.kernels.lightning_attn.chunk")
kernels = importlib.import_module("seqpar.kernels.lightning_attn.kernels")
launch = importlib.import_module("seqpar.kernels.lightning_attn.launch")
plan_mod = importlib.import_module("seqpar.kernels.lightning_attn.plan")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# poisoned outputs, one-chunk segments, exact fp32 dots
CFG = DEFAULT.replace(poison=True, seg_chunks=1, fp32_precision="ieee")

SLOPES = {
    "zero": lambda H: torch.zeros(H),
    "weak": lambda H: torch.linspace(1e-3, 0.05, H),
    "strong": lambda H: torch.linspace(0.5, 10.0, H),
    "extreme": lambda H: torch.linspace(10.0, 30.0, H),
}


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _t_local(B, T, cu):
    if cu is None:
        return torch.arange(T, dtype=torch.float64).repeat(B)
    cu = cu.tolist()
    return torch.cat([torch.arange(b - a, dtype=torch.float64) for a, b in zip(cu, cu[1:])])


def _run(q, k, v, s, h0, cu, do, dht, backend_fn):
    """Forward + backward of backend_fn; returns o, ht and the gradients of the leaves."""
    leaves = [q, k, v, s] + ([h0] if h0 is not None else [])
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    q_, k_, v_, s_ = leaves[:4]
    h0_ = leaves[4] if h0 is not None else None
    o, ht = backend_fn(q_, k_, v_, s_, h0_, cu)
    loss = (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (ht.double() * dht.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o.detach(), ht.detach(), list(grads)


def _triton(q, k, v, s, h0, cu, config=CFG):
    """The Triton backend with a launch config, inputs checked as lightning_attn checks them."""
    validate_inputs(q, k, v, s, None, h0, cu, "triton")
    return chunk.chunk_lightning_attn(q, k, v, s, q.shape[-1] ** -0.5, h0, True, cu, config=config)


def _naive(q, k, v, s, h0, cu):
    return naive_quadratic_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, cu_seqlens=cu)


def _make(B, T, H, D, E, dtype, decay, with_h0, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B if cu is None else cu.numel() - 1
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H, D, generator=g).to(dtype)
    v = torch.randn(B, T, H, E, generator=g).to(dtype)
    s = SLOPES[decay](H).float()
    h0 = torch.randn(N, H, D, E, generator=g) if with_h0 else None
    do = torch.randn(B, T, H, E, generator=g).to(dtype)
    dht = torch.randn(N, H, D, E, generator=g)
    return q, k, v, s, h0, do, dht


def _check(B, T, H, D, E, dtype, decay, with_h0, with_dht, cu=None, seed=0, slopes=None, ref_dev="cpu",
           config=CFG):
    q, k, v, s, h0, do, dht = _make(B, T, H, D, E, dtype, decay, with_h0, cu, seed)
    if slopes is not None:
        s = slopes.float()
    dht = dht if with_dht else None
    dev = lambda x: x.to(DEV) if x is not None else None  # noqa: E731
    cu_d = dev(cu)
    triton_fn = lambda *xs: _triton(*xs, config=config)  # noqa: E731
    o, ht, grads = _run(dev(q), dev(k), dev(v), dev(s), dev(h0), cu_d, dev(do), dev(dht), triton_fn)
    if ref_dev != "cpu":
        q, k, v, s, h0, do, dht, cu = (x.to(ref_dev) if x is not None else None for x in (q, k, v, s, h0, do, dht, cu))
    assert o.dtype == dtype and o.shape == (B, T, H, E)
    assert ht.dtype == torch.float32 and ht.shape == (B if cu is None else cu.numel() - 1, H, D, E)
    for x in [o, ht] + grads:
        assert torch.isfinite(x).all(), "NaN/inf (unwritten output or overflow)"

    f64 = lambda x: x.double() if x is not None else None  # noqa: E731
    o_r, ht_r, grads_r = _run(f64(q), f64(k), f64(v), f64(s), f64(h0), cu, do, dht, _naive)

    names = ["dq", "dk", "dv", "dslopes", "dh0"]
    if dtype == torch.float32:
        tols = {n: 1e-4 for n in ["o", "ht"] + names}
        abs_ds = 1e-6
    else:
        # the naive implementation in the same low precision, against the same fp64 reference
        o_l, ht_l, grads_l = _run(q, k, v, s, h0, cu, do, dht, _naive)
        errs = {"o": rel(o_l, o_r), "ht": rel(ht_l, ht_r)}
        errs.update({n: rel(g, gr) for n, g, gr in zip(names, grads_l, grads_r)})
        tols = {n: max(1e-2, 2 * e) for n, e in errs.items()}
        abs_ds = 0.0

    report = {"o": rel(o.to(q.device), o_r), "ht": rel(ht.to(q.device), ht_r)}
    for n, g, gr in zip(names, grads, grads_r):
        report[n] = rel(g.to(q.device), gr)
    for n in ["o", "ht", "dq", "dk", "dv", "dh0"]:
        if n in report:
            assert report[n] <= tols[n], (n, report, tols)
    # dslopes: relative, plus an absolute part scaled by the magnitude of the summed terms
    tl_ = _t_local(B, T, cu.cpu() if cu is not None else None).to(q.device) + 1.0
    dq_r, dk_r = grads_r[0], grads_r[1]
    qdq = (q.double() * dq_r).sum(-1).abs().reshape(-1, H)
    kdk = (k.double() * dk_r).sum(-1).abs().reshape(-1, H)
    mag = (tl_[:, None] * (qdq + kdk)).sum(0)
    err = (grads[3].to(q.device).double() - grads_r[3]).norm()
    assert err <= tols["dslopes"] * grads_r[3].norm() + abs_ds * mag.norm(), (report, err, mag.norm())
    return report


@pytest.mark.parametrize(
    "B,T,H,D,E,decay,with_h0,with_dht",
    [
        (2, 1, 2, 16, 16, "weak", True, True),
        (1, 63, 2, 64, 64, "strong", False, False),
        (2, 65, 2, 16, 32, "zero", True, True),
        (1, 65, 1, 96, 64, "weak", True, False),
        (1, 130, 2, 128, 96, "strong", True, True),
        (1, 200, 2, 32, 16, "extreme", False, True),
        (1, 257, 1, 64, 128, "weak", False, False),
        (1, 70, 1, 256, 96, "strong", True, True),
    ],
)
def test_fp32_matches_reference(B, T, H, D, E, decay, with_h0, with_dht):
    _check(B, T, H, D, E, torch.float32, decay, with_h0, with_dht)


@pytest.mark.parametrize(
    "B,T,H,D,E,decay,with_h0,with_dht",
    [
        (1, 65, 2, 64, 64, "weak", True, True),
        (1, 130, 1, 128, 96, "strong", False, True),
    ],
)
def test_bf16_matches_reference(B, T, H, D, E, decay, with_h0, with_dht):
    _check(B, T, H, D, E, torch.bfloat16, decay, with_h0, with_dht)


@pytest.mark.parametrize(
    "T,with_h0,cu,state",
    [
        (2000, False, None, "auto"),
        (1100, True, torch.tensor([0, 1, 700, 1100], dtype=torch.int32), "auto"),
        (1100, True, torch.tensor([0, 1, 700, 1100], dtype=torch.int32), "split"),
    ],
)
def test_bf16_long_sequences_every_gradient_within_twice_naive(T, with_h0, cu, state):
    """bf16 at lengths into the thousands with learnable slopes: o, ht, dq, dk, dv, dh0 and dslopes
    within max(1e-2, 2 x naive bf16) of fp64 autograd on the same rounded inputs. The slope gradient
    comes from the derivative-state kernels (dslopes "state"), so the default rounded state serves;
    the "split" state keeps ht and dh0 within 1e-4 of the fp32 state."""
    report = _check(1, T, 2, 64, 64, torch.bfloat16, "weak", with_h0, with_h0, cu=cu,
                    slopes=torch.tensor([0.02, 0.05]), config=CFG.replace(state_bf16=state))
    if state == "split":
        assert report["ht"] < 1e-4 and report.get("dh0", 0.0) < 1e-4, report


@pytest.mark.parametrize("dslopes,state,bound", [("state", "bf16", 1e-2), ("rowsum", "split", 1e-2),
                                                 ("rowsum", "bf16", None)])
def test_slope_gradient_paths(dslopes, state, bound):
    """The two ways of forming dslopes against fp64 autograd at T = 1500: the derivative states meet the
    bf16 bound with the rounded state, the rowwise sums only with the split state (rounded, their
    position-weighted terms cancel: several times worse, the defect this guards against)."""
    q, k, v, s, h0, do, dht = _make(1, 1500, 2, 64, 64, torch.bfloat16, "weak", True)
    s = torch.tensor([0.02, 0.05])
    dev = lambda x: x.to(DEV)  # noqa: E731
    cfg = CFG.replace(seg_chunks=4, dslopes=dslopes, state_bf16=state)
    g = _run(dev(q), dev(k), dev(v), dev(s), dev(h0), None, dev(do), dev(dht),
             lambda *xs: _triton(*xs, config=cfg))[2][3]
    f64 = [x.double() for x in (q, k, v, s, h0)]
    g_r = _run(*f64, None, do, dht, _naive)[2][3]
    err = rel(g.cpu(), g_r)
    if bound is not None:
        assert err < bound, err
    else:
        assert err > 2e-2, err


def test_auto_state_mode():
    """state_bf16="auto" (the default): the rounded-state kernels ("bf16") whether or not the slopes need a
    gradient (the derivative-state slope gradient does not need the split state); "split" only where the
    slope gradient comes from the rowwise sums (dslopes "rowsum" or lookback True). Bit-identical to the
    explicit modes."""
    q, k, v, s, h0, do, dht = _make(1, 130, 2, 32, 32, torch.bfloat16, "weak", True)
    q, k, v, s, h0 = (x.to(DEV) for x in (q, k, v, s, h0))
    auto = CFG.replace(state_bf16="auto")
    o_b, ht_b = _triton(q, k, v, s, h0, None, config=CFG.replace(state_bf16="bf16"))
    o_s, ht_s = _triton(q, k, v, s, h0, None, config=CFG.replace(state_bf16="split"))
    assert not torch.equal(ht_b, ht_s)  # the two modes differ on these inputs
    o_a, ht_a = _triton(q, k, v, s, h0, None, config=auto)  # fixed slopes
    assert torch.equal(o_a, o_b) and torch.equal(ht_a, ht_b)
    o_g, ht_g = _triton(q, k, v, s.clone().requires_grad_(True), h0, None, config=auto)  # learnable slopes
    assert torch.equal(o_g, o_b) and torch.equal(ht_g.detach(), ht_b)
    rowsum = auto.replace(dslopes="rowsum")
    o_r, ht_r = _triton(q, k, v, s.clone().requires_grad_(True), h0, None, config=rowsum)
    assert torch.equal(o_r, o_s) and torch.equal(ht_r.detach(), ht_s)
    assert auto.for_grads(True).state_bf16 == "bf16" and auto.for_grads(False).state_bf16 == "bf16"
    assert rowsum.for_grads(True).state_bf16 == "split" and rowsum.for_grads(False).state_bf16 == "bf16"
    assert auto.replace(lookback=True).for_grads(True).state_bf16 == "split"
    assert auto.for_grads(True) is auto.for_grads(True)  # cached


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_bf16_state_modes(mode):
    """LaunchConfig.state_bf16: "tf32" (fp32 operands: exact fp32 on the interpreter) keeps the state within
    1e-4; "bf16" (state rounded to bf16, the least work) stays within the output tolerance."""
    cfg = CFG.replace(state_bf16=mode)
    report = _check(1, 200, 2, 32, 32, torch.bfloat16, "weak", True, True, slopes=torch.tensor([0.02, 0.05]),
                    config=cfg) if mode == "tf32" else None
    if mode == "tf32":
        assert report["ht"] < (1e-4 if DEV == "cpu" else 2e-3), report
    else:
        q, k, v, s, h0, do, dht = _make(1, 130, 2, 32, 32, torch.bfloat16, "weak", True)
        dev = lambda x: x.to(DEV)  # noqa: E731
        o, ht = _triton(dev(q), dev(k), dev(v), dev(s), dev(h0), None, config=cfg)
        o_r, ht_r = _naive(q.double(), k.double(), v.double(), s.double(), h0.double(), None)
        assert rel(o.cpu(), o_r) < 2e-2 and rel(ht.cpu(), ht_r) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,T,H,D,E,slopes",
    [
        (1, 4099, 4, 128, 64, torch.full((4,), 0.02)),
        (2, 1000, 5, 128, 128, torch.linspace(0.01, 0.3, 5)),
    ],
)
def test_gpu_bf16_every_gradient_within_twice_naive(B, T, H, D, E, slopes):
    """The shapes of the slope-gradient defect report, compiled, automatic segment length."""
    _check(B, T, H, D, E, torch.bfloat16, "weak", True, True, slopes=slopes, ref_dev="cuda",
           config=CFG.replace(seg_chunks=None))


def test_fp16_matches_reference():
    _check(1, 70, 2, 32, 48, torch.float16, "weak", True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_matches_reference(dtype):
    # odd lengths, an empty document, a one-token document, a document spanning several segments
    cu = torch.tensor([0, 7, 7, 140, 141, 170], dtype=torch.int32)
    _check(1, 170, 2, 32, 16, dtype, "weak" if dtype == torch.float32 else "strong", True, True, cu=cu)


def test_varlen_equals_separate_calls():
    """Each packed document gives exactly what a separate dense call gives."""
    cu = torch.tensor([0, 33, 33, 100], dtype=torch.int32)
    q, k, v, s, h0, _, _ = _make(1, 100, 2, 16, 16, torch.float32, "weak", True, cu)
    dev = lambda x: x.to(DEV)  # noqa: E731
    o, ht = _triton(dev(q), dev(k), dev(v), dev(s), dev(h0), dev(cu))
    for n, (a, b) in enumerate([(0, 33), (33, 33), (33, 100)]):
        if b > a:
            on, hn = _triton(dev(q[:, a:b]), dev(k[:, a:b]), dev(v[:, a:b]), dev(s), dev(h0[n : n + 1]), None)
            assert torch.allclose(o[:, a:b], on, atol=1e-5, rtol=1e-5)
            assert torch.allclose(ht[n : n + 1], hn, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(ht[n].cpu(), h0[n])  # empty document: ht = h0


def test_no_slope_grad_and_no_final_state():
    """slopes without requires_grad skips the dG work; output_final_state=False returns None."""
    q, k, v, s, h0, do, _ = _make(1, 70, 2, 16, 16, torch.float32, "weak", True)
    dev = lambda x: x.to(DEV)  # noqa: E731
    qd, kd, vd = (dev(x).clone().requires_grad_(True) for x in (q, k, v))
    o, ht = lightning_attn(qd, kd, vd, dev(s), initial_state=dev(h0), backend="triton")
    assert ht is None
    (o * dev(do)).sum().backward()
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    o_r, _ = naive_quadratic_lightning_attn(*leaves, s.double(), initial_state=h0.double())
    (o_r * do.double()).sum().backward()
    assert rel(o.detach().cpu(), o_r) < 1e-4
    for a, b in zip((qd, kd, vd), leaves):
        assert rel(a.grad.cpu(), b.grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse,gstate", [(True, True), (True, False), (False, True)])
def test_fused_dkdv_variant(dtype, fuse, gstate):
    """LaunchConfig.fuse_dkdv: dk in the dv kernel's reverse walk (E in one block: "dv", or "dv_fused" for
    E > the "dv" block), or in its own reverse walk of the dq kernel. LaunchConfig.dq_gstate (fused only):
    the dq walk also sums the backward segment states, else _seg_state_kernel does."""
    cfg = CFG.replace(fuse_dkdv=fuse, dq_gstate=gstate, small={"fuse_dkdv": fuse})
    cu = torch.tensor([0, 50, 50, 131], dtype=torch.int32)
    _check(1, 131, 2, 96, 48, dtype, "strong", True, True, cu=cu, config=cfg)  # "dv" block covers E
    _check(1, 131, 2, 64, 96, dtype, "weak", True, True, cu=cu, config=cfg)  # "dv_fused" when fused
    _check(1, 70, 2, 32, 32, dtype, "weak", True, True, config=cfg)  # small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [False, True])
def test_forward_and_backward_paths(dtype, mode):
    """LaunchConfig.lookback: False = segment states + scan + walk kernels in the forward too; True = the
    look-back walks in the backward too (the default "fwd" is what the other tests run)."""
    cfg = CFG.replace(lookback=mode)
    cu = torch.tensor([0, 7, 7, 140, 141, 170], dtype=torch.int32)
    _check(1, 170, 2, 32, 16, dtype, "strong", True, True, cu=cu, config=cfg)
    _check(2, 130, 2, 64, 32, dtype, "weak", True, True, config=cfg)


@pytest.mark.parametrize("mode", ["fwd", True])
def test_lookback_segments_of_several_chunks(mode):
    """Look-back segments of several chunks, dense and packed, every output and gradient."""
    cfg = CFG.replace(lookback=mode, seg_chunks=3)
    cu = torch.tensor([0, 100, 100, 500, 501, 530], dtype=torch.int32)
    _check(1, 530, 2, 16, 32, torch.float32, "weak", True, True, cu=cu, config=cfg)
    _check(2, 450, 1, 32, 16, torch.float32, "strong", True, True, config=cfg)


def _spy_launches(monkeypatch, key):
    """Wrap launch._call: returns {kernel name: set of the launch argument ``key`` seen}, filled as kernels
    launch (launches without that argument are not recorded)."""
    seen = {}
    orig = launch._call

    def spy(kernel, grid, *a, **kw):
        if key in kw:
            name = getattr(getattr(kernel, "fn", kernel), "__name__", "?")
            seen.setdefault(name, set()).add(kw[key])
        return orig(kernel, grid, *a, **kw)

    monkeypatch.setattr(launch, "_call", spy)
    return seen


@pytest.mark.parametrize("mode", ["fwd", True])
@pytest.mark.parametrize("bt", [32, 128])
def test_walk_step_tokens(mode, bt, monkeypatch):
    """KernelLaunch.BT: the chunk walks step by bt tokens where whole steps tile the segments (two-chunk
    segments: 128 tokens), else by CHUNK (three-chunk segments with bt=128); dense with a partial last step
    and packed, every output and gradient against float64."""
    walks = ("fwd", "dqdk", "dv", "dv_fused")
    cfg = CFG.replace(lookback=mode, **{kind: {"BT": bt} for kind in walks},
                      small={kind: {"BT": bt} for kind in walks})
    seen = _spy_launches(monkeypatch, "BT")
    cu = torch.tensor([0, 100, 100, 300, 301, 330], dtype=torch.int32)
    _check(1, 330, 2, 32, 16, torch.float32, "weak", True, True, cu=cu, config=cfg.replace(seg_chunks=2))
    _check(2, 200, 1, 16, 32, torch.float32, "strong", True, True, config=cfg.replace(seg_chunks=2))
    if DEV == "cpu" or torch.cuda.get_device_capability()[0] >= 9:  # the same through TMA descriptors
        every = {kind: {"BT": bt, "tma": True} for kind in walks}
        _check(2, 200, 1, 16, 32, torch.float32, "strong", True, True,
               config=cfg.replace(seg_chunks=2, tma=True, small=every, **every))
    walk_kernels = {"_lb_walk_kernel"} | ({"_bwd_dqdk_kernel", "_bwd_dv_kernel"} if mode == "fwd" else set())
    assert all(seen[w] == {bt} for w in walk_kernels), seen
    seen.clear()
    _check(1, 200, 2, 16, 16, torch.float32, "strong", False, True, config=cfg.replace(seg_chunks=3))
    assert all(seen[w] == {bt if bt == 32 else 64} for w in walk_kernels), seen


def test_segment_length_does_not_change_the_result():
    q, k, v, s, h0, _, _ = _make(1, 300, 2, 16, 16, torch.float32, "strong", True)
    dev = lambda x: x.to(DEV)  # noqa: E731
    outs = []
    for seg in (1, 2, 8):
        outs.append(_triton(dev(q), dev(k), dev(v), dev(s), dev(h0), None, config=CFG.replace(seg_chunks=seg)))
    for o, ht in outs[1:]:
        assert torch.allclose(o, outs[0][0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(ht, outs[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "B,T,H,D,expected",
    [(4, 2048, 16, 128, 16), (4, 8192, 16, 128, 64), (4, 16384, 16, 128, 64), (4, 32768, 16, 128, 64),
     (1, 131072, 16, 128, 64), (2, 32768, 32, 64, 64), (1, 32768, 8, 128, 32), (1, 64, 1, 16, 1)],
)
def test_automatic_segment_length_for_a_gpu(B, T, H, D, expected, monkeypatch):
    """The segment length chosen for a 132-SM GPU: 2 waves of <= 32-chunk segments, and <= 64-chunk segments
    in 2 waves (LaunchConfig.seg_long) once the first rule is saturated, rounded to a power of two
    (benchmarks/results/kernel_segments_h200.md)."""
    monkeypatch.setattr(plan_mod, "_num_sms", lambda device: 132)
    plan = plan_mod._Plan(B, T, H, D, D, None, torch.device("cuda"), DEFAULT)
    assert plan.seg_chunks == expected
    assert plan.lb_chunks == plan.seg_chunks  # "fwd" look-back mode stores the scan's segment states
    no_long = DEFAULT.replace(seg_long=None)
    assert plan_mod._Plan(B, T, H, D, D, None, torch.device("cuda"), no_long).seg_chunks == min(expected, 32)


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_long_sequence_against_torch_chunk(dtype):
    """Long T, D=128, automatic segment size, against the torch chunked backend in fp64."""
    auto = lambda *xs: _triton(*xs, config=CFG.replace(seg_chunks=None))  # noqa: E731
    B, T, H, D = 2, 4099, 4, 128
    q, k, v, s, h0, do, dht = _make(B, T, H, D, D, dtype, "weak", True)
    s = torch.linspace(0.0, 0.2, H)
    cuda = lambda x: x.cuda()  # noqa: E731
    o, ht, grads = _run(cuda(q), cuda(k), cuda(v), cuda(s), cuda(h0), None, cuda(do), cuda(dht), auto)
    ref = lambda q, k, v, s, h0, cu: lightning_attn(  # noqa: E731
        q, k, v, s, initial_state=h0, output_final_state=True, backend="torch"
    )
    f64 = lambda x: x.double().cuda()  # noqa: E731
    o_r, ht_r, grads_r = _run(f64(q), f64(k), f64(v), f64(s), f64(h0), None, cuda(do), cuda(dht), ref)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel(o, o_r) < tol and rel(ht, ht_r) < tol
    for n, g, gr in zip(["dq", "dk", "dv", "dslopes", "dh0"], grads, grads_r):
        assert torch.isfinite(g).all(), n
        if n != "dslopes":
            assert rel(g, gr) < tol, (n, rel(g, gr))


@pytest.mark.gpu
def test_gpu_no_recompile_per_T():
    """A new T reuses the compiled kernels (T is a runtime argument, not specialised)."""
    H, D = 2, 64
    dev = "cuda"
    sizes = []
    for T in (1000, 1001, 2048, 3333):
        q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
        lightning_attn(q, q, q, torch.full((H,), 0.1, device=dev), backend="triton")
        torch.cuda.synchronize()
        sizes.append(sum(_n_compiled(getattr(kernels, name)) for name in KERNELS))
    assert sizes[0] > 0 and sizes[-1] == sizes[0], sizes


@pytest.mark.gpu
def test_gpu_fast_launch_equals_jit_launch():
    """Launching through the cached compiled kernels (LaunchConfig.fast_launch) gives bit-identical results to
    Triton's own launch path, and inputs that are not 16-byte aligned get their own kernel, not the aligned one."""
    B, T, H, D = 2, 1000, 4, 64
    q, k, v, s, h0, do, dht = _make(B, T, H, D, D, torch.bfloat16, "weak", True)
    do, dht = do.cuda(), dht.cuda()

    def leaf(x, offset):  # a contiguous leaf whose data pointer is `offset` elements past a 16-byte boundary
        buf = torch.empty(x.numel() + offset, dtype=x.dtype, device="cuda")
        y = buf[offset:].view(x.shape)
        y.copy_(x)
        assert y.is_contiguous() and (y.data_ptr() % 16 == 0) == (offset == 0)
        return y.requires_grad_(True)

    def run(offset, cfg):
        leaves = [leaf(q, offset), leaf(k, offset), leaf(v, offset), s.cuda().requires_grad_(True),
                  h0.cuda().requires_grad_(True)]
        o, ht = _triton(*leaves, None, config=cfg)
        ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
        return [o.detach(), ht.detach()] + [x.grad for x in leaves]

    results = {}
    for fast in (False, True, True):  # the second fast run launches from the cache
        cfg = CFG.replace(seg_chunks=None, fast_launch=fast)
        for offset in (0, 1):
            results.setdefault(offset, []).append(run(offset, cfg))
    aligned = [all(a[1] for a in key[3] if isinstance(a, tuple) and len(a) == 2)
               for key in launch._COMPILED if key[0] is kernels._bwd_dqdk_kernel]
    assert True in aligned and False in aligned, "aligned and misaligned launches must be cached apart"
    names = ["o", "ht", "dq", "dk", "dv", "dslopes", "dh0"]
    for offset, runs in results.items():
        for again in runs[1:]:
            for n, a, b in zip(names, runs[0], again):
                assert torch.equal(a, b), (offset, n)
    for n, a, b in zip(names, results[0][0], results[1][0]):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2), ("aligned vs misaligned", n)


KERNELS = ["_seg_state_kernel", "_scan_kernel", "_fwd_out_kernel", "_bwd_dqdk_kernel", "_bwd_dv_kernel", "_lb_walk_kernel"]


def _n_compiled(fn):
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
    return sum(len(c) for c in fn.cache.values())


def test_out_of_shared_memory_relaunches_with_one_stage(monkeypatch):
    """A launch whose tiles exceed shared memory (fp32, D = 256 on an H100) is retried with num_stages=1."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class FakeKernel:
        __name__ = "fake_kernel"

        def __init__(self, fits_stages):
            self.fits_stages = fits_stages

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs["num_stages"])
                if kwargs["num_stages"] > self.fits_stages:
                    raise OutOfResources(262144, 232448, "shared memory")
                return "ran"

            return launch

    monkeypatch.setattr(launch, "_SINGLE_STAGE", set())
    x = torch.zeros(1)
    assert launch._call(FakeKernel(1), (1,), x, BD=256, num_stages=2) == "ran"
    assert calls == [2, 1]
    assert launch._call(FakeKernel(1), (1,), x, BD=256, num_stages=2) == "ran"  # remembered: no failed try
    assert calls == [2, 1, 1]
    assert launch._call(FakeKernel(1), (1,), x, BD=128, num_stages=2) == "ran"  # another shape tries 2 stages
    assert calls == [2, 1, 1, 2, 1]
    with pytest.raises(OutOfResources):  # nothing left to shed: the error surfaces
        launch._call(FakeKernel(0), (1,), x, BD=64, num_stages=2)


def _tma_used(monkeypatch, cfg, *args):
    """Run fwd + bwd under cfg and return ({kernel name: TMA flags seen}, outputs + gradients)."""
    orig = launch._call
    seen = _spy_launches(monkeypatch, "TMA")
    q, k, v, s, do, cu = args
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o, _ = chunk.chunk_lightning_attn(*leaves, s, q.shape[-1] ** -0.5, cu_seqlens=cu, config=cfg)
    o.backward(do)
    monkeypatch.setattr(launch, "_call", orig)
    return seen, [o.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("lookback", ["fwd", True])
@pytest.mark.parametrize("D,E", [(64, 32), (128, 128)])
def test_tma_tiles_equal_pointer_loads(lookback, D, E, monkeypatch):
    """LaunchConfig.tma: the chunk walks' tiles moved by TMA descriptors (run by the interpreter on the CPU,
    natively on a Hopper GPU) give what the masked pointer loads give, for o and every gradient, with a
    partial last chunk and two sequences per batch (rows past T load as 0 and are not stored); packed
    (varlen) batches take the pointer loads."""
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper or newer GPU")
    torch.manual_seed(0)
    B, T, H = 2, 130, 2
    q, k = (torch.randn(B, T, H, D, device=DEV) for _ in range(2))
    v, do = (torch.randn(B, T, H, E, device=DEV) for _ in range(2))
    s = torch.tensor([0.05, 0.3], device=DEV)
    cfg = CFG.replace(lookback=lookback, seg_chunks=2)
    every = {kind: {"tma": True} for kind in ("fwd", "dqdk", "dv", "dv_fused")}
    every["small"] = {kind: {"tma": True} for kind in ("fwd", "dqdk", "dv", "dv_fused")}
    seen_t, tma = _tma_used(monkeypatch, cfg.replace(tma=True, **every), q, k, v, s, do, None)
    seen_p, ptr = _tma_used(monkeypatch, cfg.replace(tma=False), q, k, v, s, do, None)
    walks = {"_lb_walk_kernel"} | ({"_bwd_dqdk_kernel", "_bwd_dv_kernel"} if lookback == "fwd" else set())
    assert walks <= set(seen_t) and all(seen_t[w] == {True} for w in walks), seen_t
    assert all(flags == {False} for flags in seen_p.values()), seen_p
    for a, b in zip(tma, ptr):
        assert rel(a, b) < 1e-6
    # packed sequences: pointer loads
    cu = torch.tensor([0, 70, 260], dtype=torch.int32, device=DEV)
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v)]
    seen_v, _ = _tma_used(monkeypatch, cfg.replace(tma=True, **every), *flat, s, do.reshape(1, B * T, H, E), cu)
    assert all(flags == {False} for flags in seen_v.values()), seen_v
    # the default: TMA where KernelLaunch.tma is set (not the dq walk, not at D, E <= 64) on a Hopper GPU,
    # never on the CPU
    seen_d, _ = _tma_used(monkeypatch, cfg, q, k, v, s, do, None)
    assert seen_d.get("_bwd_dqdk_kernel", {False}) == {False}
    on_gpu = {True} if lookback == "fwd" else {True, False}  # lookback True: the dq, dk walks are "dqdk"
    expected = on_gpu if DEV == "cuda" and D > 64 else {False}
    assert seen_d["_lb_walk_kernel"] == expected, seen_d
