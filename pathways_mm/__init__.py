"""pathways-mm: one sparse model for many tasks and modalities, trained with DeepSpeed."""

import os

__version__ = "0.1.0"


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
