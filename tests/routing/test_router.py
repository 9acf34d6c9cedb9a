import math

import pytest
import torch

from pathways_mm.routing import TaskRouter
from pathways_mm.routing.objectives import (
    global_balance_loss,
    mutual_information_loss,
    per_task_balance_loss,
    z_loss,
)
from pathways_mm.routing.router import fewest_covering, load_capped_covering
from pathways_mm.viz.views import mutual_information


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (8, 3), (6, 6)])
def test_topk_shapes_weights_and_float32(num_experts, top_k):
    torch.manual_seed(0)
    router = TaskRouter(16, num_experts, 3, top_k).to(torch.bfloat16)
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    out = router(x, torch.randint(0, 3, (20,)))
    assert out.indices_TK.shape == out.weights_TK.shape == (20, top_k)
    assert out.weights_TK.dtype == out.probs_TE.dtype == torch.float32
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(20))
    assert (out.indices_TK.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"
    # Combine weights are the renormalised probabilities of the chosen experts.
    chosen = out.probs_TE.gather(1, out.indices_TK)
    torch.testing.assert_close(out.weights_TK, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("num_experts,top_k,favoured", [(4, 1, 2), (8, 2, 5), (16, 1, 0)])
def test_pathway_prior_pulls_task_tokens(num_experts, top_k, favoured):
    torch.manual_seed(0)
    router = TaskRouter(32, num_experts, 2, top_k)
    with torch.no_grad():
        router.pathway[1, favoured] = 2.0
    x = torch.randn(400, 32)
    share = []
    for task in (0, 1):
        idx = router(x, torch.full((400,), task)).indices_TK
        share.append((idx == favoured).any(-1).float().mean().item())
    assert share[1] > share[0] + 0.3, share


@pytest.mark.parametrize("num_experts,top_k,allowed", [(4, 1, [3]), (8, 2, [1, 6]), (8, 3, [0, 2, 4, 7])])
def test_allowed_mask_respected(num_experts, top_k, allowed):
    torch.manual_seed(0)
    router = TaskRouter(8, num_experts, 3, top_k)
    router.set_allowed(2, allowed)
    task = torch.tensor([2] * 50 + [0] * 50)
    out = router(torch.randn(100, 8), task)
    assert set(out.indices_TK[:50].flatten().tolist()) <= set(allowed)
    blocked = torch.ones(num_experts, dtype=torch.bool)
    blocked[allowed] = False
    assert (out.probs_TE[:50, blocked] == 0).all()
    assert (out.probs_TE[50:] > 0).all(), "another task's mask leaked"


def test_set_allowed_needs_top_k_experts():
    router = TaskRouter(8, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="at least top_k=2"):
        router.set_allowed(0, [1])


def test_top_k_larger_than_experts_errors():
    with pytest.raises(ValueError, match="top_k"):
        TaskRouter(8, 4, 2, top_k=5)


def test_debug_route_to_sends_everything_to_one_expert():
    router = TaskRouter(8, 4, 2, top_k=2, debug_route_to=3)
    out = router(torch.randn(10, 8), torch.zeros(10, dtype=torch.long))
    assert (out.indices_TK == 3).all()
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(10))


def test_balance_loss_hand_computed():
    # Task 0: three tokens, all routed to expert 0. Task 1: one token, routed to expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    idx = torch.tensor([[0], [0], [0], [1]])
    task = torch.tensor([0, 0, 0, 1])
    # Per task: 2 * (1 * 0.8) = 1.6 and 2 * (1 * 0.6) = 1.2; mean 1.4.
    torch.testing.assert_close(per_task_balance_loss(probs, idx, task, num_tasks=4), torch.tensor(1.4))
    # Globally: f = [3/4, 1/4], P = [0.7, 0.3] -> 2 * (0.525 + 0.075) = 1.2.
    torch.testing.assert_close(global_balance_loss(probs, idx), torch.tensor(1.2))


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_per_task_balance_differs_from_global_when_tasks_unbalanced(num_experts, top_k):
    torch.manual_seed(0)
    router = TaskRouter(16, num_experts, 2, top_k)
    with torch.no_grad():
        router.pathway[0, 0] = 3.0  # the big task crowds expert 0
        router.pathway[1, 1] = 3.0  # the small task crowds expert 1
    task = torch.tensor([0] * 90 + [1] * 10)
    out = router(torch.randn(100, 16), task)
    glob = global_balance_loss(out.probs_TE, out.indices_TK)
    assert abs(out.losses["balance"].item() - glob.item()) > 0.1
    # With a single task, the per-task loss is the global one.
    one = per_task_balance_loss(out.probs_TE, out.indices_TK, torch.zeros(100, dtype=torch.long), 2)
    torch.testing.assert_close(one, glob)


def test_balance_loss_minimum_is_one_for_uniform_routing():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    torch.testing.assert_close(
        per_task_balance_loss(probs, idx, torch.zeros(4, dtype=torch.long), 1), torch.tensor(1.0)
    )


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), torch.tensor(want))
    router = TaskRouter(2, 2, 1, top_k=1)
    with torch.no_grad():
        router.wg.weight.copy_(torch.eye(2))
    out = router(logits, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out.losses["z"], torch.tensor(want))


