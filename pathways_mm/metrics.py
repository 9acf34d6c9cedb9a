"""Evaluation metrics from per-sample rows, and the per-task table every command prints."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

METRICS = ("bits_per_byte", "exact_match", "char_error_rate", "loss")
LOWER_IS_BETTER = ("bits_per_byte", "char_error_rate", "loss")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class EvalRow(NamedTuple):
    """What one evaluated sample contributes to its task's metrics."""

    index: int  # position in the split (shard padding repeats some; they collapse on it)
    nll: float  # summed over the target tokens, in nats
    num_tokens: int
    num_bytes: int  # UTF-8 bytes of the target text
    generated: str | None  # greedy output, for generation metrics
    target: str
    group: str | None  # Task.group(sample)


def score(
    rows: Sequence[EvalRow],
    metrics: Sequence[str],
    final_answer: Callable[[str], str] = str.strip,
    by_group: bool = True,
) -> dict[str, Any]:
    """Corpus-level `metrics` of `rows`; with groups, the same metrics per group under "groups".

    `final_answer` picks what is scored out of an output (and a target): a task whose targets
    write a scratchpad before the answer scores only the answer.
    """
    nll = sum(r.nll for r in rows)
    ntok = sum(r.num_tokens for r in rows)
    nbytes = sum(r.num_bytes for r in rows)
    res: dict[str, Any] = {"n": len(rows), "loss": nll / max(ntok, 1)}
    if "bits_per_byte" in metrics:
        res["bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
    pairs = [(final_answer(r.generated), final_answer(r.target)) for r in rows if r.generated is not None]
    if "exact_match" in metrics:
        res["exact_match"] = sum(g == t for g, t in pairs) / max(len(rows), 1)
    if "char_error_rate" in metrics:
        errs = sum(edit_distance(g, t) for g, t in pairs)
        res["char_error_rate"] = errs / max(1, sum(len(t) for _, t in pairs))
    groups = sorted({r.group for r in rows if r.group is not None})
    if by_group and groups:
        res["groups"] = {g: score([r for r in rows if r.group == g], metrics, final_answer, False) for g in groups}
    return res


def sample_metrics(
    row: EvalRow, metrics: Sequence[str], final_answer: Callable[[str], str] = str.strip
) -> dict[str, float]:
    """One sample's value of each metric (`score` pools them over a corpus): exact_match 0 or 1,
    char_error_rate its edits per target character, bits_per_byte and loss of its target alone."""
    out = {"loss": row.nll / max(row.num_tokens, 1)}
    if "bits_per_byte" in metrics:
        out["bits_per_byte"] = row.nll / math.log(2) / max(row.num_bytes, 1)
    if row.generated is not None:
        got, want = final_answer(row.generated), final_answer(row.target)
        if "exact_match" in metrics:
            out["exact_match"] = float(got == want)
        if "char_error_rate" in metrics:
            out["char_error_rate"] = edit_distance(got, want) / max(1, len(want))
    return out


def format_table(results: dict[str, Any]) -> str:
    """One line per (task, metric): value next to chance and the number of samples."""
    lines = [f"{'task':<20} {'metric':<16} {'value':>8} {'chance':>8} {'n':>6}"]
    for name, res in results.items():
        for metric, chance in res["chance"].items():
            c = "-" if chance is None else f"{chance:.3f}"
            lines.append(f"{name:<20} {metric:<16} {res[metric]:>8.3f} {c:>8} {res['n']:>6}")
    return "\n".join(lines)
