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
from pathways_mm.viz.views import Comparison, Views, mi_label

CELL, MIN_LABEL_W, CHAR_W, TOP = 30, 60, 6.8, 34

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
    var clipped = 0;  // text drawn past its picture's left or top edge (a name cut off)
    document.querySelectorAll('svg').forEach(function (svg) {
      var box = svg.getBoundingClientRect();
      svg.querySelectorAll('text').forEach(function (t) {
        var r = t.getBoundingClientRect();
        if (r.left < box.left - 0.5 || r.top < box.top - 0.5) clipped++;
      });
    });
    document.body.setAttribute('data-clipped', String(clipped));
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
    # wide enough for the longest row label (11px text is ~6.6px a character): no name is clipped
    label_w = max(MIN_LABEL_W, 12 + int(CHAR_W * max(map(len, rows), default=0)))
    slant = max(map(len, cols), default=0) > 3  # long column names (tasks) go up at 45 degrees
    top = TOP + (6 * max(map(len, cols)) if slant else 0)
    w, h = (
        max(label_w + C * CELL + (6 * max(map(len, cols)) if slant else 0), label_w + 7 * len(title)) + 10,
        top + R * CELL + 10,
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{label_w}" y="14">{_e(title)}</text>',
    ]
    for j, c in enumerate(cols):
        x = label_w + j * CELL + CELL / 2
        turn = f' transform="rotate(-45 {x} {top - 4})" text-anchor="start"' if slant else ' text-anchor="middle"'
        out.append(f'<text x="{x}" y="{top - 4}"{turn}>{_e(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * CELL
        out.append(f'<text x="{label_w - 6}" y="{y + CELL / 2 + 4}" text-anchor="end">{_e(r)}</text>')
        for j in range(C):
            v = float(values_RC[i, j])
            out.append(_rect(label_w + j * CELL, y, CELL - 1, CELL - 1, color(v), tip(i, j, v)))
            if np.isfinite(v) and R * C <= 400:
                fill = "#fff" if light(v) else "#000"  # style, not the fill attribute: the page's CSS would win
                out.append(
                    f'<text x="{label_w + j * CELL + CELL / 2}" y="{y + CELL / 2 + 4}" text-anchor="middle" '
                    f'style="fill:{fill};font-size:9px;pointer-events:none">{_fmt(v, sign)[: 5 if sign else 4]}</text>'
                )
    out.append("</svg>")
    return "".join(out)


def svg_pathways(v: Views) -> str:
    """Small multiples: one panel per task, its route share on every (layer, expert) as the node's
    area, its main experts ringed and linked layer to layer with the flow's width."""
    L, E = len(v.layers), v.layers[0].share_TE.shape[1]
    gx, gy, x0, y0 = 64, 17, 58, 34
    w, h = x0 + (L - 1) * gx + 24, y0 + E * gy + 6
    X = lambda li: x0 + li * gx  # noqa: E731
    Y = lambda e: y0 + e * gy  # noqa: E731
    panels = []
    for i, task in enumerate(v.tasks):
        col, per_layer = task_color(i), v.pathways[task]
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" class="pathway">',
               f'<text x="4" y="14" style="font-weight:bold">{_e(task)}</text>']  # fmt: skip
        for li, lv in enumerate(v.layers):
            out.append(f'<text x="{X(li)}" y="{y0 - 8}" text-anchor="middle">b{lv.block}</text>')
        for e in range(E):
            out.append(f'<text x="{x0 - 14}" y="{Y(e) + 4}" text-anchor="end">e{e}</text>')
        for li in range(L - 1):
            a_share, b_share = v.layers[li].share_TE[i], v.layers[li + 1].share_TE[i]
            for a in per_layer[li]:
                for b in per_layer[li + 1]:
                    flow = float(np.sqrt(a_share[a] * b_share[b]))
                    tip = f"{task}: expert {a} (block {v.layers[li].block}, share {_fmt(a_share[a])}) -> expert {b} (block {v.layers[li + 1].block}, share {_fmt(b_share[b])})"
                    out.append(f'<line x1="{X(li)}" y1="{Y(a)}" x2="{X(li + 1)}" y2="{Y(b)}" stroke="{col}" '
                               f'stroke-width="{1 + 10 * flow:.1f}" stroke-opacity="0.55" data-tip="{_e(tip)}">'
                               f"<title>{_e(tip)}</title></line>")  # fmt: skip
        for li, lv in enumerate(v.layers):
            for e in range(E):
                share = float(lv.share_TE[i, e])
                main = e in per_layer[li]
                others = [t for t in v.shared_nodes.get((li, e), []) if t != task]
                tip = f"{task}, block {lv.block}, expert {e}: share {_fmt(share)}" + (
                    f"\nalso a main expert of {', '.join(others)}" if others else "")  # fmt: skip
                r = 1.5 + 7 * np.sqrt(share if np.isfinite(share) else 0.0)
                out.append(f'<circle cx="{X(li)}" cy="{Y(e)}" r="{r:.1f}" fill="{col if main else "#bbb"}" '
                           f'stroke="{"#000" if main else "none"}" stroke-width="{1.5 if others else 0.8}" '
                           f'class="{"main" if main else "node"}" data-tip="{_e(tip)}"><title>{_e(tip)}</title></circle>')  # fmt: skip
        out.append("</svg>")
        panels.append("".join(out))
    return '<div style="display:flex;flex-wrap:wrap;gap:6px">' + "".join(panels) + "</div>"