def test_router_gradients_reach_prior_and_weights():
    torch.manual_seed(0)
    router = TaskRouter(8, 4, 3, top_k=2)
    out = router(torch.randn(12, 8), torch.tensor([0, 2] * 6))
    (out.weights_TK.square().sum() + out.losses["balance"] + out.losses["z"]).backward()
    assert router.wg.weight.grad.abs().sum() > 0
    assert router.pathway.grad[[0, 2]].abs().sum() > 0
    assert (router.pathway.grad[1] == 0).all(), "an absent task's prior got a gradient"


def test_bf16_router_picks_what_float32_math_picks_and_z_loss_shrinks_logits():
    torch.manual_seed(0)
    router = TaskRouter(64, 8, 2, 2).to(torch.bfloat16)
    x = (torch.randn(256, 64) * 30).to(torch.bfloat16)  # large activations, as late in a long bf16 run
    task = torch.zeros(256, dtype=torch.long)
    out = router(x, task)
    ref = torch.nn.functional.linear(x.float(), router.wg.weight.float()).topk(2, dim=-1).indices
    assert torch.equal(out.indices_TK, ref)
    bf16 = torch.nn.functional.linear(x, router.wg.weight).topk(2, dim=-1).indices
    assert not torch.equal(bf16, ref)  # bf16 router math would have sent some tokens elsewhere
    assert torch.isfinite(out.losses["z"]) and out.losses["z"].dtype == torch.float32
    before = out.losses["z"].item()
    out.losses["z"].backward()
    with torch.no_grad():
        router.wg.weight -= 0.01 * router.wg.weight.grad.sign()
    assert router(x, task).losses["z"].item() < before  # z-loss pulls router logits back toward zero


def test_mi_loss_hand_computed():
    ln2 = math.log(2.0)
    task = torch.tensor([0, 0, 1, 1])
    # Fully separated: each task's tokens on its own expert; I = H(task) = ln 2.
    apart = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(mutual_information_loss(apart, task, 4), torch.tensor(-ln2))
    # Same distribution for both tasks: the task tells nothing about the expert.
    alike = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.8, 0.2]])
    torch.testing.assert_close(mutual_information_loss(alike, task, 4), torch.tensor(0.0), atol=1e-6, rtol=0)
    # Task 0: p(e|0) = [0.5, 0.5]; task 1: [0, 1]; p(t) = [2/3, 1/3]; p(e) = [1/3, 2/3].
    mixed, task3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    h_e = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    torch.testing.assert_close(mutual_information_loss(mixed, task3, 2), torch.tensor(2 / 3 * ln2 - h_e))


def test_padding_leaves_global_balance_and_mi_unchanged_and_gradients_finite():
    torch.manual_seed(0)
    probs = torch.randn(6, 4).softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    task = torch.tensor([0, 0, 1, 1, 2, 2])
    pad_probs = torch.cat([probs, torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3)])  # padding of task 1, a masked-off row
    pad_idx = torch.cat([idx, torch.tensor([[3, 2]] * 3)])
    pad_task, valid = torch.cat([task, torch.tensor([1, 1, 1])]), torch.tensor([1] * 6 + [0] * 3)
    torch.testing.assert_close(global_balance_loss(pad_probs, pad_idx, valid), global_balance_loss(probs, idx))
    torch.testing.assert_close(
        mutual_information_loss(pad_probs, pad_task, 8, valid), mutual_information_loss(probs, task, 8)
    )
    logits = torch.randn(9, 4, requires_grad=True)
    masked = logits.masked_fill(torch.tensor([False, False, True, True]), float("-inf"))
    mutual_information_loss(masked.softmax(-1), pad_task, 8, valid).backward()  # p = 0 for masked experts, absent tasks
    assert torch.isfinite(logits.grad).all()


