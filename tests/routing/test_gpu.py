"""The MoE layer on a CUDA device: torch._grouped_mm against the per-expert loop, and no host sync.

Skipped without CUDA (the grouped GEMM tests also need sm90+, where `grouped_mm_supported` picks it).
`make gpu-check` runs these with `pytest -m gpu`.
"""

import copy

import pytest
import torch

from pathways_mm.routing import PathwaysMoE, telemetry
from pathways_mm.routing.experts import GroupedExperts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="grouped GEMM needs sm90+"
)

# bf16 keeps 8 bits of mantissa (eps 2^-8 = 0.0039). Both paths accumulate in float32 and round
# each GEMM's output to bf16, but in other orders and tilings, and the loop rounds per expert:
# outputs and gradients may differ by a few bf16 ulps of the largest value. Stated tolerance:
# max |grouped - loop| <= 2% of max |loop|, for the output and for every gradient.
TOLERANCE = 0.02


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@sm90
@pytest.mark.parametrize(
    "experts,d_model,d_ff,counts",
    [
        (4, 256, 512, [64, 0, 130, 62]),  # an expert without rows
        (8, 1024, 4096, [512] * 8),
        (16, 2048, 1408, [37, 1, 300, 0, 90, 256, 5, 17, 64, 64, 128, 3, 0, 200, 33, 2]),  # uneven, odd sizes
    ],
)
def test_grouped_mm_equals_the_per_expert_loop_in_bf16_forward_and_backward(experts, d_model, d_ff, counts):
    torch.manual_seed(0)
    gmm = GroupedExperts(experts, d_model, d_ff, "ep_size_1", use_grouped_mm=True).cuda().bfloat16()
    loop = copy.deepcopy(gmm)
    loop.use_grouped_mm = False
    counts_E = torch.tensor(counts, device="cuda")
    x = torch.randn(sum(counts), d_model, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(sum(counts), d_model, device="cuda", dtype=torch.bfloat16)
    outs = []
    for layer in (gmm, loop):
        xi = x.clone().requires_grad_()
        y = layer(xi, counts_E)
        y.backward(grad)
        outs.append((y, xi.grad, *(getattr(layer, w).weight.grad for w in ("w1", "w3", "w2"))))
    for name, a, b in zip(("output", "dx", "dw1", "dw3", "dw2"), *outs):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert close(a, b) <= TOLERANCE, f"{name}: {close(a, b):.4f}"
    idle = [e for e, c in enumerate(counts) if c == 0]
    for e in idle:  # an expert that got no rows has zero gradients on both paths
        assert not outs[0][2][e].any() and not outs[1][2][e].any()


@sm90
def test_moe_forward_makes_no_host_sync_with_telemetry_on():
    """The grouped_mm path at ep_size 1 only: with ep_size > 1 the dropless dispatcher reads the
    all-to-all split sizes on the host on purpose, and the per-expert loop (no sm90) needs the row
    counts on the host; both are one sync per layer by design."""
    torch.manual_seed(0)
    layer = PathwaysMoE(512, 1024, 8, 4, 2, impl="grouped").cuda().bfloat16()
    assert telemetry.enable(layer) == 1
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    task = torch.randint(0, 4, (4, 256), device="cuda")
    modality = torch.where(torch.arange(256, device="cuda") < 200, 0, -1).expand(4, 256).contiguous()
    layer(x, task, modality)  # first call: lazy cuBLAS / kernel set-up may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, task, modality)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.out.shape == x.shape and torch.isfinite(out.out.float()).all()
    counted = int(layer.token_stats[0].sum())
    assert counted == 2 * 4 * 200  # two forwards, padding (-1) not counted
