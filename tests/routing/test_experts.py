import pytest
import torch
import torch.nn.functional as F

from pathways_mm.routing.experts import GroupedExperts

# E, D, F, rows per expert (0 = an idle expert)
TABLE = [(4, 8, 16, [3, 0, 5, 2]), (1, 16, 8, [7]), (6, 8, 8, [0, 0, 4, 1, 0, 9]), (3, 4, 12, [0, 0, 0])]


def reference(experts: GroupedExperts, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Plain autograd: one F.linear SwiGLU per expert over its rows."""
    outs = []
    for e, x_nD in enumerate(x_ND.split(counts)):
        w1, w3, w2 = (getattr(experts, n).weight[e] for n in ("w1", "w3", "w2"))
        outs.append(F.linear(F.silu(F.linear(x_nD, w1)) * F.linear(x_nD, w3), w2))
    return torch.cat(outs)


def run(experts, x_ND, counts, fn):
    x = x_ND.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = fn(x)
    torch.manual_seed(3)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in experts.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("E,D,F_,counts", TABLE)
def test_expert_loop_equals_autograd_reference_in_float64(E, D, F_, counts):
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F_, "g", use_grouped_mm=False).double()
    x_ND = torch.randn(sum(counts), D, dtype=torch.float64)
    counts_E = torch.tensor(counts)
    y, gx, gw = run(experts, x_ND, counts, lambda x: experts(x, counts_E))
    y_ref, gx_ref, gw_ref = run(experts, x_ND, counts, lambda x: reference(experts, x, counts))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if sum(counts):
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    for name in gw:
        ref = gw_ref[name] if gw_ref[name] is not None else torch.zeros_like(gw[name])
        torch.testing.assert_close(gw[name], ref, rtol=1e-12, atol=1e-12, msg=name)
    for e, n in enumerate(counts):
        if n == 0:  # an idle expert's gradient is zero, not garbage from an uninitialised buffer
            assert all(gw[name][e].abs().max() == 0 for name in gw)


def test_frozen_weights_get_no_gradient_and_input_gradient_is_unchanged():
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 16, "g", use_grouped_mm=False).double()
    counts, counts_E = [4, 2, 3], torch.tensor([4, 2, 3])
    x_ND = torch.randn(9, 8, dtype=torch.float64)
    _, gx_all, _ = run(experts, x_ND, counts, lambda x: experts(x, counts_E))
    experts.w1.weight.requires_grad_(False)
    experts.w2.weight.requires_grad_(False)
    _, gx, gw = run(experts, x_ND, counts, lambda x: experts(x, counts_E))
    assert gw["w1.weight"] is None and gw["w2.weight"] is None and gw["w3.weight"] is not None
    torch.testing.assert_close(gx, gx_all, rtol=1e-12, atol=1e-12)


def test_expert_loop_saves_only_x_h1_h3_for_backward():
    experts = GroupedExperts(4, 8, 16, "g", use_grouped_mm=False)
    x_ND = torch.randn(10, 8, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts(x_ND, torch.tensor([3, 3, 0, 4]))
    assert sorted(saved) == [(10, 8), (10, 16), (10, 16)]


def test_state_dict_keeps_deepspeed_per_expert_keys_and_round_trips():
    torch.manual_seed(0)
    a = GroupedExperts(3, 8, 16, "g")
    sd = a.state_dict()
    assert sorted(sd) == sorted(f"deepspeed_experts.{i}.{n}.weight" for i in range(3) for n in ("w1", "w2", "w3"))
    assert sd["deepspeed_experts.1.w2.weight"].shape == (8, 16)
    b = GroupedExperts(3, 8, 16, "g")
    b.load_state_dict(sd)
    for n in ("w1", "w2", "w3"):
        assert torch.equal(getattr(a, n).weight, getattr(b, n).weight)