def _train_router(balance: str, balance_coef: float, mi_coef: float, steps: int = 300) -> torch.Tensor:
    """A bare router trained on two tasks' random tokens under one objective; returns the [task, expert] routes."""
    torch.manual_seed(0)
    router = TaskRouter(16, 8, 2, 2, balance=balance)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    task = torch.arange(2).repeat_interleave(128)
    for _ in range(steps):
        out = router(torch.randn(256, 16), task)
        loss = balance_coef * out.losses["balance"] + mi_coef * out.losses["mi"] + 0.001 * out.losses["z"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = router(torch.randn(2048, 16), torch.arange(2).repeat_interleave(1024))
    flat = (torch.arange(2).repeat_interleave(1024)[:, None] * 8 + out.indices_TK).reshape(-1)
    return torch.zeros(16).index_add_(0, flat, torch.ones(flat.numel())).view(2, 8)


def _mi_bits(joint: torch.Tensor) -> float:
    return mutual_information(joint.numpy())


def test_mi_objective_gives_two_tasks_their_own_experts_per_task_balance_does_not():
    per_task = _train_router("per_task", 1.0, 0.0)
    mi = _train_router("global", 0.01, 1.0)
    # Per-task balance spreads both tasks over all eight experts: the task says ~nothing about the expert.
    assert _mi_bits(per_task) < 0.05 and (per_task > 0).all()
    # Global balance + MI: each task keeps to its own experts (I close to H(task) = 1 bit) and no expert idles.
    assert _mi_bits(mi) > 0.9
    main = [set(torch.nonzero(row / row.sum() > 0.05).flatten().tolist()) for row in mi]
    assert not main[0] & main[1], main
    assert len(main[0] | main[1]) >= 4


@pytest.mark.parametrize("counts,allowed,mass,min_n,max_n,want", [
    ([[50, 30, 15, 5]], [[1, 1, 1, 1]], 0.8, 2, 4, [[1, 1, 0, 0]]),
    ([[50, 30, 15, 5]], [[1, 1, 1, 1]], 0.95, 2, 4, [[1, 1, 1, 0]]),
    ([[50, 30, 15, 5]], [[1, 1, 1, 1]], 0.99, 2, 3, [[1, 1, 1, 0]]),  # capped at max_n
    ([[100, 0, 0, 0]], [[1, 1, 1, 1]], 0.95, 2, 4, [[1, 1, 0, 0]]),  # at least min_n (ties: lowest id)
    ([[0, 70, 30, 0]], [[0, 1, 1, 1]], 0.5, 2, 4, [[0, 1, 1, 0]]),
    ([[0, 0, 0, 0]], [[0, 1, 1, 1]], 0.5, 2, 4, [[0, 1, 1, 1]]),  # no routes: the mask stays
    ([[0, 10, 0, 0]], [[1, 1, 0, 1]], 0.9, 2, 4, [[1, 1, 0, 0]]),  # never an expert the task was not allowed
])  # fmt: skip
def test_fewest_covering(counts, allowed, mass, min_n, max_n, want):
    got = fewest_covering(torch.tensor(counts), torch.tensor(allowed, dtype=torch.bool), mass, min_n, max_n)
    assert got.tolist() == torch.tensor(want, dtype=torch.bool).tolist()


def test_route_masks_set_after_mask_step_from_the_window_and_survive_a_reload():
    torch.manual_seed(0)
    router = TaskRouter(8, 8, 3, 2, mask_mass=0.9, mask_step=4, mask_window=2)
    with torch.no_grad():
        router.pathway[0, [1, 5]] = 20.0  # task 0 goes to experts 1 and 5 whatever its tokens
        router.pathway[1, [2, 3]] = 20.0
    task = torch.tensor([0] * 8 + [1] * 8)
    router.eval()
    router(torch.randn(16, 8), task)  # evaluation forwards are not counted
    router.train()
    for i in range(3):
        router(torch.randn(16, 8), task)
        assert router.allowed.all(), f"restricted after {i + 1} of 4 forwards"
    assert int(router.route_tally.sum()) == 2 * 16  # forwards 3 and 4 are the window
    state = {k: v.clone() for k, v in router.state_dict().items()}
    router(torch.randn(16, 8), task)
    assert torch.nonzero(router.allowed[0]).flatten().tolist() == [1, 5]
    assert torch.nonzero(router.allowed[1]).flatten().tolist() == [2, 3]
    assert router.allowed[2].all(), "a task without routes keeps every expert"
    # A resumed router (state from before forward 4) restricts at the same forward.
    again = TaskRouter(8, 8, 3, 2, mask_mass=0.9, mask_step=4, mask_window=2).train()
    again.load_state_dict(state)
    again(torch.randn(16, 8), task)
    assert torch.equal(again.allowed, router.allowed) and int(again.num_forwards) == 4
    out = router(torch.randn(16, 8), task)
    assert set(out.indices_TK[:8].flatten().tolist()) == {1, 5}


def test_route_mask_buffers_only_when_masks_are_on():
    assert "route_tally" not in TaskRouter(8, 4, 2, 2).state_dict()
    with pytest.raises(ValueError, match="mask_window"):
        TaskRouter(8, 4, 2, 2, mask_mass=0.9, mask_step=2, mask_window=5)


def test_objectives_at_weight_zero_are_not_computed():
    x, task = torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 5)

    def router(**kw):
        torch.manual_seed(0)
        return TaskRouter(8, 4, 2, 2, **kw)

    every = router()(x, task).losses
    assert list(every) == ["balance", "z", "mi"]  # registration order: the order the loss is summed in
    some = router(weights={"balance": 0.01, "z": 0.001, "mi": 0.0})(x, task).losses
    assert list(some) == ["balance", "z"]
    torch.testing.assert_close(some["balance"], every["balance"])
    assert TaskRouter(8, 4, 2, 2, weights={"balance": 0.0, "z": 0.0, "mi": 0.0})(x, task).losses == {}