def svg_modality(v: Views) -> str:
    E = v.layers[0].share_TE.shape[1]
    bar_h, out, label_w = 110, [], 80
    for lv in v.layers:
        w = label_w + E * CELL + 10
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{bar_h + 40}" role="img">',
            f'<text x="{label_w - 6}" y="{20 + bar_h / 2}" text-anchor="end">block {lv.block}</text>',
        ]
        for e in range(E):
            top = 20.0
            for m, name in enumerate(v.modalities):
                frac = float(lv.modality_ME[m, e])
                if np.isfinite(frac) and frac > 0:
                    hh = frac * bar_h
                    tip = f"block {lv.block}, expert {e}: {name} {_fmt(frac)} of its routes"
                    parts.append(_rect(label_w + e * CELL, top, CELL - 3, hh, MODALITY_COLORS[m % 3], tip))
                    top += hh
            parts.append(f'<text x="{label_w + e * CELL + CELL / 2}" y="{bar_h + 34}" text-anchor="middle">{e}</text>')
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
        rows = [
            f"{t} (H={_fmt(h)}, Hu={_fmt(u)}, off={_fmt(o)})"
            for t, h, u, o in zip(v.tasks, lv.entropy_T, lv.usage_entropy_T, lv.off_top_T)
        ]
        tip = lambda i, j, x, lv=lv: (
            f"block {lv.block}, {v.tasks[i]} -> expert {j}: share {_fmt(x)}\n"  # noqa: E731
            f"gate entropy {_fmt(lv.entropy_T[i])} nats, usage entropy {_fmt(lv.usage_entropy_T[i])} nats, "
            f"top-1 off the main expert {_fmt(lv.off_top_T[i])}, dropped {_fmt(lv.dropped_T[i])}"
        )
        vmax = max(0.01, float(np.nanmax(lv.share_TE, initial=0)))
        maps.append(
            svg_heatmap(
                lv.share_TE,
                rows,
                experts,
                lambda x, m=vmax: cmap_hex(SHARE_CMAP, x / m),
                tip,
                f"block {lv.block}: {mi_label(lv.mi_task, lv.mi_task_max, 'task')}; "
                f"{mi_label(lv.mi_modality, lv.mi_modality_max, 'modality')}",
                light=lambda x, m=vmax: x < 0.6 * m,
            )
        )
    reuse_tip = lambda i, j, x: f"{v.tasks[i]} / {v.tasks[j]}: overlap {_fmt(x)}"  # noqa: E731
    return [
        _section(
            "heatmap",
            "Task x expert, per MoE layer",
            "Share of each task's routes (token, chosen expert) that each expert receives; rows sum to 1. "
            "H = mean gate entropy per token (nats: the entropy of each token's router distribution, averaged "
            "over the task's tokens); Hu = entropy of the task's expert-usage histogram (its routes, nats); "
            "off = share of the task's tokens whose top-1 expert is not the task's most-used expert (0: every "
            "token of the task picks the same first expert). I(task; expert): how much a route's task tells about its "
            "expert, in bits, and its share of the most it could be, min(H(task), H(expert)); 0 = every task "
            "routes alike. I(modality; expert) likewise for modalities.",
            "<br>".join(maps),
        ),
        _section(
            "pathways",
            "Pathways",
            "One panel per task: the area of each (block, expert) dot is the share of the task's routes it "
            "receives; the task's main experts (the fewest carrying half of its routes) are coloured and linked "
            "layer to layer, the link as wide as the flow. A thicker ring: also a main expert of another task.",
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
