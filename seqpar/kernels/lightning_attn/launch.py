"""Launchers of the Triton kernels: blocks, grids and launch options from a :class:`LaunchConfig`.

Every launcher takes the plan of the call (:mod:`.plan`) and the launch config ``cfg`` as arguments.
Forward: the look-back walk (:func:`lightning_attn_fwd_lb`, cfg.lookback "fwd" or True) or segment
states + scan + output walk (:func:`lightning_attn_fwd`, cfg.lookback False). Backward: segment states
(or the dq walk) + reverse scan + dq/dk and dv walks (:func:`lightning_attn_bwd`), or the look-back
walks (:func:`lightning_attn_bwd_lb`, cfg.lookback True). :func:`_call` launches one kernel.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation
from triton.runtime.errors import OutOfResources

from .kernels import (
    _bwd_dqdk_kernel,
    _bwd_dv_kernel,
    _dslopes_kernel,
    _fwd_out_kernel,
    _lb_walk_kernel,
    _scan_kernel,
    _seg_state_kernel,
)
from .plan import CHUNK, _blk, _cdiv, _p2
from .tuning import KernelLaunch, LaunchConfig

_DUMMIES: dict = {}


def _dummy(device):
    """A 1-element int32 tensor for pointer arguments a launch does not use (one per device)."""
    d = _DUMMIES.get(device)
    if d is None:
        d = _DUMMIES[device] = torch.empty(1, dtype=torch.int32, device=device)
    return d


def _up(x) -> bool:
    return x.dtype == torch.bfloat16 and not x.is_cuda


def _scratch(size: int, alignment: int, stream):
    """Triton's global scratch (the TMA descriptors a kernel builds): a byte tensor on the current GPU."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma(cfg: LaunchConfig, kind: str, plan, tensors, fits: bool) -> bool:
    """Whether a walk of ``kind`` moves its tiles through TMA descriptors (its KernelLaunch.tma and
    LaunchConfig.tma): fixed-length batches only
    (``fits``: the head dims are whole blocks of the launch), every tensor contiguous and 16-byte aligned
    with 16-byte rows of H x head dim, and a Hopper or newer GPU ("auto", True) or the interpreter (True).
    On a GPU it also sets Triton's scratch allocator in this thread when none is set (the kernels write
    their descriptors to global scratch; the autograd thread that runs the backward needs its own)."""
    D, E = tensors[0].shape[-1], tensors[2].shape[-1]
    if (cfg.tma is False or not _kernel(cfg, kind, D, E).tma or plan.is_varlen or not fits
            or not hasattr(tl, "make_tensor_descriptor")):
        return False
    x = tensors[0]
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif cfg.tma is not True:
        return False
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() % 16 or (t.shape[-2] * t.shape[-1] * t.element_size()) % 16:
            return False
    if x.is_cuda and isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


def _state_mode(cfg: LaunchConfig, dtype) -> int:
    """STATE constexpr of the kernels (see kernels._sdot): fp32 and fp16 inputs take fp32 operands (fp16
    cannot hold a large state); bf16 inputs follow cfg.state_bf16: "split" (hi + lo bf16 tiles), "tf32"
    (fp32 operands) or "bf16" (state and decayed rows rounded to bf16: the least work, the largest output
    and state errors, and a slope gradient that degrades with T)."""
    if dtype != torch.bfloat16:
        return 1
    return cfg.state_mode


def _prec(cfg: LaunchConfig, dtype) -> str:
    return cfg.fp32_precision if dtype == torch.float32 else "tf32"


def _small(D, E) -> bool:
    """Both head dims fit in 64: the cfg.small overrides apply."""
    return _p2(D) <= 64 and _p2(E) <= 64


def _kernel(cfg: LaunchConfig, kind, D, E) -> KernelLaunch:
    return cfg.kernel(kind, _small(D, E))


def _bt(cfg: LaunchConfig, kind, D, E, seg_t: int) -> int:
    """Tokens per step of a chunk walk of ``kind`` over segments of seg_t tokens: the kind's BT when whole
    steps tile the segment (so that no step reads or writes across a segment's end), else CHUNK."""
    bt = _kernel(cfg, kind, D, E).BT
    return bt if seg_t % bt == 0 else CHUNK


