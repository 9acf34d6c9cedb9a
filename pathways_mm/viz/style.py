"""Colours shared by the PNG and HTML views of a routes file."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

__all__ = ["DELTA_CMAP", "MODALITY_COLORS", "SHARE_CMAP", "cmap_hex", "plt", "task_color"]

SHARE_CMAP, DELTA_CMAP, MODALITY_COLORS = "viridis", "RdBu_r", ("#4c72b0", "#dd8452", "#55a868")


def task_color(i: int) -> str:
    return to_hex(colormaps["tab10"](i % 10))


def cmap_hex(name: str, value: float) -> str:
    """Colour of `value` in [0, 1] on a matplotlib colormap, as #rrggbb (grey for nan)."""
    return "#dddddd" if not np.isfinite(value) else to_hex(colormaps[name](float(np.clip(value, 0, 1))))
