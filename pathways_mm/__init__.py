"""pathways-mm: one sparse model for many tasks and modalities, trained with DeepSpeed."""

import logging
import os
import sys

__version__ = "0.1.0"


def _no_imports_from_cwd() -> None:
    """Launched as `python -m pathways_mm.cli` (the deepspeed launcher does so), Python puts the
    current directory first on the import path; `pathways-mm` does not. Drop it before anything
    else is imported, so both launch the same way and a .py file lying next to a downloaded
    checkpoint (a plugin's module name, or `sklearn.py`) is never imported. A plugin module of
    your own is found through PYTHONPATH or an installed package.
    """
    argv = getattr(sys, "orig_argv", [])
    launched = any(a == "-m" and b == "pathways_mm.cli" for a, b in zip(argv, argv[1:]))
    if launched and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


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


def _quiet_third_party() -> None:
    """Keep start-up warnings a user can do nothing about out of the way (PMM_VERBOSE=1 shows them).

    On a machine without a CUDA runtime, torch warns "No CUDA runtime is found, using CUDA_HOME=..."
    when DeepSpeed loads its CPU shared-memory op; nothing here needs CUDA_HOME.
    """
    if not os.environ.get("PMM_VERBOSE"):
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


_no_imports_from_cwd()
_pin_accelerator()
_quiet_third_party()
