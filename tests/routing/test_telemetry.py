import pytest
import torch

from pathways_mm.config import ModelConfig, MoEConfig
from pathways_mm.model.model import build_model
from pathways_mm.routing import PathwaysMoE, telemetry
from pathways_mm.routing.telemetry import ENTROPY_SCALE


def make(impl="grouped", E=4, k=2, **kw):
    torch.manual_seed(0)
    moe = PathwaysMoE(16, 24, E, 3, k, impl=impl, **kw)
    with torch.no_grad():
        moe.router.pathway.normal_()
    return moe


def reference_counts(route, task_T, modality_T, E):
    """[tasks, modalities, experts] by a Python loop over tokens and their k choices."""
    ref = torch.zeros(3, 3, E, dtype=torch.long)
    for t in range(task_T.numel()):
        if modality_T[t] >= 0:
            for e in route.indices_TK[t].tolist():
                ref[task_T[t], modality_T[t], e] += 1
    return ref


@pytest.mark.parametrize("impl,capacity", [("grouped", None), ("deepspeed", None), ("deepspeed", 100.0)])
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (6, 3)])
def test_counts_match_a_loop_over_tokens_and_skip_padding(impl, capacity, E, k):
    moe = make(impl, E, k, capacity_factor=capacity)
    assert telemetry.enable(moe) == 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 16, generator=g)
    task = torch.randint(0, 3, (3, 1), generator=g).expand(3, 7)
    mods = torch.randint(-1, 3, (3, 7), generator=g)  # -1 = padding
    out = moe(x, task, mods)
    task_T, mods_T = task.reshape(-1), mods.reshape(-1)
    ref = reference_counts(out.route, task_T, mods_T, E)
    assert torch.equal(moe.route_counts[0, :3], ref)
    assert moe.route_counts[1].sum() == 0  # nothing dropped
    first = out.route._replace(indices_TK=out.route.indices_TK[:, :1])  # each token's top-1 expert
    assert torch.equal(moe.route_counts[2, :3], reference_counts(first, task_T, mods_T, E))
    valid = mods_T >= 0
    tokens = torch.zeros(3, 3, dtype=torch.long).index_put_(
        (task_T[valid], mods_T[valid]), torch.ones(int(valid.sum()), dtype=torch.long), accumulate=True
    )
    assert torch.equal(moe.token_stats[0, :3], tokens)
    p = out.route.probs_TE[valid]
    want_entropy = -(p * p.clamp(min=1e-30).log()).sum()
    assert moe.token_stats[1].sum().item() / ENTROPY_SCALE == pytest.approx(want_entropy.item(), abs=1e-4)


def test_dropped_routes_are_counted_per_task_modality_and_expert():
    moe = make("deepspeed", 4, 1, capacity_factor=1.0, min_capacity=1, debug_route_to=2)  # every token -> expert 2
    telemetry.enable(moe)
    x = torch.randn(2, 6, 16)
    task = torch.tensor([[0] * 6, [1] * 6])
    mods = torch.tensor([[0] * 6, [1, 1, 1, 2, 2, -1]])
    out = moe(x, task, mods)
    capacity = 3  # 12 routes / 4 experts * capacity_factor 1.0
    assert out.num_dropped.item() == 12 - capacity
    assert moe.route_counts[0, 0, 0, 2] == 6 and moe.route_counts[0, 1, 1, 2] == 3 and moe.route_counts[0, 1, 2, 2] == 2
    # Priority is token order: task 0's first three tokens fit, everything after them is dropped.
    assert moe.route_counts[1, 0, 0, 2] == 3 and moe.route_counts[1, 1, 1, 2] == 3 and moe.route_counts[1, 1, 2, 2] == 2
    assert moe.route_counts[1].sum() == 8  # the padded token's drop is not counted


def test_off_paused_and_never_in_the_state_dict():
    moe = make()
    x, task = torch.randn(1, 5, 16), torch.zeros(1, 5, dtype=torch.long)
    moe(x, task)
    assert moe.route_counts is None  # off by default: nothing allocated, nothing counted
    telemetry.enable(moe)
    with telemetry.paused(moe):
        moe(x, task)
    assert moe.token_stats[0].sum() == 0
    moe(x, task)  # no modality ids: every position is text
    assert moe.token_stats[0, 0, 0] == 5 and moe.route_counts[0, 0, 0].sum() == 10
    assert not any("route_counts" in key or "token_stats" in key for key in moe.state_dict())
    telemetry.enable(moe)  # on again: fresh zero counters
    assert moe.route_counts.sum() == 0
    telemetry.enable(moe, on=False)
    assert moe.route_counts is None and telemetry.read(moe) == []


def test_decoder_layers_read_in_block_order_and_survive_bf16_casts():
    cfg = ModelConfig(n_layers=4, moe=MoEConfig(num_experts=4, moe_every=2))
    model = build_model(cfg, vocab_size=50)
    assert telemetry.enable(model) == 2
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to floating buffers
    tokens = torch.randint(0, 50, (2, 6))
    mods = torch.tensor([[0] * 6, [0, 0, 0, 0, -1, -1]])
    model.decoder(tokens, torch.tensor([0, 1]), modality_ids_BL=mods)
    layers = telemetry.read(model)
    assert [c.block for c in layers] == [1, 3]
    for c in layers:
        assert c.route_counts.dtype == torch.long
        assert c.token_stats[0, :2, 0].tolist() == [6, 4]
        assert c.route_counts[0].sum() == 10 * 2  # top-2
