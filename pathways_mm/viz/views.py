"""The numbers behind every route figure, computed from routes documents (`pathways_mm.routes_file`).

Both renderers (png.py: PNG, html.py: routes.html) draw exactly these arrays;
tests check them against routes files of known structure.

A task's *share* of expert e in a layer is the fraction of its routes (token, chosen expert)
that went to e: each task row sums to 1 over experts (with top-k, a token counts k times).

Shape suffixes: T tasks, E experts, M modalities, L MoE layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

MAIN_MASS = 0.5  # a task's main experts in a layer: the fewest that carry this much of its routes


class LayerView(NamedTuple):
    block: int
    share_TE: np.ndarray  # [tasks shown, experts] share of each task's routes
    modality_ME: np.ndarray  # [modalities, experts] share of each expert's routes per modality (nan: no routes)
    entropy_T: np.ndarray  # [tasks shown] mean gate entropy per token, nats
    usage_entropy_T: np.ndarray  # [tasks shown] entropy of the task's expert-usage histogram (its routes), nats
    # [tasks shown] share of the task's tokens whose top-1 expert is not the expert with most of the
    # task's routes (nan: a routes file without top-1 counts): 0 = one expert per task, not a pathway
    off_top_T: np.ndarray
    dropped_T: np.ndarray  # [tasks shown] fraction of the task's routes dropped over capacity
    mi_task: float  # I(task; expert) of the routes, bits
    mi_task_max: float  # its largest possible value, min(H(task), H(expert)), bits
    mi_modality: float  # I(modality; expert), bits
    mi_modality_max: float  # min(H(modality), H(expert)), bits


class Views(NamedTuple):
    tasks: list[str]  # tasks shown: those with at least one counted token
    modalities: list[str]
    layers: list[LayerView]
    pathways: dict[str, list[list[int]]]  # task -> per layer, its main experts (largest share first)
    shared_nodes: dict[tuple[int, int], list[str]]  # (layer position, expert) -> tasks whose pathway uses it
    reuse_TT: np.ndarray  # [tasks, tasks] routing overlap averaged over layers (1 = same experts, same shares)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy (bits) of the distribution proportional to `counts` (0 if there are none)."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log2(p)).sum())


def mutual_information(joint_XE: np.ndarray) -> float:
    """I(X; E) in bits of the joint distribution proportional to a count table [X, E].

    I = H(X) + H(E) - H(X, E): 0 when the rows are proportional (X tells nothing about E),
    H(X) when no two rows share a column.
    """
    j = np.asarray(joint_XE, dtype=np.float64)
    return max(0.0, entropy_bits(j.sum(1)) + entropy_bits(j.sum(0)) - entropy_bits(j))


def mutual_information_max(joint_XE: np.ndarray) -> float:
    """The largest I(X; E) any table with these marginals' entropies could have: min(H(X), H(E)), bits."""
    j = np.asarray(joint_XE, dtype=np.float64)
    return min(entropy_bits(j.sum(1)), entropy_bits(j.sum(0)))


def task_expert_joint(layer: dict[str, Any]) -> np.ndarray:
    """[tasks, experts] routes of a routes-file layer, summed over modalities."""
    return np.asarray(layer["routes"], dtype=np.float64).sum(1)


def modality_expert_joint(layer: dict[str, Any]) -> np.ndarray:
    """[modalities, experts] routes of a routes-file layer, summed over tasks."""
    return np.asarray(layer["routes"], dtype=np.float64).sum(0)


def conditional_entropy_bits(joint_XE: np.ndarray) -> np.ndarray:
    """[X] H(E | x) in bits for each row of a count table (nan for a row without counts)."""
    return np.array([entropy_bits(row) if row.sum() > 0 else np.nan for row in np.asarray(joint_XE, dtype=np.float64)])


def expert_load(joint_XE: np.ndarray) -> np.ndarray:
    """[E] each expert's share of all routes divided by its fair share 1/E (1 = exactly fair, 0 = dead)."""
    load_E = np.asarray(joint_XE, dtype=np.float64).sum(0)
    return _ratio(load_E * load_E.shape[0], np.full_like(load_E, load_E.sum()))


def present_tasks(doc: dict[str, Any]) -> list[int]:
    """Ids of the tasks that have counted tokens (a routes file lists every task of the model)."""
    tokens_T = sum(np.asarray(layer["tokens"]).sum(1) for layer in doc["layers"])
    return [i for i, n in enumerate(tokens_T) if n > 0]


def layer_view(layer: dict[str, Any], task_ids: list[int]) -> LayerView:
    routes_TME = np.asarray(layer["routes"], dtype=np.float64)[task_ids]
    routes_TE = routes_TME.sum(1)
    total_T = routes_TE.sum(1)
    by_mod_ME = routes_TME.sum(0)
    tokens_T = np.asarray(layer["tokens"], dtype=np.float64)[task_ids].sum(1)
    entropy_T = np.asarray(layer["entropy_sum"], dtype=np.float64)[task_ids].sum(1)
    dropped_T = np.asarray(layer["dropped"], dtype=np.float64)[task_ids].sum((1, 2))
    return LayerView(
        block=layer["block"],
        share_TE=_ratio(routes_TE, total_T[:, None]),
        modality_ME=_ratio(by_mod_ME, by_mod_ME.sum(0, keepdims=True)),
        entropy_T=_ratio(entropy_T, tokens_T),
        usage_entropy_T=np.array([entropy_bits(row) * np.log(2) if row.sum() > 0 else np.nan for row in routes_TE]),
        off_top_T=off_top_share(layer, task_ids, routes_TE),
        dropped_T=_ratio(dropped_T, total_T),
        # tasks without tokens have all-zero rows, so the shown tasks' routes are the whole joint
        mi_task=mutual_information(routes_TE),
        mi_task_max=mutual_information_max(routes_TE),
        mi_modality=mutual_information(by_mod_ME),
        mi_modality_max=mutual_information_max(by_mod_ME),
    )