def _fuse_dkdv(cfg: LaunchConfig, D, E) -> bool:
    """dk in the dv kernel's reverse walk: cfg.fuse_dkdv, or cfg.small.fuse_dkdv (when set) for D, E <= 64."""
    return cfg.fuse(_small(D, E))


def _blocks_state(cfg: LaunchConfig, D, E, kind="seg"):
    blk = _kernel(cfg, kind, D, E).BLK
    return min(blk, _p2(D)), min(blk, _p2(E))


def _launch(cfg: LaunchConfig, kind, D, E, tma: bool = False) -> dict:
    """Launch options (num_warps, num_stages, maxnreg) of a kernel kind for head dims D, E; tma: the launch
    moves its tiles through TMA descriptors."""
    return _kernel(cfg, kind, D, E).options(tma)


# Launches whose tiles did not fit in shared memory with the configured pipeline depth (e.g. fp32
# inputs with D = 256): they are re-launched, and from then on launched, with num_stages = 1.
_SINGLE_STAGE: set = set()


def _stage_key(kernel, args, kwargs) -> tuple:
    """A launch's kernel, constexprs / launch options (num_stages aside) and first tensor's dtype."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    opts = tuple((k, str(v)) for k, v in sorted(kwargs.items()) if isinstance(v, (bool, int, str)) and k != "num_stages")
    return (name,) + opts + tuple(str(a.dtype) for a in args[:1] if isinstance(a, torch.Tensor))


# Compiled kernels by launch signature, for launching without JITFunction.run's per-call argument binding
# (LaunchConfig.fast_launch): {(kernel, device, kwargs, _signature(args)): (CompiledKernel, constexpr values)}.
_COMPILED: dict = {}


def _signature(args) -> tuple:
    """What Triton specialises a launch on, per positional argument: a tensor's dtype and 16-byte alignment,
    an int's width and whether it is 1 or a multiple of 16 (a superset of Triton's key: never too coarse)."""
    return tuple([
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF) if type(a) is int
        else type(a)
        for a in args
    ])


def _call(kernel, grid, *args, fast_launch: bool = False, **kwargs):
    """kernel[grid](*args, **kwargs), falling back to num_stages=1 when the tiles exceed shared memory.

    fast_launch (cfg.fast_launch), on a GPU: a launch whose signature was seen before goes straight to the
    compiled kernel's own launcher (``CompiledKernel[grid](*args, stream=...)``, which runs Triton's launch
    hooks as JITFunction.run does), skipping JITFunction.run's per-call binding and specialisation of every
    argument (host cost: benchmarks/results/host_overhead_h200.md).
    """
    if _SINGLE_STAGE and _stage_key(kernel, args, kwargs) in _SINGLE_STAGE:  # no key work on the usual path
        kwargs["num_stages"] = 1
    key = None
    if fast_launch and args[0].is_cuda:
        dev = args[0].get_device()  # a compiled kernel's function handle belongs to one device
        key = (kernel, dev, tuple(kwargs.items()), _signature(args))
        hit = _COMPILED.get(key)
        if hit is not None:
            ck, tail = hit
            ck[(tuple(grid) + (1, 1))[:3]](*args, *tail, stream=torch._C._cuda_getCurrentRawStream(dev))
            return ck
    try:
        ck = kernel[grid](*args, **kwargs)
    except OutOfResources:
        if kwargs.get("num_stages", 1) <= 1:
            raise
        _SINGLE_STAGE.add(_stage_key(kernel, args, kwargs))
        kwargs["num_stages"] = 1
        ck = kernel[grid](*args, **kwargs)
        key = None  # the next call takes the single-stage path above and caches under its own kwargs
    names = getattr(kernel, "arg_names", ())[len(args):]
    if key is not None and hasattr(ck, "__getitem__") and all(name in kwargs for name in names):
        _COMPILED[key] = (ck, tuple(kwargs[name] for name in names))  # constexprs, in declaration order
    return ck


def _new(shape, dtype, device, poison: bool):
    """An output buffer; poison (cfg.poison): NaN-filled, so that an element no program writes shows up."""
    x = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        x.fill_(float("nan"))
    return x


def _seg_states(a, b, slopes, plan, cfg: LaunchConfig, w_scale, from_end, prec):
    """[NSEG, H, D, E] fp32 segment contributions."""
    H, D, E = plan.H, plan.D, plan.E
    dev = a.device
    out = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
    if plan.NSEG == 0:
        return out
    BD, BE = _blocks_state(cfg, D, E)
    grid = (plan.NSEG * H * _cdiv(D, BD) * _cdiv(E, BE),)
    d = _dummy(dev)
    _call(
        _seg_state_kernel, grid,
        a, b, slopes, out, plan.cu if plan.is_varlen else d, plan.segseq if plan.is_varlen else d,
        plan.segstart if plan.is_varlen else d,
        plan.T, H, D, E, plan.NS, plan.SEG_T, float(w_scale),
        BT=CHUNK, BD=BD, BE=BE, FROM_END=from_end, IS_VARLEN=plan.is_varlen, PREC=prec, UP=_up(a),
        STATE=_state_mode(cfg, a.dtype), fast_launch=cfg.fast_launch,
        **_launch(cfg, "seg", D, E),
    )
    return out


def _scan(buf, init, slopes, plan, cfg: LaunchConfig, reverse, store_fin):
    """In-place segment scan of buf [NSEG, H, D, E] (see kernels._scan_kernel); returns fin [N, H, D, E] or None."""
    H, D, E = plan.H, plan.D, plan.E
    dev = buf.device
    fin = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev) if store_fin else None
    BD, BE = _blocks_state(cfg, D, E, "scan")
    grid = (plan.N * H * _cdiv(D, BD) * _cdiv(E, BE),)
    d = _dummy(dev)
    _call(
        _scan_kernel, grid,
        buf, init if init is not None else d, fin if fin is not None else d, slopes,
        plan.cu if plan.is_varlen else d, plan.segoff if plan.is_varlen else d,
        plan.T, H, D, E, plan.NS, plan.SEG_T,
        BD=BD, BE=BE, REVERSE=reverse, HAS_INIT=init is not None, STORE_FIN=store_fin,
        IS_VARLEN=plan.is_varlen, fast_launch=cfg.fast_launch, **_launch(cfg, "scan", D, E),
    )
    return fin


def _seg_args(plan, dev):
    d = _dummy(dev)
    if plan.is_varlen:
        return plan.cu, plan.segseq, plan.segstart
    return d, d, d


def lightning_attn_fwd(q, k, v, slopes, scale, h0, plan, cfg: LaunchConfig):
    """Segment states + scan + output walk. q, k [B, T, H, D], v [B, T, H, E], slopes [H] fp32, h0
    [N, H, D, E] fp32 or None. Returns o [B, T, H, E], ht [N, H, D, E] fp32, hbuf [NSEG, H, D, E] fp32
    (the state entering each segment, for the backward)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    prec = _prec(cfg, q.dtype)
    state_mode = _state_mode(cfg, q.dtype)
    hbuf = _seg_states(k, v, slopes, plan, cfg, 1.0, True, prec)
    ht = _scan(hbuf, h0, slopes, plan, cfg, reverse=False, store_fin=True)
    o = _new(v.shape, q.dtype, dev, cfg.poison)
    if plan.NSEG > 0:
        BD = _p2(D)
        BE = _blk(cfg, "fwd", E, D)
        grid = (plan.NSEG * H * _cdiv(E, BE),)
        _call(
            _fwd_out_kernel, grid,
            q, k, v, o, hbuf, slopes, *_seg_args(plan, dev),
            float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T,
            BT=_bt(cfg, "fwd", D, E, plan.SEG_T), BD=BD, BE=BE, IS_VARLEN=plan.is_varlen, STATE=state_mode,
            PREC=prec, UP=_up(q), fast_launch=cfg.fast_launch, **_launch(cfg, "fwd", D, E),
        )
    return o, ht, hbuf


