"""A whole training step (forward, backward, optimizer) of a small model captured in a CUDA graph and
replayed gives the eager step's losses and parameters (GPU only)."""
import copy
import dataclasses

import pytest
import torch


@pytest.mark.gpu
def test_gpu_training_step_cuda_graph_replay_equals_eager():
    from seqpar.models import TNLConfig
    from seqpar.models.transnormer import TNLBlock

    torch.manual_seed(0)
    cfg = dataclasses.replace(TNLConfig.preset("tiny"), learnable_slopes=True)
    model = torch.nn.ModuleList([TNLBlock(cfg, i) for i in range(cfg.n_layers)]).cuda()
    ref = copy.deepcopy(model)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    xs = [torch.randn(1, 256, cfg.d_model, device="cuda") for _ in range(4)]

    def step(m, opt, x):
        for blk in m:
            x, _ = blk(x, cu_seqlens=cu)
        loss = x.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-2)
    eager = [step(ref, opt_ref, x) for x in xs]

    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, compiles, allocates grads
        warm = copy.deepcopy(model)
        opt_w = torch.optim.SGD(warm.parameters(), lr=1e-2)
        step(warm, opt_w, static_x)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x)
    losses = []
    for x in xs:
        static_x.copy_(x)
        graph.replay()
        losses.append(static_loss.clone())
    torch.cuda.synchronize()
    for a, b in zip(losses, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (losses, eager)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
