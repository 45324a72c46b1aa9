"""Launch values of the Triton kernels as one immutable value, :class:`LaunchConfig`.

A launcher receives the config as an argument (``cfg``); nothing reads a module-level mutable table.
``DEFAULT`` holds the shipped values; :meth:`LaunchConfig.replace` derives a variant (nested dicts merge
into the nested values, unknown keys raise); :func:`from_env` is ``DEFAULT`` with the overrides of the
environment (``SEQPAR_LA_CONFIG``: a JSON object of the same shape as ``replace``'s arguments, e.g.
``'{"fwd": {"num_warps": 8}, "lookback": false}'``), read once per process. Every value is checked when
a config is built, so a bad value fails at ``replace`` / ``from_env`` with the name of the field.

Kernel kinds: "seg" (_seg_state_kernel), "scan" (_scan_kernel), "fwd" (_fwd_out_kernel and the
forward look-back walk), "dqdk" (_bwd_dqdk_kernel, the dq / dk look-back walks), "dv" (_bwd_dv_kernel,
the dv look-back walk), "dv_fused" (_bwd_dv_kernel computing dk too, when "dv"'s block does not cover E),
"dsl" (_dslopes_kernel, both head dims split by BLK).
Measured effects of these values: benchmarks/NOTES_kernel.md and benchmarks/results/kernel_tuning_*.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

KINDS = ("seg", "scan", "fwd", "dqdk", "dv", "dv_fused", "dsl")
STATE_BF16_MODES = {"bf16": 0, "tf32": 1, "split": 2}  # value of the kernels' STATE constexpr
STATE_BF16_CHOICES = ("auto",) + tuple(STATE_BF16_MODES)  # "auto": see LaunchConfig
DSLOPES_CHOICES = ("state", "rowsum")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_WARPS = (1, 2, 4, 8, 16, 32)


def _check_int(owner: str, name: str, val, lo: int = 1, optional: bool = False) -> None:
    if val is None and optional:
        return
    if type(val) is not int or val < lo:
        what = f"an int >= {lo}" + (" or None" if optional else "")
        raise ValueError(f"{owner}.{name} must be {what}, got {val!r}")


def _check_bool(owner: str, name: str, val, optional: bool = False) -> None:
    if val is None and optional:
        return
    if not isinstance(val, bool):
        raise ValueError(f"{owner}.{name} must be True or False{' or None' if optional else ''}, got {val!r}")


def _check_block(owner: str, name: str, val, optional: bool) -> None:
    """A tile size: a power of two in [16, 256] (None allowed when optional)."""
    if val is None and optional:
        return
    if type(val) is not int or val < 16 or val > 256 or val & (val - 1):
        raise ValueError(f"{owner}.{name} must be a power of two in [16, 256], got {val!r}")


def _check_launch_values(owner: str, blk, num_warps, num_stages, maxnreg, optional: bool) -> None:
    _check_block(owner, "BLK", blk, optional)
    if not (num_warps is None and optional) and (type(num_warps) is not int or num_warps not in _WARPS):
        raise ValueError(f"{owner}.num_warps must be one of {_WARPS}, got {num_warps!r}")
    _check_int(owner, "num_stages", num_stages, optional=True)
    _check_int(owner, "maxnreg", maxnreg, lo=16, optional=True)


@dataclass(frozen=True)
class KernelLaunch:
    """Launch values of one kernel kind.

    BLK: the largest block of the kernel's split head dim (E for "fwd"/"dv"/"dv_fused", D for "dqdk", both
    for "seg"/"scan"), further capped so that a register-resident fp32 state block has at most 128 x 128
    elements. num_warps; num_stages (None: Triton's default); maxnreg (None: no register cap).
    tma (the chunk walks "fwd", "dqdk", "dv", "dv_fused"): the walk moves its tiles through TMA descriptors
    where LaunchConfig.tma allows it; tma_stages: num_stages of such a launch (None: num_stages).
    BT (the chunk walks): tokens per step of the walk, a power of two in [16, 256]; a walk whose segments
    are not a whole number of BT-token steps steps by plan.CHUNK instead.
    """

    BLK: int
    num_warps: int
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    tma: bool = False
    tma_stages: Optional[int] = None
    BT: int = 64

    def __post_init__(self):
        _check_launch_values("KernelLaunch", self.BLK, self.num_warps, self.num_stages, self.maxnreg, False)
        _check_bool("KernelLaunch", "tma", self.tma)
        _check_int("KernelLaunch", "tma_stages", self.tma_stages, optional=True)
        _check_block("KernelLaunch", "BT", self.BT, False)

    def options(self, tma: bool = False) -> dict:
        """The launch options passed to ``kernel[grid](...)``: num_warps and the values that are set;
        tma: the launch moves its tiles through TMA descriptors (tma_stages applies)."""
        opts = {"num_warps": self.num_warps}
        stages = self.tma_stages if tma and self.tma_stages is not None else self.num_stages
        if stages is not None:
            opts["num_stages"] = stages
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


@dataclass(frozen=True)
class KernelOverride:
    """Values that replace those of a :class:`KernelLaunch` (None: keep it)."""

    BLK: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    tma: Optional[bool] = None
    tma_stages: Optional[int] = None
    BT: Optional[int] = None

    def __post_init__(self):
        _check_launch_values("KernelOverride", self.BLK, self.num_warps, self.num_stages, self.maxnreg, True)
        _check_bool("KernelOverride", "tma", self.tma, optional=True)
        _check_int("KernelOverride", "tma_stages", self.tma_stages, optional=True)
        _check_block("KernelOverride", "BT", self.BT, True)

    def apply(self, base: KernelLaunch) -> KernelLaunch:
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **changes) if changes else base


@dataclass(frozen=True)
class SegLong:
    """Longer segments once the first rule is saturated: at most ``seg_max`` chunks for ``waves`` waves."""

    waves: int = 2
    seg_max: int = 64

    def __post_init__(self):
        _check_int("LaunchConfig.seg_long", "waves", self.waves)
        _check_int("LaunchConfig.seg_long", "seg_max", self.seg_max)


@dataclass(frozen=True)
class SmallHeads:
    """Overrides when both head dims fit in 64 (D, E <= 64).

    fuse_dkdv: replaces LaunchConfig.fuse_dkdv (None: keep it). Per kind: a :class:`KernelOverride`; its
    BLK applies to the state kernels ("seg", "scan"), whose both dims are split by BLK; the walk kernels
    take their block from the kind's own BLK (their other dim is held whole).
    """

    fuse_dkdv: Optional[bool] = None
    seg: KernelOverride = KernelOverride()
    scan: KernelOverride = KernelOverride()
    fwd: KernelOverride = KernelOverride()
    dqdk: KernelOverride = KernelOverride()
    dv: KernelOverride = KernelOverride()
    dv_fused: KernelOverride = KernelOverride()
    dsl: KernelOverride = KernelOverride()

    def __post_init__(self):
        _check_bool("LaunchConfig.small", "fuse_dkdv", self.fuse_dkdv, optional=True)
        for kind in KINDS:
            if not isinstance(getattr(self, kind), KernelOverride):
                raise TypeError(f"LaunchConfig.small.{kind} must be a KernelOverride or a dict, "
                                f"got {type(getattr(self, kind)).__name__}")


@dataclass(frozen=True)
class LaunchConfig:
    """Every launch value of the Triton path (GPU), as one immutable, hashable value.

    Per kernel kind (see the module docstring): seg, scan, fwd, dqdk, dv, dv_fused, dsl (:class:`KernelLaunch`).
    Segment sizing (automatic when seg_chunks is None, on a GPU): segments get ``waves`` x SMs programs
    of the output kernel, of at most ``seg_max`` chunks; ``seg_long`` (or None): at most its ``seg_max``
    chunks for its ``waves`` once the first rule gives seg_max; the count is then rounded to a power of
    two. seg_chunks: a fixed number of chunks per segment for every call (None: automatic; a call's own
    seg_chunks takes precedence).
    lookback: "fwd" (one-pass look-back walk for the forward, which also stores the segment states for
    the scan-path backward), True (look-back walks for the backward too, segments of ``lb_chunks``
    chunks unless a segment length is given), False (segment states + scan + walk kernels).
    state_bf16: state products of bf16 inputs: "split" (hi + lo bf16 tiles: the fp32 state to ~1e-5),
    "tf32" (fp32 operands), "bf16" (state and decayed rows rounded to bf16: the least work) or "auto"
    ("bf16", except "split" when the slopes need a gradient that comes from the rowwise sums, i.e.
    dslopes "rowsum" or lookback True). Resolved per call by :meth:`for_grads`.
    dslopes: how the slope gradient is formed. "state" (kernels._dslopes_kernel: derivative states in
    fp32, contracted elementwise; one extra launch after the backward, from the forward's segment states
    and the backward's) or "rowsum" (-sum_t (t+1) (q_t.dq_t - k_t.dk_t) from the backward's accumulators: no extra
    pass, but its large terms cancel, so bf16 inputs need the "split" state). lookback True always uses
    "rowsum" (it keeps no segment states).
    fuse_dkdv: dk in the dv kernel's reverse walk when one E block ("dv", or "dv_fused" for
    D * E <= 128 * 128) covers E. dq_gstate: with fuse_dkdv, the dq walk also sums the backward segment
    states (q, do) that the reverse scan needs, in place of a _seg_state_kernel pass.
    fast_launch: on a GPU, launch through the compiled kernel once its launch signature has been seen.
    tma: the chunk walks whose kind sets ``KernelLaunch.tma`` (by default the look-back forward and the
    dv / dk+dv walk for head dims above 64; the dq walk, and every walk at D, E <= 64, are as fast or
    faster with pointer loads) move their tiles through TMA tensor
    descriptors instead of masked pointer loads: "auto" (on Hopper and newer GPUs), True (also under the
    CPU interpreter, for tests) or False (never). Either way only for fixed-length batches whose head dims
    are whole blocks and whose tensors are 16-byte aligned; the other calls take the pointer loads.
    small: :class:`SmallHeads` overrides for D, E <= 64.
    fp32_precision: dots of fp32 inputs, "ieee" (exact fp32) or "tf32" / "tf32x3" (tensor cores).
    poison: fill outputs with NaN before the kernels run (debug aid: an unwritten element shows up).
    """

    seg: KernelLaunch = KernelLaunch(BLK=64, num_warps=4, num_stages=2)
    scan: KernelLaunch = KernelLaunch(BLK=64, num_warps=4)
    fwd: KernelLaunch = KernelLaunch(BLK=64, num_warps=4, num_stages=2, tma=True)
    dqdk: KernelLaunch = KernelLaunch(BLK=64, num_warps=4, num_stages=2)
    dv: KernelLaunch = KernelLaunch(BLK=64, num_warps=4, num_stages=2, tma=True)
    dv_fused: KernelLaunch = KernelLaunch(BLK=128, num_warps=8, num_stages=2, tma=True, tma_stages=3)
    dsl: KernelLaunch = KernelLaunch(BLK=64, num_warps=4, num_stages=3)
    waves: int = 2
    seg_max: int = 32
    seg_long: Optional[SegLong] = SegLong(waves=2, seg_max=64)
    seg_chunks: Optional[int] = None
    lookback: Union[bool, str] = "fwd"
    lb_chunks: int = 4
    state_bf16: str = "auto"
    dslopes: str = "state"
    fuse_dkdv: bool = True
    dq_gstate: bool = True
    fast_launch: bool = True
    tma: Union[bool, str] = "auto"
    small: SmallHeads = SmallHeads(
        fuse_dkdv=True,
        scan=KernelOverride(BLK=32),
        fwd=KernelOverride(num_stages=3, tma=False),
        dqdk=KernelOverride(num_stages=3),
        dv=KernelOverride(num_stages=3, tma=False),
    )
    fp32_precision: str = "ieee"
    poison: bool = False

    def __post_init__(self):
        for kind in KINDS:
            if not isinstance(getattr(self, kind), KernelLaunch):
                raise TypeError(f"LaunchConfig.{kind} must be a KernelLaunch or a dict, "
                                f"got {type(getattr(self, kind)).__name__}")
        _check_int("LaunchConfig", "waves", self.waves)
        _check_int("LaunchConfig", "seg_max", self.seg_max)
        if self.seg_long is not None and not isinstance(self.seg_long, SegLong):
            raise TypeError(f"LaunchConfig.seg_long must be a SegLong, a dict or None, "
                            f"got {type(self.seg_long).__name__}")
        _check_int("LaunchConfig", "seg_chunks", self.seg_chunks, optional=True)
        if not (self.lookback is True or self.lookback is False or self.lookback == "fwd"):
            raise ValueError(f'LaunchConfig.lookback must be True, False or "fwd", got {self.lookback!r}')
        _check_int("LaunchConfig", "lb_chunks", self.lb_chunks)
        if not (self.tma is True or self.tma is False or self.tma == "auto"):
            raise ValueError(f'LaunchConfig.tma must be True, False or "auto", got {self.tma!r}')
        if not isinstance(self.state_bf16, str) or self.state_bf16 not in STATE_BF16_CHOICES:
            raise ValueError(f"LaunchConfig.state_bf16 must be one of {list(STATE_BF16_CHOICES)}, "
                             f"got {self.state_bf16!r}")
        if self.dslopes not in DSLOPES_CHOICES:
            raise ValueError(f"LaunchConfig.dslopes must be one of {list(DSLOPES_CHOICES)}, got {self.dslopes!r}")
        for name in ("fuse_dkdv", "dq_gstate", "fast_launch", "poison"):
            _check_bool("LaunchConfig", name, getattr(self, name))
        if not isinstance(self.small, SmallHeads):
            raise TypeError(f"LaunchConfig.small must be a SmallHeads or a dict, got {type(self.small).__name__}")
        if self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"LaunchConfig.fp32_precision must be one of {FP32_PRECISIONS}, "
                             f"got {self.fp32_precision!r}")
        # resolved per head-size class once, so that a launch reads plain attributes
        small = {kind: getattr(self.small, kind).apply(getattr(self, kind)) for kind in KINDS}
        object.__setattr__(self, "_kernels", {False: {kind: getattr(self, kind) for kind in KINDS}, True: small})
        fuse_small = self.fuse_dkdv if self.small.fuse_dkdv is None else self.small.fuse_dkdv
        object.__setattr__(self, "_fuse", {False: self.fuse_dkdv, True: fuse_small})
        seg_long = None if self.seg_long is None else (self.seg_long.waves, self.seg_long.seg_max)
        object.__setattr__(self, "plan_key", (self.seg_chunks, str(self.lookback), self.lb_chunks, self.waves,
                                              self.seg_max, seg_long, self.fwd.BLK))

    def kernel(self, kind: str, small: bool) -> KernelLaunch:
        """Launch values of one kind; small: both head dims <= 64 (the :class:`SmallHeads` overrides applied)."""
        return self._kernels[small][kind]

    def fuse(self, small: bool) -> bool:
        """fuse_dkdv for this head-size class (small.fuse_dkdv when set, for D, E <= 64)."""
        return self._fuse[small]

    @property
    def state_mode(self) -> int:
        """The kernels' STATE constexpr for bf16 inputs (see kernels._sdot); an unresolved "auto" is "split"."""
        return STATE_BF16_MODES["split" if self.state_bf16 == "auto" else self.state_bf16]

    @property
    def dslopes_state(self) -> bool:
        """The slope gradient comes from the derivative-state kernels (dslopes "state", lookback not True)."""
        return self.dslopes == "state" and self.lookback is not True

    def for_grads(self, slope_grad: bool) -> "LaunchConfig":
        """This config with state_bf16="auto" resolved: "split" if slope_grad (the slopes need a gradient)
        and that gradient comes from the rowwise sums (not :attr:`dslopes_state`), else "bf16"; other
        configs are returned as they are. Cached per config."""
        if self.state_bf16 != "auto":
            return self
        cache = self.__dict__.get("_auto")
        if cache is None:
            bf16 = self.replace(state_bf16="bf16")
            cache = {True: bf16 if self.dslopes_state else self.replace(state_bf16="split"), False: bf16}
            object.__setattr__(self, "_auto", cache)
        return cache[bool(slope_grad)]

    def replace(self, **overrides: Any) -> "LaunchConfig":
        """A copy with fields replaced; a dict for a nested value (a kernel kind, seg_long, small) updates
        only the keys it names. Unknown keys raise ValueError naming the key; values are checked."""
        return _replace(self, overrides, "")

    def to_dict(self) -> dict:
        """Nested plain values (the inverse of ``DEFAULT.replace(**d)``)."""
        return dataclasses.asdict(self)


