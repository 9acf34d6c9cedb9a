"""`pathways-mm routes`: every figure of a routes file, and what changed from another, into a folder."""

from __future__ import annotations

import os
from pathlib import Path

from pathways_mm import routes_file
from pathways_mm.io import output_dir
from pathways_mm.viz import html, png, views


def draw(
    routes_path: str | os.PathLike, out_dir: str | os.PathLike, compare: str | os.PathLike | None = None
) -> list[Path]:
    """`pathways-mm routes`: every figure of `routes_path` (and the change from `compare`) into out_dir.

    `compare` is the earlier ("before") file. Returns the paths written, routes.html last.
    """
    other_path = compare
    out = output_dir(out_dir, "--out")
    doc = routes_file.load(routes_path)
    before = routes_file.load(other_path) if other_path else None
    if before is not None:
        routes_file.check_comparable(before, doc, str(other_path), str(routes_path))
    v = views.views(doc)
    if not v.tasks:
        raise ValueError(f"{routes_path}: no task has counted tokens; nothing to draw")
    out.mkdir(parents=True, exist_ok=True)
    paths = png.heatmaps(v, out) + [png.pathway_graph(v, out), png.reuse(v, out), png.modality_shares(v, out)]
    c = views.compare(before, doc) if before is not None else None
    names = (Path(other_path).name, Path(routes_path).name) if other_path else ("", "")
    if c is not None:
        paths.append(png.comparison(c, out, names))
    paths.append(html.write(out / "routes.html", doc, v, c, names))
    return paths
