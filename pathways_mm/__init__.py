"""pathways-mm: one sparse model for many tasks and modalities, trained with DeepSpeed."""

import importlib
import os

__version__ = "0.1.0"
__all__ = ["load"]


def _pin_accelerator() -> None:
    """Name DeepSpeed's accelerator before anything imports DeepSpeed (here: the package's first import).

    Left to detect it, DeepSpeed builds its shared-memory op with other flags than when
    DS_ACCELERATOR=cpu is set, and the two builds evict each other from the one extension
    cache: every switch costs a 30-50 s recompile.
    """
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


_pin_accelerator()


def __getattr__(name: str):
    """`pathways_mm.load` (pathways_mm.inference.api.load), imported on first use: importing the
    package stays cheap (no DeepSpeed, no model code) for `pathways-mm --help` and the leaves.
    By name, not by an import statement: the package's own module is a leaf of the layer rules."""
    if name == "load":
        return importlib.import_module("pathways_mm.inference.api").load
    raise AttributeError(f"module 'pathways_mm' has no attribute {name!r}")
