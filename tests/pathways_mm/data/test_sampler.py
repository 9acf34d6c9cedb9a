"""The mixture sampler: temperature weights across tasks, one pass without repeats within each."""

from __future__ import annotations

import numpy as np
import pytest

from pathways_mm.data.sampler import MixtureSampler


def stream(s: MixtureSampler, num: int, steps: int) -> list[tuple[int, int]]:
    """Every draw of `steps` steps, in stream order (step, micro-step, rank, row)."""
    return [
        pick
        for step in range(steps)
        for micro in range(s.micro_batches)
        for rank in range(s.world)
        for pick in s.draw(num, step, micro, rank)
    ]


def test_weights_multiply_after_the_temperature():
    s = MixtureSampler([900, 100], temperature=1e9, seed=0, weights=[1.0, 3.0])
    assert s.probs.tolist() == pytest.approx([0.25, 0.75], rel=1e-6)


def test_mixture_sampler_is_a_pure_function_of_step():
    s = MixtureSampler([1000, 10], temperature=1.0, seed=3, world=2)
    assert s.draw(16, step=5, micro=0, rank=1) == MixtureSampler([1000, 10], 1.0, 3, world=2).draw(16, 5, 0, 1)
    assert s.draw(16, step=5) != s.draw(16, step=6)
    assert s.draw(16, step=5, rank=0) != s.draw(16, step=5, rank=1)


def test_draws_do_not_depend_on_the_order_they_are_asked_in():
    keys = [(step, micro, rank) for step in range(30) for micro in range(2) for rank in range(3)]
    a = MixtureSampler([7, 40, 3], temperature=2.0, seed=1, micro_batches=2, world=3)
    b = MixtureSampler([7, 40, 3], temperature=2.0, seed=1, micro_batches=2, world=3)
    forward = {key: a.draw(5, *key) for key in keys}
    backward = {key: b.draw(5, *key) for key in reversed(keys)}  # a resume far into the run: no warm-up
    assert forward == backward


@pytest.mark.parametrize("temperature,expected", [(1.0, [0.9, 0.1]), (1e9, [0.5, 0.5])])
def test_temperature_mixture(temperature, expected):
    s = MixtureSampler([900, 100], temperature=temperature, seed=0)
    assert s.probs.tolist() == pytest.approx(expected, rel=1e-6)
    picks = [t for t, _ in s.draw(4000, step=0)]
    assert picks.count(0) / len(picks) == pytest.approx(expected[0], abs=0.03)


@pytest.mark.parametrize(
    "sizes,weights,num,micro_batches,world",
    [
        ([7, 13, 50], None, 5, 1, 1),
        ([7, 13, 50], [1.0, 0.5, 2.0], 4, 2, 3),
        ([1, 300, 9, 9, 64], None, 3, 3, 2),
    ],
)
def test_each_index_appears_exactly_once_per_epoch(sizes, weights, num, micro_batches, world):
    s = MixtureSampler(sizes, 2.0, seed=5, weights=weights, micro_batches=micro_batches, world=world)
    picks = stream(s, num, steps=120)
    for t, n in enumerate(sizes):
        rows = [i for task, i in picks if task == t]
        epochs = [rows[e * n : (e + 1) * n] for e in range(len(rows) // n)]
        assert len(epochs) >= 2, (t, len(rows))  # the test covers a reshuffle
        for epoch in epochs:
            assert sorted(epoch) == list(range(n))
        tail = rows[len(epochs) * n :]  # the epoch under way: no repeats yet
        assert len(set(tail)) == len(tail)
        if n > 5:
            assert epochs[0] != epochs[1]  # a new epoch, a new order


def test_epoch_orders_are_shuffled_and_differ_across_seeds():
    a = MixtureSampler([50], 1.0, seed=0)
    b = MixtureSampler([50], 1.0, seed=1)
    order_a = [i for _, i in stream(a, 10, 5)]
    assert order_a != sorted(order_a)
    assert order_a != [i for _, i in stream(b, 10, 5)]


@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 3.0, 1.0, 1.0, 0.2, 1.0, 1.0]])
def test_stream_follows_the_mixture_to_within_half_a_sample_per_task(weights):
    sizes = [5, 80, 200, 3, 1000, 17, 17, 60]
    s = MixtureSampler(sizes, 2.0, seed=0, weights=weights, micro_batches=2, world=2)
    picks = stream(s, 7, steps=50)
    got = np.bincount([t for t, _ in picks], minlength=len(sizes))
    assert (np.abs(got - len(picks) * s.probs) <= len(sizes) / 2).all(), (got, len(picks) * s.probs)
    for g in (0, 1, 2, 9, 100, 777):
        assert s.counts(g).sum() == g
    for g in (0, 7, 14, 700, len(picks)):  # at micro-batch boundaries the closed form counts the stream's draws
        assert s.counts(g).tolist() == np.bincount([t for t, _ in picks[:g]], minlength=len(sizes)).tolist()
    if weights is not None:
        assert got[1] == 0  # a task weighted 0 is never drawn


def test_passes_count_the_draws_per_task():
    s = MixtureSampler([10, 30], temperature=1.0, seed=0, micro_batches=2)
    picks = stream(s, 4, steps=25)  # 200 draws, 50 of task 0 and 150 of task 1
    assert s.passes(25, 4) == [5.0, 5.0]
    assert [sum(t == task for t, _ in picks) for task in (0, 1)] == [50, 150]


def test_micro_step_or_rank_outside_the_layout_is_refused():
    s = MixtureSampler([10], 1.0, seed=0, micro_batches=2, world=2)
    with pytest.raises(ValueError, match="outside"):
        s.draw(4, step=0, micro=2)
    with pytest.raises(ValueError, match="outside"):
        s.draw(4, step=0, rank=2)