def lightning_attn_bwd(q, k, v, do, dht, slopes, scale, h0_given, hbuf, plan, cfg: LaunchConfig, compute_dg,
                       ds_state: bool = False):
    """Backward from the forward's segment states hbuf [NSEG, H, D, E]. do [B, T, H, E], dht [N, H, D, E]
    fp32 or None. Returns dq, dk, dv, dh0 [N, H, D, E] fp32 (or None), dG [B*T, H] fp32 (or None): the
    rowwise q.dq - k.dk of the slope gradient, with compute_dg; ds_state: the slope gradient [H] fp32
    from the derivative-state kernel (see kernels._dslopes_kernel) instead, in place of dG.

    Fused path (dk in the dv kernel): dq walk (+ backward segment states) -> reverse scan -> dk/dv walk.
    Unfused: segment states of (q, do) -> reverse scan -> dq/dk walks -> dv walk.
    """
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    prec = _prec(cfg, q.dtype)
    state_mode = _state_mode(cfg, q.dtype)
    dq = _new(q.shape, q.dtype, dev, cfg.poison)
    dk = _new(k.shape, k.dtype, dev, cfg.poison)
    dv = _new(v.shape, v.dtype, dev, cfg.poison)
    ntok = q.shape[0] * q.shape[1]
    if plan.NSEG == 0:
        gbuf = torch.empty(0, H, D, E, dtype=torch.float32, device=dev)
        dh0 = _scan(gbuf, dht, slopes, plan, cfg, reverse=True, store_fin=h0_given)
        dG = torch.zeros(ntok, H, dtype=torch.float32, device=dev) if compute_dg else None
        if ds_state:  # no tokens: only the final states' term, which is 0 (S' of an empty sequence is 0)
            dG = torch.zeros(H, dtype=torch.float32, device=dev)
        return dq, dk, dv, dh0, dG
    BE = _p2(E)
    BDq = _blk(cfg, "dqdk", D, E)
    NDB = _cdiv(D, BDq)
    BD = _p2(D)
    BEv = _blk(cfg, "dv", E, D)
    kind_v = "dv"
    # dk in the dv kernel's reverse walk when one E block covers E (cfg.fuse_dkdv)
    fuse = _fuse_dkdv(cfg, D, E)
    if fuse and BEv < E:
        if _p2(E) <= cfg.dv_fused.BLK and _p2(D) * _p2(E) <= 128 * 128:
            BEv, kind_v = _p2(E), "dv_fused"
        else:
            fuse = False
    # the dq walk also sums the backward segment states when it runs before the scan (fused path)
    g_in_dq = fuse and cfg.dq_gstate
    if compute_dg:
        dgq = torch.empty(NDB, ntok, H, dtype=torch.float32, device=dev)
        dgk = torch.empty(1 if fuse else NDB, ntok, H, dtype=torch.float32, device=dev)
    else:
        dgq = dgk = _dummy(dev)

    tma_dq = _tma(cfg, "dqdk", plan, (q, k, v, do, dq, dk), D % BDq == 0 and BE == E)

    def dq_walk(gbuf):
        _call(
            _bwd_dqdk_kernel, (plan.NSEG * H * NDB,),
            q, k, v, do, dq, dk, hbuf, gbuf, dgq, dgk, slopes, *_seg_args(plan, dev),
            float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T, ntok, plan.N,
            BT=_bt(cfg, "dqdk", D, E, plan.SEG_T), BD=BDq, BE=BE, IS_VARLEN=plan.is_varlen, STATE=state_mode,
            PREC=prec, UP=_up(q), COMPUTE_DG=compute_dg, DO_DK=not fuse, STORE_G=g_in_dq, TMA=tma_dq,
            fast_launch=cfg.fast_launch,
            **_launch(cfg, "dqdk", D, E, tma_dq),
        )

    if g_in_dq:
        gbuf = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
        dq_walk(gbuf)
        dh0 = _scan(gbuf, dht, slopes, plan, cfg, reverse=True, store_fin=h0_given)
    else:
        gbuf = _seg_states(q, do, slopes, plan, cfg, scale, False, prec)
        dh0 = _scan(gbuf, dht, slopes, plan, cfg, reverse=True, store_fin=h0_given)
        dq_walk(gbuf)
    tma_dv = _tma(cfg, kind_v, plan, (q, k, v, do, dv, dk), BD == D and E % BEv == 0)
    _call(
        _bwd_dv_kernel, (plan.NSEG * H * _cdiv(E, BEv),),
        q, k, v, do, dv, dk, dgk, gbuf, slopes, *_seg_args(plan, dev),
        float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T, plan.N,
        BT=_bt(cfg, kind_v, D, E, plan.SEG_T), BD=BD, BE=BEv, IS_VARLEN=plan.is_varlen, STATE=state_mode,
        PREC=prec, UP=_up(q), DO_DK=fuse, COMPUTE_DG=compute_dg, TMA=tma_dv, fast_launch=cfg.fast_launch,
        **_launch(cfg, kind_v, D, E, tma_dv),
    )
    dG = dgq.sum(0) - dgk.sum(0) if compute_dg else None
    if ds_state:
        dG = _dslopes(q, k, v, do, hbuf, gbuf, slopes, scale, plan, cfg)
    return dq, dk, dv, dh0, dG