def _replace(obj, overrides: Mapping[str, Any], prefix: str):
    if not isinstance(overrides, Mapping):
        raise TypeError(f"launch config overrides for {prefix.rstrip('.') or 'LaunchConfig'} must be a dict, "
                        f"got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, val in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown launch config key {prefix + key!r}; expected one of {sorted(fields)}")
        if isinstance(val, Mapping):
            cur = getattr(obj, key)
            if cur is None:  # e.g. seg_long=None, then a dict: start from the field's default
                cur = fields[key].default
            if not dataclasses.is_dataclass(cur):
                raise ValueError(f"launch config key {prefix + key!r} takes a plain value, got a dict")
            val = _replace(cur, val, prefix + key + ".")
        changes[key] = val
    if not changes:
        return obj
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as e:
        if prefix:  # a nested value: name its path
            raise type(e)(f"LaunchConfig.{prefix.rstrip('.')}: {e}") from None
        raise


DEFAULT = LaunchConfig()

ENV_VAR = "SEQPAR_LA_CONFIG"


def parse_env(environ: Mapping[str, str]) -> LaunchConfig:
    """DEFAULT with the overrides of ``environ``: SEQPAR_LA_CONFIG (a JSON object for ``replace``),
    SEQPAR_FP32_PRECISION (fp32_precision) and SEQPAR_POISON (poison, when set and not "0")."""
    cfg = DEFAULT
    text = environ.get(ENV_VAR, "")
    if text.strip():
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV_VAR} must be a JSON object of launch config overrides, got {text!r}: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"{ENV_VAR} must be a JSON object of launch config overrides, got {text!r}")
        cfg = cfg.replace(**overrides)
    prec = environ.get("SEQPAR_FP32_PRECISION", "")
    if prec:
        cfg = cfg.replace(fp32_precision=prec)
    if environ.get("SEQPAR_POISON", "0") not in ("", "0"):
        cfg = cfg.replace(poison=True)
    return cfg


@functools.lru_cache(maxsize=1)
def _env_config() -> LaunchConfig:
    return parse_env(os.environ)


def from_env(environ: Optional[Mapping[str, str]] = None) -> LaunchConfig:
    """The config of calls that pass none: DEFAULT with the environment's overrides (see :func:`parse_env`).
    Without ``environ``, os.environ is read once per process and the same value returned afterwards."""
    if environ is not None:
        return parse_env(environ)
    return _env_config()


def resolve(config: Optional[LaunchConfig]) -> LaunchConfig:
    """config, or :func:`from_env` for None; anything else is a TypeError."""
    if config is None:
        return _env_config()
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    return config


__all__ = ["LaunchConfig", "KernelLaunch", "KernelOverride", "SegLong", "SmallHeads", "DEFAULT", "from_env",
           "parse_env", "resolve", "KINDS"]
