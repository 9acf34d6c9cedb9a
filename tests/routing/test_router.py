import math

import pytest
import torch

from pathways_mm.routing import TaskRouter
from pathways_mm.routing.router import global_balance_loss, per_task_balance_loss, z_loss


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
    assert abs(out.balance_loss.item() - glob.item()) > 0.1
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
    torch.testing.assert_close(out.z_loss, torch.tensor(want))


def test_router_gradients_reach_prior_and_weights():
    torch.manual_seed(0)
    router = TaskRouter(8, 4, 3, top_k=2)
    out = router(torch.randn(12, 8), torch.tensor([0, 2] * 6))
    (out.weights_TK.square().sum() + out.balance_loss + out.z_loss).backward()
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
    assert torch.isfinite(out.z_loss) and out.z_loss.dtype == torch.float32
    before = out.z_loss.item()
    out.z_loss.backward()
    with torch.no_grad():
        router.wg.weight -= 0.01 * router.wg.weight.grad.sign()
    assert router(x, task).z_loss.item() < before  # z-loss pulls router logits back toward zero