def off_top_share(layer: dict[str, Any], task_ids: list[int], routes_TE: np.ndarray) -> np.ndarray:
    """[tasks] share of each task's tokens whose top-1 expert is not its most-routed expert (nan
    without top-1 counts or tokens)."""
    if "top1" not in layer:
        return np.full(len(task_ids), np.nan)
    top1_TE = np.asarray(layer["top1"], dtype=np.float64)[task_ids].sum(1)
    most_T = routes_TE.argmax(1)
    on_T = top1_TE[np.arange(len(task_ids)), most_T]
    return 1.0 - _ratio(on_T, top1_TE.sum(1))


def mi_label(bits: float, most: float, what: str) -> str:
    """`I(task; expert) = 0.85 bits (30% of max)`: a figure's words for a mutual information."""
    pct = f"{100 * bits / most:.0f}% of max" if most > 0 else "max 0"
    return f"I({what}; expert) = {bits:.2f} bits ({pct})"


def main_experts(share_E: np.ndarray, mass: float = MAIN_MASS) -> list[int]:
    """The fewest experts (largest share first) whose shares add up to at least `mass` (none if no routes)."""
    if not np.isfinite(share_E).all():
        return []
    order = np.argsort(-share_E, kind="stable")
    cum = np.cumsum(share_E[order])
    n = int(np.searchsorted(cum, mass - 1e-12)) + 1
    return [int(e) for e in order[: min(n, len(order))]]


def overlap(share_a_E: np.ndarray, share_b_E: np.ndarray) -> float:
    """Histogram intersection of two routing distributions: sum_e min(a_e, b_e), in [0, 1]."""
    return float(np.minimum(share_a_E, share_b_E).sum())


def reuse_matrix(layers: list[LayerView]) -> np.ndarray:
    """[tasks, tasks] overlap averaged over the layers where both tasks have routes (nan if none)."""
    T = layers[0].share_TE.shape[0]
    per_layer = np.full((len(layers), T, T), np.nan)
    for li, lv in enumerate(layers):
        for i in range(T):
            for j in range(T):
                per_layer[li, i, j] = overlap(lv.share_TE[i], lv.share_TE[j])  # nan where a task has no routes
    with np.errstate(invalid="ignore"):
        counted = np.isfinite(per_layer).sum(0)
        return np.where(counted > 0, np.nansum(per_layer, 0) / np.maximum(counted, 1), np.nan)


def views(doc: dict[str, Any], mass: float = MAIN_MASS) -> Views:
    """Everything the figures show for one routes document."""
    ids = present_tasks(doc)
    tasks = [doc["tasks"][i] for i in ids]
    layers = [layer_view(layer, ids) for layer in doc["layers"]]
    pathways = {t: [main_experts(lv.share_TE[i], mass) for lv in layers] for i, t in enumerate(tasks)}
    nodes: dict[tuple[int, int], list[str]] = {}
    for t, per_layer in pathways.items():
        for li, experts in enumerate(per_layer):
            for e in experts:
                nodes.setdefault((li, e), []).append(t)
    shared = {node: ts for node, ts in sorted(nodes.items()) if len(ts) > 1}
    reuse = reuse_matrix(layers) if tasks else np.zeros((0, 0))
    return Views(tasks, list(doc["modalities"]), layers, pathways, shared, reuse)


class Comparison(NamedTuple):
    tasks: list[str]  # tasks shown in both files
    added: list[str]  # shown only in the second ("after") file
    removed: list[str]  # shown only in the first
    blocks: list[int]
    delta_LTE: np.ndarray  # [layers, tasks, experts] share after - share before
    shift_TL: np.ndarray  # [tasks, layers] total variation distance 0.5 * sum_e |delta|: 0 same, 1 disjoint
    reuse_delta_TT: np.ndarray  # [tasks, tasks] reuse after - before


def compare(before: dict[str, Any], after: dict[str, Any]) -> Comparison:
    """What changed from `before` to `after` (same MoE layers and experts: routes.check_comparable)."""
    va, vb = views(before), views(after)
    common = [t for t in va.tasks if t in vb.tasks]
    ia = [va.tasks.index(t) for t in common]
    ib = [vb.tasks.index(t) for t in common]
    delta = np.stack([lb.share_TE[ib] - la.share_TE[ia] for la, lb in zip(va.layers, vb.layers)])
    return Comparison(
        tasks=common,
        added=[t for t in vb.tasks if t not in va.tasks],
        removed=[t for t in va.tasks if t not in vb.tasks],
        blocks=[lv.block for lv in va.layers],
        delta_LTE=delta,
        shift_TL=0.5 * np.abs(delta).sum(-1).T,
        reuse_delta_TT=vb.reuse_TT[np.ix_(ib, ib)] - va.reuse_TT[np.ix_(ia, ia)],
    )
