import pytest
import torch

from pathways_mm.config import ModelConfig, MoEConfig
from pathways_mm.model.layers import SwiGLU
from pathways_mm.model.model import block_ffn
from pathways_mm.routing import PathwaysMoE

SHAPES = [(2, 5, 16, 24), (1, 7, 8, 32), (3, 4, 32, 16)]  # B, L, D, F
ROUTED = [(4, 1, 2, 6, 16, 24), (4, 2, 3, 5, 8, 16), (8, 3, 2, 9, 16, 8), (6, 6, 1, 4, 8, 8)]  # E, k, B, L, D, F


def make(D, F, E, k, impl, **kw):
    torch.manual_seed(0)
    moe = PathwaysMoE(D, F, E, 3, k, impl=impl, **kw)
    with torch.no_grad():
        moe.router.pathway.normal_()
    return moe


def inputs(B, L, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g, requires_grad=True), torch.randint(0, 3, (B, L), generator=g)


def grads(module, x, out):
    torch.manual_seed(5)
    (out.out * torch.randn_like(out.out)).sum().add(out.aux_loss).backward()
    return {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("impl", ["grouped", "deepspeed"])
@pytest.mark.parametrize("B,L,D,F", SHAPES)
def test_one_expert_equals_dense_swiglu(impl, B, L, D, F):
    moe = make(D, F, 1, 1, impl, balance_coef=0.0, z_loss_coef=0.0, capacity_factor=None)
    dense = SwiGLU(D, F)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(dense, name).weight.copy_(getattr(moe.experts, name).weight[0])
    x, task = inputs(B, L, D)
    out = moe(x, task)
    ref = dense(x)
    torch.testing.assert_close(out.out, ref.out)
    x_ref = x.detach().clone().requires_grad_()
    (dense(x_ref).out * 2.0).sum().backward()
    x.grad = None
    (out.out * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(moe.experts.w2.weight.grad[0], dense.w2.weight.grad)


@pytest.mark.parametrize("capacity", [None, 100.0])
@pytest.mark.parametrize("E,k,B,L,D,F", ROUTED)
def test_grouped_equals_deepspeed_when_nothing_drops(capacity, E, k, B, L, D, F):
    results = []
    for impl in ("grouped", "deepspeed"):
        moe = make(D, F, E, k, impl, capacity_factor=capacity)
        x, task = inputs(B, L, D)
        out = moe(x, task)
        assert out.num_dropped.item() == 0
        results.append((out.out, out.aux_loss, grads(moe, x, out)))
    (o1, a1, g1), (o2, a2, g2) = results
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(a1, a2)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


@pytest.mark.parametrize("E,k,B,L,D,F", ROUTED[:3])
def test_grouped_mm_kernel_equals_expert_loop(E, k, B, L, D, F):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    results = []
    for use in (False, True):
        moe = make(D, F, E, k, "grouped", use_grouped_mm=use)
        x, task = inputs(B, L, D)
        out = moe(x, task)
        results.append((out.out, grads(moe, x, out)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


def test_capacity_drops_routes_past_capacity():
    moe = make(8, 16, 4, 1, "deepspeed", capacity_factor=1.0, debug_route_to=2)
    x, task = inputs(2, 8, 8)  # 16 tokens, all to expert 2; capacity ceil(16 / 4 * 1.0) = 4
    out = moe(x, task)
    assert out.num_dropped.item() == 12
    assert (out.out.reshape(16, 8)[4:] == 0).all(), "dropped tokens must contribute nothing"
    assert (out.out.reshape(16, 8)[:4] != 0).any()


@pytest.mark.parametrize("impl", ["grouped", "deepspeed"])
def test_idle_experts_get_zero_gradients_not_none(impl):
    moe = make(8, 16, 4, 2, impl, debug_route_to=1)
    x, task = inputs(2, 3, 8)
    grads(moe, x, moe(x, task))
    g = moe.experts.w1.weight.grad
    assert g is not None and g[1].abs().sum() > 0
    assert (g[[0, 2, 3]] == 0).all()


def test_state_dict_uses_deepspeed_per_expert_keys():
    sd = make(8, 16, 4, 2, "grouped").state_dict()
    for i in range(4):
        for w in ("w1", "w2", "w3"):
            assert sd[f"deepspeed_moe.experts.deepspeed_experts.{i}.{w}.weight"].shape[0] in (8, 16)
    assert not any(k.startswith("deepspeed_moe.experts.w") for k in sd)
    # DeepSpeed sends every MoE key containing "expert" to the expert files; the router must not match.
    assert [k for k in sd if "expert" not in k] == [k for k in sd if k.startswith("deepspeed_moe.gate.")]


@pytest.mark.parametrize("src,dst", [("grouped", "deepspeed"), ("deepspeed", "grouped")])
def test_state_dict_round_trips_between_impls(src, dst):
    a = make(8, 16, 4, 2, src, capacity_factor=None)
    torch.manual_seed(9)
    b = PathwaysMoE(8, 16, 4, 3, 2, impl=dst)
    b.load_state_dict(a.state_dict())
    x, task = inputs(2, 5, 8)
    torch.testing.assert_close(a(x, task).out, b(x, task).out)


def test_loads_experts_of_a_deepspeed_moe_layer():
    from deepspeed.moe.layer import MoE

    ds = MoE(8, SwiGLU(8, 16), num_experts=4, ep_size=1, k=2)
    ours = PathwaysMoE(8, 16, 4, 3, 2)
    expert_sd = {k: v for k, v in ds.state_dict().items() if "deepspeed_experts" in k}
    missing, unexpected = ours.load_state_dict(expert_sd, strict=False)
    assert not unexpected and all(k.startswith("deepspeed_moe.gate.") for k in missing)
    torch.testing.assert_close(ours.experts.w3.weight[2], ds.deepspeed_moe.experts.deepspeed_experts[2].w3.weight)


def test_loading_fewer_experts_fails_loudly():
    sd = make(8, 16, 2, 1, "grouped").state_dict()
    with pytest.raises(RuntimeError, match="per-expert w1 weights for 2 of 4"):
        PathwaysMoE(8, 16, 4, 3, 1).load_state_dict(sd)


def test_expert_params_carry_deepspeed_tags():
    moe = PathwaysMoE(8, 16, 4, 3, 2, ep_size=2)
    tagged = {n for n, p in moe.named_parameters() if getattr(p, "allreduce", True) is False}
    assert tagged == {f"deepspeed_moe.experts.{w}.weight" for w in ("w1", "w2", "w3")}
    assert all(p.group_name == "ep_size_2" for p in moe.experts.parameters())
    assert moe.num_local_experts == 2 and moe.experts.w1.weight.shape[0] == 2


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_experts=6, ep_size=4), "multiple of ep_size"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, impl="tutel"), "impl"),
    ],
)
def test_bad_settings_raise_value_error(kw, match):
    args = dict(d_model=8, d_ff=16, max_tasks=2, **kw)
    with pytest.raises(ValueError, match=match):
        PathwaysMoE(**args)


