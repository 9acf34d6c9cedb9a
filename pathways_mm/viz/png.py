"""PNG figures of a routes file (matplotlib, no display needed).

Shape suffixes: T tasks, E experts, L MoE layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
        ax.set_title(f"block {lv.block}: share of each task's routes", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        paths.append(_save(fig, out / f"heatmap_block{lv.block}.png"))
    return paths


def pathway_graph(v: Views, out: Path) -> Path:
    """Each task's main experts in every MoE layer, linked layer to layer; shared experts ringed."""
    L, E = len(v.layers), v.layers[0].share_TE.shape[1]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * L, 1.5 + 0.35 * E))
    ax.scatter(np.repeat(np.arange(L), E), np.tile(np.arange(E), L), s=30, c="#cccccc", zorder=1)
    n = max(len(v.tasks), 1)
    for i, (task, per_layer) in enumerate(v.pathways.items()):
        dy = (i - (n - 1) / 2) * 0.08  # each task's lines slightly apart, so shared links stay visible
        for li in range(L - 1):
            for a in per_layer[li]:
                for b in per_layer[li + 1]:
                    ax.plot([li, li + 1], [a + dy, b + dy], color=task_color(i), lw=1.6, alpha=0.8, zorder=2)
        for li, experts in enumerate(per_layer):
            ax.scatter(
                [li] * len(experts),
                [e + dy for e in experts],
                s=40,
                color=task_color(i),
                zorder=3,
                label=task if li == 0 else None,
            )
    for (li, e), tasks in v.shared_nodes.items():
        ax.scatter([li], [e], s=260, facecolors="none", edgecolors="k", linewidths=1.5, zorder=4)
        ax.annotate(f"{len(tasks)}", (li, e), xytext=(9, 6), textcoords="offset points", fontsize=7)
    ax.set_xticks(range(L), [f"block {lv.block}" for lv in v.layers])
    ax.set_yticks(range(E))
    ax.set_ylabel("expert")
    ax.set_xlim(-0.5, L - 0.5)
    ax.invert_yaxis()
    ax.set_title("pathways: main experts per task (ringed = shared by n tasks)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
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
    fig, axes = plt.subplots(L, 1, figsize=(2 + 0.45 * E, 1.8 * L), squeeze=False)
    for ax, lv in zip(axes[:, 0], v.layers):
        bottom = np.zeros(E)
        for m, name in enumerate(v.modalities):
            vals = np.nan_to_num(lv.modality_ME[m])
            ax.bar(range(E), vals, bottom=bottom, color=MODALITY_COLORS[m % 3], label=name)
            bottom += vals
        ax.set_ylim(0, 1)
        ax.set_xticks(range(E))
        ax.set_ylabel(f"block {lv.block}")
    axes[0, 0].set_title("modality share of each expert's routes", fontsize=9)
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
