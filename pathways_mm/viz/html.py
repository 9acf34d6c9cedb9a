"""routes.html: the route views as inline SVG in one self-contained page (no network to view it).

Every cell, node and bar carries its number in `data-tip` (shown by a few lines of inline JS on
hover) and in an SVG <title> (the browser's own tooltip, also without JS). The routes document
itself is embedded as JSON for anyone who wants the raw counts from the page.

Shape suffixes: T tasks, E experts, M modalities, L MoE layers, R rows and C columns of a heatmap.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pathways_mm.io import atomic_write_text
from pathways_mm.viz.style import DELTA_CMAP, MODALITY_COLORS, SHARE_CMAP, cmap_hex, task_color
from pathways_mm.viz.views import Comparison, Views

CELL, LABEL_W, TOP = 30, 170, 34

_CSS = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{background:#223;color:#fff;padding:10px 18px}
header small{color:#bbc}
nav a{color:#cde;margin-right:14px}
section.view{padding:8px 18px;border-bottom:1px solid #ddd}
h2{font-size:16px;margin:10px 0 4px}
p.note{color:#555;margin:2px 0 8px;max-width:60em}
svg text{font-size:11px;fill:#222}
[data-tip]:hover{stroke:#000;stroke-width:2}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;padding:3px 6px;
 font-size:12px;display:none;box-shadow:1px 1px 4px #0003;white-space:pre}
"""

