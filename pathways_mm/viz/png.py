"""PNG figures of a routes file (matplotlib, no display needed).

Shape suffixes: T tasks, E experts, L MoE layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathways_mm.viz import views
from pathways_mm.viz.style import DELTA_CMAP, MODALITY_COLORS, SHARE_CMAP, plt, task_color
from pathways_mm.viz.views import Comparison, Views


def _annotate(ax, values: np.ndarray, vmax: float, fmt: str = "{:.2f}", diverging: bool = False) -> None:
    """Numbers on the cells: white on viridis' dark low end, black on RdBu's light middle."""
    if values.size > 400:
        return  # unreadable at that density; the colour and routes.html's hover carry the number
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            light = abs(v) > 0.6 * vmax if diverging else v < 0.6 * vmax
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="w" if light else "k")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmaps(v: Views, out: Path) -> list[Path]:
    """One task x expert heatmap per MoE layer: the share of each task's routes."""
    paths = []
    for lv in v.layers:
        T, E = lv.share_TE.shape
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * E, 1.2 + 0.4 * max(T, 1)))
        vmax = max(0.01, float(np.nanmax(lv.share_TE, initial=0)))
        im = ax.imshow(lv.share_TE, cmap=SHARE_CMAP, vmin=0, vmax=vmax)
        _annotate(ax, lv.share_TE, vmax)
        ax.set_xticks(range(E))
        ax.set_yticks(range(T), [f"{t}  (H={h:.2f})" for t, h in zip(v.tasks, lv.entropy_T)])
        ax.set_xlabel("expert")
        mi = views.mi_label(lv.mi_task, lv.mi_task_max, "task")
        ax.set_title(f"block {lv.block}: share of each task's routes\n{mi}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        paths.append(_save(fig, out / f"heatmap_block{lv.block}.png"))
    return paths


def pathway_graph(v: Views, out: Path) -> Path:
    """Small multiples, one panel per task: its share of routes on every (layer, expert) as the dot's
    area, its main experts (the fewest carrying half its routes) coloured and linked layer to layer
    with width = the flow between them (geometric mean of the two shares)."""
    L, E, T = len(v.layers), v.layers[0].share_TE.shape[1], max(len(v.tasks), 1)
    cols = min(T, 4)
    rows = -(-T // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 + 1.15 * L * cols, 0.9 + 0.28 * E * rows), squeeze=False)
    for i, task in enumerate(v.tasks):
        ax, col, per_layer = axes[i // cols, i % cols], task_color(i), v.pathways[task]
        for li in range(L - 1):
            a_share, b_share = v.layers[li].share_TE[i], v.layers[li + 1].share_TE[i]
            for a in per_layer[li]:
                for b in per_layer[li + 1]:
                    flow = float(np.sqrt(a_share[a] * b_share[b]))
                    ax.plot([li, li + 1], [a, b], color=col, lw=0.5 + 8 * flow, alpha=0.55, zorder=1)
        for li, lv in enumerate(v.layers):
            share_E = np.nan_to_num(lv.share_TE[i])
            main = [e in per_layer[li] for e in range(E)]
            ax.scatter([li] * E, range(E), s=4 + 260 * share_E, c=[col if m else "#bbbbbb" for m in main],
                       edgecolors=["k" if m else "none" for m in main], linewidths=0.6, zorder=2)  # fmt: skip
        ax.set_title(task, fontsize=8)
        ax.set_xticks(range(L), [f"b{lv.block}" for lv in v.layers], fontsize=7)
        ax.set_yticks(range(E), [str(e) for e in range(E)], fontsize=6)
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(E - 0.5, -0.5)
    for k in range(len(v.tasks), rows * cols):
        axes[k // cols, k % cols].axis("off")
    fig.suptitle("pathways: each task's route share per (block, expert); main experts coloured and linked", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "pathways.png")


def reuse(v: Views, out: Path) -> Path:
    T = len(v.tasks)
    fig, ax = plt.subplots(figsize=(2 + 0.7 * T, 1.5 + 0.6 * T))
    im = ax.imshow(v.reuse_TT, cmap=SHARE_CMAP, vmin=0, vmax=1)
    _annotate(ax, v.reuse_TT, 1.0)
    ax.set_xticks(range(T), v.tasks, rotation=45, ha="right")
    ax.set_yticks(range(T), v.tasks)
    ax.set_title("expert reuse: routing overlap, mean over layers", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, out / "reuse.png")


def modality_shares(v: Views, out: Path) -> Path:
    L, E = len(v.layers), v.layers[0].share_TE.shape[1]
    fig, axes = plt.subplots(L, 1, figsize=(2 + 0.45 * E, 2 * L), squeeze=False, layout="constrained")
    for ax, lv in zip(axes[:, 0], v.layers):
        bottom = np.zeros(E)
        for m, name in enumerate(v.modalities):
            vals = np.nan_to_num(lv.modality_ME[m])
            ax.bar(range(E), vals, bottom=bottom, color=MODALITY_COLORS[m % 3], label=name)
            bottom += vals
        ax.set_ylim(0, 1)
        ax.set_xticks(range(E))
        ax.set_ylabel(f"block {lv.block}")
        ax.set_title(views.mi_label(lv.mi_modality, lv.mi_modality_max, "modality"), fontsize=8)
    fig.suptitle("modality share of each expert's routes", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out / "modality.png")


def comparison(c: Comparison, out: Path, names: tuple[str, str]) -> Path:
    L, T = len(c.blocks), len(c.tasks)
    E = c.delta_LTE.shape[-1]
    fig, axes = plt.subplots(
        1, L + 1, figsize=(3.5 + (0.45 * E + 1) * L, 2.2 + 0.4 * max(T, 1)), squeeze=False, layout="constrained"
    )
    lim = max(0.05, float(np.abs(c.delta_LTE).max(initial=0)))
    for li, ax in enumerate(axes[0, :L]):
        im = ax.imshow(c.delta_LTE[li], cmap=DELTA_CMAP, vmin=-lim, vmax=lim)
        _annotate(ax, c.delta_LTE[li], lim, "{:+.2f}", diverging=True)
        ax.set_xticks(range(E))
        ax.set_yticks(range(T), c.tasks if li == 0 else [""] * T)
        ax.set_title(f"block {c.blocks[li]}: share change", fontsize=8)
        ax.set_xlabel("expert")
    fig.colorbar(im, ax=axes[0, :L].tolist(), shrink=0.8)
    ax = axes[0, L]
    for i, task in enumerate(c.tasks):
        ax.plot(c.blocks, c.shift_TL[i], marker="o", color=task_color(i), label=task)
    ax.set_ylim(0, 1)
    ax.set_xticks(c.blocks)
    ax.set_xlabel("block")
    ax.set_title("routing shift (total variation)", fontsize=8)
    if c.tasks:
        ax.legend(fontsize=7)
    extra = "".join(f"; {k}: {', '.join(v)}" for k, v in (("new", c.added), ("gone", c.removed)) if v)
    fig.suptitle(f"{names[0]} -> {names[1]}{extra}", fontsize=9)
    return _save(fig, out / "compare.png")
