import math

import pytest

from pathways_mm.metrics import EvalRow, edit_distance, format_table, sample_metrics, score
from pathways_mm.tasks import get_task
from pathways_mm.training.evaluate import _shard, prediction


def row(i, nll=1.0, ntok=2, nbytes=4, gen="7", target="7", group=None):
    return EvalRow(i, nll, ntok, nbytes, gen, target, group)


def test_exact_match_and_groups():
    task = get_task("text_arith")
    rows = [
        row(0, group="pair"),
        row(1, gen="8", group="pair"),
        row(2, group="template"),
        row(3, gen=" 7 ", group="both"),
    ]
    res = score(rows, task.metrics, task.final_answer)
    assert res["exact_match"] == pytest.approx(3 / 4)
    assert res["groups"]["pair"]["exact_match"] == pytest.approx(0.5)
    assert res["groups"]["template"]["exact_match"] == 1.0 and res["groups"]["both"]["n"] == 1
    assert "groups" not in res["groups"]["pair"]


def test_scratchpad_tasks_are_scored_on_the_answer_alone():
    """image_speech_same writes both digits before yes/no: a wrong digit read with the right
    answer counts as right, the right digits with the wrong answer as wrong."""
    task = get_task("image_speech_same")
    rows = [
        row(0, gen="7 3 no", target="7 3 no"),
        row(1, gen="1 3 no", target="7 3 no"),
        row(2, gen="7 7 no", target="7 7 yes"),
        row(3, gen="", target="7 7 yes"),
    ]
    assert score(rows, task.metrics, task.final_answer)["exact_match"] == pytest.approx(2 / 4)
    assert get_task("image_speech_sum").final_answer(" 7+5=12\n") == "12"


def test_bits_per_byte_is_corpus_level():
    task = get_task("text_lm")
    res = score([row(0, nll=2.0, ntok=1, nbytes=1), row(1, nll=6.0, ntok=3, nbytes=7)], task.metrics, task.final_answer)
    assert res["bits_per_byte"] == pytest.approx(8.0 / math.log(2) / 8)
    assert res["loss"] == pytest.approx(2.0)
    assert "groups" not in res


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (1, 2), (7, 3)])
def test_shards_have_equal_length_and_cover_everything(n, world):
    items = list(range(n))
    shards, own = zip(*(_shard(items, r, world) for r in range(world)))
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    assert set().union(*shards) == set(items)
    assert sum(own) == n and all(
        list(s[:k]) == items[sum(own[:r]) : sum(own[: r + 1])] for r, (s, k) in enumerate(zip(shards, own))
    )  # each item is one rank's own once


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("123", "123", 0), ("123", "13", 1), ("12", "21", 2), ("", "abc", 3)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d


def test_table_lists_metric_and_chance():
    table = format_table({"text_arith": {"n": 3, "exact_match": 0.5, "chance": {"exact_match": 0.1}}})
    assert "text_arith" in table and "0.500" in table and "0.100" in table


def test_per_sample_metrics_pool_into_the_task_metrics():
    """eval --predictions: each sample's own metrics; exact match and loss average to the corpus values."""
    task = get_task("image_speech_same")
    rows = [
        row(0, gen="7 3 no", target="7 3 no"),
        row(1, gen="1 3 no", target="7 3 no"),
        row(2, gen="7 7", target="7 7 yes"),
    ]
    per = [sample_metrics(r, task.metrics, task.final_answer) for r in rows]
    assert [p["exact_match"] for p in per] == [1.0, 1.0, 0.0]  # the answer is scored, not the scratchpad
    pooled = score(rows, task.metrics, task.final_answer)
    assert sum(p["exact_match"] for p in per) / 3 == pytest.approx(pooled["exact_match"])
    speech = get_task("speech_numbers")
    assert sample_metrics(row(0, gen="3140", target="314"), speech.metrics)["char_error_rate"] == pytest.approx(1 / 3)
    lm = sample_metrics(row(0, nll=2.0, ntok=1, nbytes=4, gen=None), get_task("text_lm").metrics)
    assert lm == {"loss": 2.0, "bits_per_byte": pytest.approx(2.0 / math.log(2) / 4)}
    record = prediction(task, rows[1], "test")
    assert record == {
        "key": "test[1]",
        "task": "image_speech_same",
        "target": "7 3 no",
        "output": "1 3 no",
        "metrics": per[1],
    }
