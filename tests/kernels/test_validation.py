"""Bad input to lightning_attn gives a clear error that names the argument."""
import pytest
import torch

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import set_check_finite


def args(B=1, T=8, H=2, D=4, E=4, dtype=torch.float32):
    return (torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype),
            torch.randn(B, T, H, E, dtype=dtype), torch.full((H,), 0.1))


def test_shapes():
    q, k, v, s = args()
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        lightning_attn(q[0], k, v, s)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        lightning_attn(q, k[:, :4], v, s)
    with pytest.raises(ValueError, match="v must be"):
        lightning_attn(q, k, v[:, :, :1], s)
    with pytest.raises(ValueError, match=r"slopes must have shape \[H\]"):
        lightning_attn(q, k, v, s[:1])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        lightning_attn(q, k, v, s, initial_state=torch.zeros(1, 2, 4, 5))


def test_types_and_devices():
    q, k, v, s = args()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        lightning_attn(q.numpy(), k, v, s)
    with pytest.raises(TypeError, match="share one dtype"):
        lightning_attn(q, k.double(), v, s)
    with pytest.raises(TypeError, match="q must be float16"):
        lightning_attn(q.long(), k.long(), v.long(), s)
    with pytest.raises(TypeError, match="slopes must be a torch.Tensor"):
        lightning_attn(q, k, v, [0.1, 0.2])
    with pytest.raises(TypeError, match="slopes must be a floating-point"):
        lightning_attn(q, k, v, torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="scale must be a float"):
        lightning_attn(q, k, v, s, scale="1")
    with pytest.raises(ValueError, match="backend must be"):
        lightning_attn(q, k, v, s, backend="cuda")
    with pytest.raises(TypeError, match="triton backend takes"):
        lightning_attn(q.double(), k.double(), v.double(), s, backend="triton")


def test_negative_or_nonfinite_slopes():
    q, k, v, s = args()
    with pytest.raises(ValueError, match="slopes must be finite and non-negative"):
        lightning_attn(q, k, v, torch.tensor([0.1, -0.2]))
    with pytest.raises(ValueError, match="slopes must be finite and non-negative"):
        lightning_attn(q, k, v, torch.tensor([0.1, float("nan")]))
    # the message names the bad value, not the minimum of the others
    with pytest.raises(ValueError, match=r"slopes\[1\] = inf"):
        lightning_attn(q, k, v, torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match=r"slopes\[0\] = -0.5"):
        lightning_attn(q, k, v, torch.tensor([-0.5, 0.1]))
    # learnable slopes (computed in the graph) are checked too on CPU
    log_s = torch.tensor([0.0, 1000.0], requires_grad=True)
    with pytest.raises(ValueError, match=r"slopes\[1\] = inf"):
        lightning_attn(q, k, v, log_s.exp())


def test_cu_seqlens():
    q, k, v, s = args(B=2)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="B == 1"):
        lightning_attn(q, k, v, s, cu_seqlens=cu)
    q, k, v, s = args(B=1)
    with pytest.raises(ValueError, match="end at T = 8"):
        lightning_attn(q, k, v, s, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_attn(q, k, v, s, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="int32/int64"):
        lightning_attn(q, k, v, s, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="number of documents"):
        lightning_attn(q, k, v, s, cu_seqlens=cu, initial_state=torch.zeros(1, 2, 4, 4))


def test_finite_check_option():
    q, k, v, s = args()
    q[0, 3, 1, 2] = float("nan")
    lightning_attn(q, k, v, s)  # off by default: no host sync in the hot path
    set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="q contains NaN or inf"):
            lightning_attn(q, k, v, s)
    finally:
        set_check_finite(False)


def test_static_checks_trace_without_graph_breaks_and_name_the_argument():
    """check_static (what runs while torch.compile traces lightning_attn_as_op and sp_lightning_attn) reads no
    values: a whole graph traces through it, and the traced call still rejects bad shapes by name."""
    from seqpar.kernels.lightning_attn.interface import check_static, lightning_attn_as_op

    q, s = torch.randn(1, 8, 2, 4), torch.rand(2)
    f = torch.compile(lambda q, k, v: lightning_attn_as_op(q, k, v, s, backend="torch")[0], backend="eager",
                      fullgraph=True)
    torch.testing.assert_close(f(q, q, q), lightning_attn(q, q, q, s, backend="torch")[0])
    g = torch.compile(lambda q, k, v: lightning_attn_as_op(q, k, v, s, backend="torch")[0], backend="eager")
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        g(q, torch.randn(1, 8, 2, 5), q)
    assert check_static(q, q, q, s, None, None, None) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        check_static(q, q, q, s, None, None, "cuda")
    with pytest.raises(ValueError, match=r"slopes must have shape \[H\] = \[2\]"):
        check_static(q, q, q, torch.rand(3), None, None, None)
    with pytest.raises(ValueError, match="packed into B == 1"):
        check_static(torch.randn(2, 8, 2, 4).expand(2, 8, 2, 4), *([torch.randn(2, 8, 2, 4)] * 2), s, None,
                     torch.tensor([0, 8]), None)