def test_ep_size_above_one_without_processes_explains():
    moe = PathwaysMoE(8, 16, 4, 3, 2, ep_size=2)
    x, task = inputs(1, 3, 8)
    with pytest.raises(RuntimeError, match="deepspeed.initialize"):
        moe(x, task)


def test_build_moe_ffn_places_moe_every_nth_layer():
    cfg = ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, moe_every=2))
    kinds = [type(block_ffn(i, cfg)) for i in range(4)]
    assert kinds == [SwiGLU, PathwaysMoE, SwiGLU, PathwaysMoE]
    assert all(type(block_ffn(i, ModelConfig())) is SwiGLU for i in range(2))


@pytest.mark.parametrize("impl", ["grouped", "deepspeed"])
def test_shared_expert_adds_a_dense_ffn_beside_the_routed_experts(impl):
    B, L, D, F, E, k, S = 2, 5, 16, 24, 4, 1, 24
    routed_only = make(D, F, E, k, impl)
    moe = make(D, F, E, k, impl, shared_d_ff=S)
    moe.load_state_dict(routed_only.state_dict(), strict=False)  # same routed experts and router
    dense = SwiGLU(D, S)
    dense.load_state_dict(moe.shared.state_dict())
    x, task = inputs(B, L, D)
    out, ref = moe(x, task), routed_only(x, task)
    assert out.out.shape == (B, L, D)
    torch.testing.assert_close(out.out, ref.out + dense(x).out)
    assert torch.equal(out.aux_loss, ref.aux_loss)  # the routing objectives ignore the shared expert
    assert 0.0 < out.stats["routed_share"].item() < 1.0 and "routed_share" not in ref.stats
    assert not any("expert" in key for key in moe.state_dict() if key.startswith("shared."))  # not an expert file
    assert all(not hasattr(p, "allreduce") for p in moe.shared.parameters())  # data-parallel, like attention
    grads(moe, x, out)
    assert moe.shared.w2.weight.grad.abs().sum() > 0


def test_layer_stats_name_each_objective_only_when_weighted():
    moe = make(16, 24, 4, 2, "grouped", mi_coef=0.0, z_loss_coef=0.001)
    x, task = inputs(2, 5, 16)
    out = moe(x, task)
    assert sorted(out.stats) == ["balance", "dropped", "z"]
    torch.testing.assert_close(out.aux_loss, 0.01 * out.route.losses["balance"] + 0.001 * out.route.losses["z"])
    off = make(16, 24, 4, 2, "grouped", balance_coef=0.0, z_loss_coef=0.0)
    assert off(x, task).aux_loss.item() == 0.0 and off(x, task).route.losses == {}


@pytest.mark.parametrize(
    "moe",
    [
        dict(num_experts=8, top_k=1, expert_d_ff=192, shared_d_ff=192),  # shared + top-1
        dict(num_experts=16, top_k=4, expert_d_ff=96),  # fine-grained
        dict(num_experts=32, top_k=8, expert_d_ff=48),
        dict(num_experts=16, top_k=2, expert_d_ff=96, shared_d_ff=192),  # both
    ],
)
def test_equal_active_parameters_per_token(moe):
    from pathways_mm.model.model import build_model, param_counts

    flagship = ModelConfig(size="tiny", moe=MoEConfig(num_experts=8, top_k=2, expert_d_ff=192))
    other = ModelConfig(size="tiny", moe=MoEConfig(**moe))
    (total_a, active_a), (total_b, active_b) = (param_counts(build_model(c, 100)) for c in (flagship, other))
    routers = 2 * (other.moe.num_experts - 8) * (other.d_model + other.max_tasks)  # router rows per MoE layer
    assert active_b - routers == active_a
    shared = 2 * 3 * other.d_model * other.moe.shared_d_ff
    assert total_b - routers - shared == total_a  # the routed pool keeps its size; the shared expert is extra