def _dslopes(q, k, v, do, hbuf, gbuf, slopes, scale, plan, cfg: LaunchConfig):
    """The slope gradient [H] fp32 from hbuf (the state entering each segment) and gbuf (the state gradient
    entering it from the right), both [NSEG, H, D, E] fp32: one _dslopes_kernel launch and a sum."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    BD, BE = _blocks_state(cfg, D, E, "dsl")
    nb = _cdiv(D, BD) * _cdiv(E, BE)
    part = torch.empty(plan.NSEG * H * nb, dtype=torch.float32, device=dev)
    _call(
        _dslopes_kernel, (plan.NSEG * H * nb,),
        q, k, v, do, hbuf, gbuf, part, slopes, *_seg_args(plan, dev),
        float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T,
        BT=CHUNK, BD=BD, BE=BE, IS_VARLEN=plan.is_varlen, STATE=_state_mode(cfg, q.dtype),
        PREC=_prec(cfg, q.dtype), UP=_up(q), fast_launch=cfg.fast_launch, **_launch(cfg, "dsl", D, E),
    )
    return -part.view(plan.NSEG, H, nb).sum((0, 2))


# ---- look-back walks (cfg.lookback): the forward ("fwd"), or every output (True)


def _lb_walk(a, b, c, out, slopes, plan, cfg: LaunchConfig, kind, reverse, init, trans_init, fin, alpha, gamma,
             beta, sync, x=None, g=None, sbuf=None):
    """Launch _lb_walk_kernel: out = LA(a, b, c) (see its docstring); sync: zeroed int32 [1 + 2 * lanes]."""
    H = plan.H
    DA, DC = a.shape[-1], c.shape[-1]
    dev = a.device
    pf_t, NP, tab, n_pos, _ = plan.lb_layout(dev)
    BK = _p2(DA)
    BC = _blk(cfg, kind, DC, DA)
    NCB = _cdiv(DC, BC)
    lanes = plan.N * H * NCB
    chain = torch.empty(2 * lanes * BK * BC, dtype=torch.float32, device=dev)
    d = _dummy(dev)
    tma = _tma(cfg, kind, plan, (a, b, c, out) + ((x,) if x is not None else ()), BK == DA and DC % BC == 0)
    _call(
        _lb_walk_kernel, (n_pos * H * NCB,),
        a, b, c, out, x if x is not None else d, g if g is not None else d,
        init if init is not None else d, fin if fin is not None else d, chain, sync, slopes,
        plan.cu if plan.is_varlen else d, tab if tab is not None else d,
        sbuf if sbuf is not None else d, plan.segoff if (plan.is_varlen and sbuf is not None) else d,
        float(alpha), float(gamma), float(beta), plan.T, H, DA, DC, plan.N, NP, pf_t, a.shape[0] * a.shape[1],
        BT=_bt(cfg, kind, DA, DC, pf_t), BK=BK, BC=BC, REVERSE=reverse, TRANS_INIT=trans_init,
        HAS_INIT=init is not None, STORE_FIN=fin is not None, STORE_SBUF=sbuf is not None, COMPUTE_DG=g is not None,
        IS_VARLEN=plan.is_varlen,
        STATE=_state_mode(cfg, a.dtype), PREC=_prec(cfg, a.dtype), UP=_up(a),
        TMA=tma, fast_launch=cfg.fast_launch, **_launch(cfg, kind, DA, DC, tma),
    )


def _lb_lanes(plan, cfg: LaunchConfig, kind, DA, DC) -> int:
    return plan.N * plan.H * _cdiv(DC, _blk(cfg, kind, DC, DA))


def _fill_empty(fin, init, empty):
    """Final state of empty sequences = their initial state (or 0)."""
    if empty is not None and fin is not None:
        fin[empty] = init[empty] if init is not None else 0.0


def lightning_attn_fwd_lb(q, k, v, slopes, scale, h0, plan, cfg: LaunchConfig, store_states=False):
    """Look-back forward (shapes as :func:`lightning_attn_fwd`): returns o, ht [N, H, D, E] fp32 and, with
    store_states (plan.lb_chunks must equal plan.seg_chunks), hbuf [NSEG, H, D, E] fp32: the state
    entering each segment (else None)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    o = _new(v.shape, q.dtype, dev, cfg.poison)
    ht = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev)
    hbuf = None
    if store_states:
        assert plan.lb_chunks == plan.seg_chunks, "segment states need look-back segments = scan segments"
        hbuf = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
    _, _, _, n_pos, empty = plan.lb_layout(dev)
    if n_pos > 0:
        sync = torch.zeros(1 + 2 * _lb_lanes(plan, cfg, "fwd", D, E), dtype=torch.int32, device=dev)
        _lb_walk(q, k, v, o, slopes, plan, cfg, "fwd", False, h0, False, ht, scale, scale, 1.0, sync, sbuf=hbuf)
    _fill_empty(ht, h0, empty)
    return o, ht, hbuf