def test_a_routing_objective_registered_twice_is_an_error():
    from pathways_mm.routing.objectives import register_objective

    with pytest.raises(ValueError, match="registered twice"):
        register_objective("mi", weight_key="mi_coef")(lambda r: r.probs_TE.sum())


def test_load_capped_masks_send_a_task_past_a_full_expert():
    counts = torch.tensor([[90, 10, 0, 0], [80, 0, 20, 0]])
    allowed = torch.ones(2, 4, dtype=torch.bool)
    plain = fewest_covering(counts, allowed, 0.9, 1, 2)
    assert plain.tolist() == [[True, False, False, False], [True, False, True, False]]  # both pile onto expert 0
    capped = load_capped_covering(counts, allowed, 0.9, 1, 2, cap=1.0)  # fair share 50 routes per expert
    assert capped.tolist() == [[True, False, False, False], [False, True, True, False]]


@pytest.mark.parametrize("seed", range(4))
def test_an_unreachable_load_cap_gives_the_fewest_covering_masks(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (5, 8), generator=g)
    counts[3] = 0  # a task without routes keeps its row
    allowed = torch.rand(5, 8, generator=g) > 0.2
    allowed[:, :2] = True
    want = fewest_covering(counts, allowed, 0.8, 2, 4)
    assert torch.equal(load_capped_covering(counts, allowed, 0.8, 2, 4, cap=1e9), want)


def test_router_restricts_with_the_load_cap_at_its_mask_step():
    router = TaskRouter(4, 4, 2, 1, mask_mass=0.9, mask_step=1, mask_window=1, mask_load_cap=1.0)
    with torch.no_grad():
        router.wg.weight.zero_()
        router.pathway.copy_(torch.tensor([[5.0, 0, 0, 0], [4.0, 0, 3.0, 0]]))  # both tasks prefer expert 0
    router.train()
    router(torch.zeros(8, 4), torch.tensor([0] * 4 + [1] * 4))
    assert router.allowed[0].tolist() == [True, False, False, False]
    assert not router.allowed[1, 0] and router.allowed[1].sum() == 2  # expert 0 is full: task 1 goes elsewhere
