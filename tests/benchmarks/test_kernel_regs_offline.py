"""benchmarks/kernel_regs_offline.py: its launch descriptions match the walks' signatures (no compile)."""
import inspect
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import pytest  # noqa: E402
from kernel_regs_offline import KERNELS, WALKS, load_kernels, main, resources, signature  # noqa: E402


@pytest.mark.parametrize("walk", list(WALKS))
def test_walk_description_names_real_arguments(walk):
    mod = load_kernels(KERNELS)
    name, ptrs, floats, consts, _, _, div16 = WALKS[walk]
    fn = getattr(mod, name)
    names = set(fn.arg_names)
    for group in (ptrs, floats, consts, div16):
        assert set(group) <= names, (name, sorted(set(group) - names))
    # every argument the kernel marks constexpr gets a value (TMA is set per call)
    params = inspect.signature(fn.fn).parameters.values()
    declared = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert declared, name
    assert declared - {"TMA"} <= set(consts), (name, sorted(declared - set(consts) - {"TMA"}))
    sig = signature(fn, ptrs, floats, consts)
    assert list(sig) == fn.arg_names
    assert all(sig[n] == "constexpr" for n in consts) and all(sig[n].startswith("*") for n in ptrs)


def test_unknown_walk_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--kernels", "nope"])
    assert "--kernels" in capsys.readouterr().err


def test_unknown_constexpr_is_refused():
    mod = load_kernels(KERNELS)
    with pytest.raises(ValueError, match="BQ"):
        resources(mod, "lb", True, BQ=128)