def lightning_attn_bwd_lb(q, k, v, do, dht, slopes, scale, h0, plan, cfg: LaunchConfig, compute_dg):
    """Look-back backward: dq = LA(do, v, k), dk = LA_rev(v, do, q), dv = LA_rev(k, q, do).

    h0 [N, H, D, E] fp32 or None (the states are recomputed from it). Returns dq, dk, dv, dh0 (or None),
    dG [B*T, H] fp32 (or None)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    dq = _new(q.shape, q.dtype, dev, cfg.poison)
    dk = _new(k.shape, k.dtype, dev, cfg.poison)
    dv = _new(v.shape, v.dtype, dev, cfg.poison)
    dh0 = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev) if h0 is not None else None
    ntok = q.shape[0] * q.shape[1]
    _, _, _, n_pos, empty = plan.lb_layout(dev)
    dG = None
    if n_pos == 0:
        _fill_empty(dh0, dht, empty)
        if compute_dg:
            dG = torch.zeros(ntok, H, dtype=torch.float32, device=dev)
        return dq, dk, dv, dh0, dG
    nq = _cdiv(D, _blk(cfg, "dqdk", D, E))
    if compute_dg:
        dgq = torch.empty(nq, ntok, H, dtype=torch.float32, device=dev)
        dgk = torch.empty(nq, ntok, H, dtype=torch.float32, device=dev)
    else:
        dgq = dgk = None
    lq = lk = _lb_lanes(plan, cfg, "dqdk", E, D)  # dq and dk: value dim D in "dqdk" blocks, key dim E
    lv = _lb_lanes(plan, cfg, "dv", D, E)
    sync = torch.zeros(3 + 2 * (lq + lk + lv), dtype=torch.int32, device=dev)
    s_q, s_k, s_v = sync[: 1 + 2 * lq], sync[1 + 2 * lq: 2 + 2 * (lq + lk)], sync[2 + 2 * (lq + lk):]
    _lb_walk(do, v, k, dq, slopes, plan, cfg, "dqdk", False, h0, True, None, scale, scale, 1.0, s_q, x=q, g=dgq)
    _lb_walk(v, do, q, dk, slopes, plan, cfg, "dqdk", True, dht, True, None, scale, 1.0, scale, s_k, x=k, g=dgk)
    _lb_walk(k, q, do, dv, slopes, plan, cfg, "dv", True, dht, False, dh0, scale, 1.0, scale, s_v)
    _fill_empty(dh0, dht, empty)
    if compute_dg:
        dG = dgq.sum(0) - dgk.sum(0)
    return dq, dk, dv, dh0, dG


def _on(device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