_JS = """
(function () {
  var tip = document.getElementById('tip');
  document.querySelectorAll('[data-tip]').forEach(function (el) {
    el.addEventListener('mousemove', function (ev) {
      tip.textContent = el.getAttribute('data-tip');
      tip.style.display = 'block';
      tip.style.left = (ev.clientX + 12) + 'px';
      tip.style.top = (ev.clientY + 12) + 'px';
    });
    el.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  });
  if (location.hash === '#selftest') {  // the browser test: hover every item, count tooltips shown right
    var ok = 0, items = document.querySelectorAll('[data-tip]');
    items.forEach(function (el) {
      el.dispatchEvent(new MouseEvent('mousemove', {clientX: 5, clientY: 5}));
      if (tip.style.display === 'block' && tip.textContent === el.getAttribute('data-tip')) ok++;
    });
    document.body.setAttribute('data-hover', ok + '/' + items.length);
  }
  var data = JSON.parse(document.getElementById('routes-data').textContent);
  var views = document.querySelectorAll('section.view');
  document.body.setAttribute('data-views', String(views.length));
  document.body.setAttribute('data-layers', String(data.layers.length));
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float, sign: bool = False) -> str:
    return "n/a" if not np.isfinite(v) else (f"{v:+.3f}" if sign else f"{v:.3f}")


def _rect(x, y, w, h, fill, tip) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}" data-tip="{_e(tip)}">'
        f"<title>{_e(tip)}</title></rect>"
    )


def svg_heatmap(
    values_RC: np.ndarray,
    rows: list[str],
    cols: list[str],
    color: Callable[[float], str],
    tip: Callable[[int, int, float], str],
    title: str,
    sign: bool = False,
    light: Callable[[float], bool] = lambda x: x < 0.5,
) -> str:
    """A heatmap; `light(value)` says where the number on a cell must be white (dark colour)."""
    R, C = values_RC.shape
    slant = max(map(len, cols), default=0) > 3  # long column names (tasks) go up at 45 degrees
    top = TOP + (6 * max(map(len, cols)) if slant else 0)
    w, h = (
        max(LABEL_W + C * CELL + (6 * max(map(len, cols)) if slant else 0), LABEL_W + 7 * len(title)) + 10,
        top + R * CELL + 10,
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{LABEL_W}" y="14">{_e(title)}</text>',
    ]
    for j, c in enumerate(cols):
        x = LABEL_W + j * CELL + CELL / 2
        turn = f' transform="rotate(-45 {x} {top - 4})" text-anchor="start"' if slant else ' text-anchor="middle"'
        out.append(f'<text x="{x}" y="{top - 4}"{turn}>{_e(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * CELL
        out.append(f'<text x="{LABEL_W - 6}" y="{y + CELL / 2 + 4}" text-anchor="end">{_e(r)}</text>')
        for j in range(C):
            v = float(values_RC[i, j])
            out.append(_rect(LABEL_W + j * CELL, y, CELL - 1, CELL - 1, color(v), tip(i, j, v)))
            if np.isfinite(v) and R * C <= 400:
                fill = "#fff" if light(v) else "#000"  # style, not the fill attribute: the page's CSS would win
                out.append(
                    f'<text x="{LABEL_W + j * CELL + CELL / 2}" y="{y + CELL / 2 + 4}" text-anchor="middle" '
                    f'style="fill:{fill};font-size:9px;pointer-events:none">{_fmt(v, sign)[: 5 if sign else 4]}</text>'
                )
    out.append("</svg>")
    return "".join(out)


def svg_pathways(v: Views) -> str:
    L, E = len(v.layers), v.layers[0].share_TE.shape[1]
    gx, gy, x0, y0 = 150, 26, 80, 40
    w, h = x0 + (L - 1) * gx + 200, y0 + E * gy + 20
    X = lambda li: x0 + li * gx  # noqa: E731
    Y = lambda e: y0 + e * gy  # noqa: E731
    n = max(len(v.tasks), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    for li, lv in enumerate(v.layers):
        out.append(f'<text x="{X(li)}" y="20" text-anchor="middle">block {lv.block}</text>')
    for e in range(E):
        out.append(f'<text x="{x0 - 30}" y="{Y(e) + 4}" text-anchor="end">expert {e}</text>')
    for i, (task, per_layer) in enumerate(v.pathways.items()):
        dy, col = (i - (n - 1) / 2) * 3, task_color(i)
        for li in range(L - 1):
            for a in per_layer[li]:
                for b in per_layer[li + 1]:
                    tip = f"{task}: expert {a} (block {v.layers[li].block}) -> expert {b} (block {v.layers[li + 1].block})"
                    out.append(
                        f'<line x1="{X(li)}" y1="{Y(a) + dy}" x2="{X(li + 1)}" y2="{Y(b) + dy}" stroke="{col}" '
                        f'stroke-width="2.5" stroke-opacity="0.8" data-tip="{_e(tip)}"><title>{_e(tip)}</title></line>'
                    )
    for li, lv in enumerate(v.layers):
        for e in range(E):
            users = v.shared_nodes.get((li, e), [t for t, p in v.pathways.items() if e in p[li]])
            shares = "\n".join(f"{t}: {_fmt(lv.share_TE[v.tasks.index(t), e])}" for t in v.tasks)
            tip = (
                f"block {lv.block}, expert {e}"
                + (f" (main expert of {', '.join(users)})" if users else "")
                + "\n"
                + shares
            )
            shared = len(users) > 1
            fill = "#fff" if shared else (task_color(v.tasks.index(users[0])) if users else "#ccc")
            out.append(
                f'<circle cx="{X(li)}" cy="{Y(e)}" r="{9 if shared else 6}" fill="{fill}" '
                f'stroke="{"#000" if shared else "none"}" stroke-width="2" data-tip="{_e(tip)}" '
                f'class="{"shared" if shared else "node"}"><title>{_e(tip)}</title></circle>'
            )
            if shared:
                out.append(
                    f'<text x="{X(li)}" y="{Y(e) + 4}" text-anchor="middle" style="font-size:9px;pointer-events:none">'
                    f"{len(users)}</text>"
                )
    lx = X(L - 1) + 40
    for i, task in enumerate(v.tasks):
        out.append(
            f'<rect x="{lx}" y="{y0 + i * 18 - 8}" width="12" height="10" fill="{task_color(i)}"/>'
            f'<text x="{lx + 18}" y="{y0 + i * 18 + 1}">{_e(task)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def svg_modality(v: Views) -> str:
    E = v.layers[0].share_TE.shape[1]
    bar_h, out = 110, []
    for lv in v.layers:
        w = LABEL_W + E * CELL + 10
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{bar_h + 40}" role="img">',
            f'<text x="{LABEL_W - 6}" y="{20 + bar_h / 2}" text-anchor="end">block {lv.block}</text>',
        ]
        for e in range(E):
            top = 20.0
            for m, name in enumerate(v.modalities):
                frac = float(lv.modality_ME[m, e])
                if np.isfinite(frac) and frac > 0:
                    hh = frac * bar_h
                    tip = f"block {lv.block}, expert {e}: {name} {_fmt(frac)} of its routes"
                    parts.append(_rect(LABEL_W + e * CELL, top, CELL - 3, hh, MODALITY_COLORS[m % 3], tip))
                    top += hh
            parts.append(f'<text x="{LABEL_W + e * CELL + CELL / 2}" y="{bar_h + 34}" text-anchor="middle">{e}</text>')
        parts.append("</svg>")
        out.append("".join(parts))
    legend = " ".join(
        f'<span style="color:{MODALITY_COLORS[m % 3]}">&#9632; {_e(n)}</span>' for m, n in enumerate(v.modalities)
    )
    return f"<div>{legend}</div>" + "<br>".join(out)


def _section(key: str, title: str, note: str, body: str) -> str:
    return f'<section class="view" id="view-{key}"><h2>{_e(title)}</h2><p class="note">{_e(note)}</p>{body}</section>'


def _views_html(v: Views) -> list[str]:
    E = v.layers[0].share_TE.shape[1]
    experts = [str(e) for e in range(E)]
    maps = []
    for lv in v.layers:
        rows = [f"{t} (H={_fmt(h)})" for t, h in zip(v.tasks, lv.entropy_T)]
        tip = lambda i, j, x, lv=lv: (
            f"block {lv.block}, {v.tasks[i]} -> expert {j}: share {_fmt(x)}\n"  # noqa: E731
            f"gate entropy {_fmt(lv.entropy_T[i])} nats, dropped {_fmt(lv.dropped_T[i])}"
        )
        vmax = max(0.01, float(np.nanmax(lv.share_TE, initial=0)))
        maps.append(
            svg_heatmap(
                lv.share_TE,
                rows,
                experts,
                lambda x, m=vmax: cmap_hex(SHARE_CMAP, x / m),
                tip,
                f"block {lv.block}",
                light=lambda x, m=vmax: x < 0.6 * m,
            )
        )
    reuse_tip = lambda i, j, x: f"{v.tasks[i]} / {v.tasks[j]}: overlap {_fmt(x)}"  # noqa: E731
    return [
        _section(
            "heatmap",
            "Task x expert, per MoE layer",
            "Share of each task's routes (token, chosen expert) that each expert receives; rows sum to 1. "
            "H = mean gate entropy per token (nats).",
            "<br>".join(maps),
        ),
        _section(
            "pathways",
            "Pathways",
            "Each task's main experts in every MoE layer (the fewest carrying half of its "
            "routes), linked layer to layer. White ringed nodes are shared by several tasks (count inside).",
            svg_pathways(v),
        ),
        _section(
            "reuse",
            "Expert reuse between tasks",
            "Overlap of two tasks' routing distributions, "
            "sum over experts of min(share), averaged over layers: 1 = same experts with the same shares.",
            svg_heatmap(
                v.reuse_TT,
                v.tasks,
                v.tasks,
                lambda x: cmap_hex(SHARE_CMAP, x),
                reuse_tip,
                "overlap",
                light=lambda x: x < 0.6,
            ),
        ),
        _section(
            "modality",
            "Modality share per expert",
            "Fraction of each expert's routes that come from each modality.",
            svg_modality(v),
        ),
    ]


def _compare_html(c: Comparison, names: tuple[str, str]) -> str:
    E = c.delta_LTE.shape[-1]
    lim = max(0.05, float(np.abs(c.delta_LTE).max(initial=0)))
    maps = []
    for li, block in enumerate(c.blocks):
        tip = lambda i, j, x, b=block: f"block {b}, {c.tasks[i]} -> expert {j}: share change {_fmt(x, True)}"  # noqa: E731
        maps.append(
            svg_heatmap(
                c.delta_LTE[li],
                c.tasks,
                [str(e) for e in range(E)],
                lambda x: cmap_hex(DELTA_CMAP, (x + lim) / (2 * lim)),
                tip,
                f"block {block}",
                sign=True,
                light=lambda x: abs(x) > 0.6 * lim,
            )
        )
    shift_tip = lambda i, j, x: f"{c.tasks[i]}, block {c.blocks[j]}: routing shift {_fmt(x)}"  # noqa: E731
    shift = svg_heatmap(
        c.shift_TL,
        c.tasks,
        [f"b{b}" for b in c.blocks],
        lambda x: cmap_hex(SHARE_CMAP, x),
        shift_tip,
        "routing shift: total variation (0 same, 1 disjoint)",
        light=lambda x: x < 0.6,
    )
    extra = "".join(f" {k}: {', '.join(v)}." for k, v in (("New tasks", c.added), ("Gone", c.removed)) if v)
    return _section(
        "compare",
        f"What changed: {names[0]} -> {names[1]}",
        f"Share after minus share before, for tasks in both files.{extra}",
        "<br>".join(maps) + "<br>" + shift,
    )


def render(doc: dict[str, Any], v: Views, c: Comparison | None = None, names: tuple[str, str] = ("", "")) -> str:
    m, ck = doc["model"], doc.get("checkpoint") or {}
    where = ck.get("path") or ck.get("run_dir") or "?"
    head = (
        f"model {_e(m.get('name'))} ({_e(m.get('hash'))}), step {_e(ck.get('step'))}, {_e(where)}; "
        f"split {_e(doc.get('data', {}).get('split'))}"
    )
    sections = _views_html(v) + ([_compare_html(c, names)] if c is not None else [])
    nav = "".join(
        f'<a href="#view-{k}">{k}</a>'
        for k in ["heatmap", "pathways", "reuse", "modality"] + (["compare"] if c else [])
    )
    data = json.dumps(doc).replace("</", "<\\/")  # a "</script>" inside a string must not end the block
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>pathways-mm routes</title>'
        f"<style>{_CSS}</style></head><body><header><b>pathways-mm routes</b> <small>{head}</small>"
        f'<nav>{nav}</nav></header>{"".join(sections)}<div id="tip"></div>'
        f'<script type="application/json" id="routes-data">{data}</script><script>{_JS}</script></body></html>'
    )


def write(
    path: Path, doc: dict[str, Any], v: Views, c: Comparison | None = None, names: tuple[str, str] = ("", "")
) -> Path:
    atomic_write_text(path, render(doc, v, c, names))
    return path
