"""Both dispatchers against one reference: per-expert rows out, weighted sums of the k routes back.

With an identity "expert" a token's combined output is the sum of its k combine weights times
itself (weights renormalised over the kept routes); with a per-expert scale it is the weighted
sum of the scaled copies, which checks that every row reaches the right expert and comes back
to the right token.
"""

import pytest
import torch

from pathways_mm.routing.dispatch import (
    CapacityDispatch,
    CapacityPlan,
    Dispatcher,
    DispatchPlan,
    DroplessDispatch,
    DroplessPlan,
)
from pathways_mm.routing.router import TaskRouter

SHAPES = [(4, 1, 10, 8), (8, 2, 33, 16), (6, 3, 50, 4)]  # experts, top_k, tokens, d_model


def _dispatchers(E: int) -> list[tuple[str, Dispatcher]]:
    return [("dropless", DroplessDispatch(E, 1)), ("capacity, none dropped", CapacityDispatch(E, 1, None, None, 1))]


def _route(E, k, T, D, seed=0):
    torch.manual_seed(seed)
    router = TaskRouter(D, E, 2, k)
    x = torch.randn(T, D)
    return x, router(x, torch.randint(0, 2, (T,)))


def _scaled_experts(x_ND: torch.Tensor, counts_X: torch.Tensor) -> torch.Tensor:
    """Expert e multiplies its rows by e + 1."""
    scale = torch.repeat_interleave(torch.arange(1, len(counts_X) + 1, dtype=x_ND.dtype), counts_X)
    return x_ND * scale[:, None]


@pytest.mark.parametrize("E,k,T,D", SHAPES)
def test_every_dispatcher_sends_each_route_to_its_expert_and_back(E, k, T, D):
    x, route = _route(E, k, T, D)
    want = (route.weights_TK[..., None] * (route.indices_TK[..., None] + 1) * x[:, None]).sum(1)
    for name, d in _dispatchers(E):
        x_local, plan = d.dispatch(x, route, None, training=True)
        assert isinstance(plan, DispatchPlan), name
        assert x_local.shape[0] == int(plan.counts_X.sum()), name
        out = d.combine(_scaled_experts(x_local, plan.counts_X), plan, route, None)
        torch.testing.assert_close(out, want, msg=name)
        assert int(plan.num_dropped) == 0 and (plan.dropped_TK is None or not plan.dropped_TK.any()), name


@pytest.mark.parametrize("E,k,T,D", SHAPES)
def test_dropless_counts_are_the_routes_per_expert(E, k, T, D):
    x, route = _route(E, k, T, D)
    x_local, plan = DroplessDispatch(E, 1).dispatch(x, route, None, training=True)
    assert isinstance(plan, DroplessPlan) and plan.dropped_TK is None
    assert plan.counts_X.tolist() == torch.bincount(route.indices_TK.flatten(), minlength=E).tolist()
    assert x_local.shape == (T * k, D)


def test_capacity_plan_marks_the_dropped_routes_and_zeroes_them():
    E, k, T, D = 4, 1, 12, 8
    x = torch.randn(T, D)
    _, route = _route(E, k, T, D)
    route = route._replace(
        indices_TK=torch.zeros(T, k, dtype=torch.long), weights_TK=torch.ones(T, k)
    )  # all to expert 0
    d = CapacityDispatch(E, 1, capacity_factor=1.0, eval_capacity_factor=None, min_capacity=1)
    x_local, plan = d.dispatch(x, route, None, training=True)
    assert isinstance(plan, CapacityPlan)
    cap = plan.capacity  # ceil(12 routes / 4 experts * 1.0) = 3
    assert cap == 3 and plan.counts_X.tolist() == [cap] * E and x_local.shape == (E * cap, D)
    assert plan.dropped_TK[:, 0].tolist() == [False] * cap + [True] * (T - cap)  # earlier tokens first
    assert int(plan.num_dropped) == T - cap
    out = d.combine(x_local, plan, route, None)
    torch.testing.assert_close(out[:cap], x[:cap])
    assert (out[cap:] == 0).all()


def test_eval_capacity_factor_applies_outside_training():
    E, k, T, D = 4, 1, 16, 8
    x, route = _route(E, k, T, D)
    route = route._replace(indices_TK=torch.zeros(T, k, dtype=torch.long))
    d = CapacityDispatch(E, 1, capacity_factor=1.0, eval_capacity_factor=4.0, min_capacity=1)
    assert d.dispatch(x, route, None, training=True)[1].capacity == 4
    assert d.dispatch(x, route, None, training=False)[1].capacity == 16
