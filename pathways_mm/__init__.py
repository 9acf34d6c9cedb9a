"""pathways-mm: one sparse model for many tasks and modalities, trained with DeepSpeed."""

import importlib
import logging
import os
import shutil
import sys
import sysconfig

__version__ = "0.1.0"
__all__ = ["load"]


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


def _ninja_on_path() -> None:
    """DeepSpeed builds its CPU communication op at first use and looks for ninja on PATH. pip puts
    ninja (a dependency) in the environment's scripts folder, which is not on PATH unless the
    environment is activated: `.venv/bin/pathways-mm train ...` or `.venv/bin/python -m pytest` on a
    machine without a system ninja failed with "Unable to JIT load the deepspeed_shm_comm op due to
    ninja not being installed". Put that folder at the end of PATH (the end: nothing the user has
    on PATH is shadowed); subprocesses and the deepspeed launcher inherit it.
    """
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + scripts


def _quiet_third_party() -> None:
    """Keep start-up warnings a user can do nothing about out of the way (PMM_VERBOSE=1 shows them).

    On a machine without a CUDA runtime, torch warns "No CUDA runtime is found, using CUDA_HOME=..."
    when DeepSpeed loads its CPU shared-memory op; nothing here needs CUDA_HOME.
    """
    if not os.environ.get("PMM_VERBOSE"):
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


_no_imports_from_cwd()
_ninja_on_path()
_pin_accelerator()
_quiet_third_party()


def __getattr__(name: str):
    """`pathways_mm.load` (pathways_mm.inference.api.load), imported on first use: importing the
    package stays cheap (no DeepSpeed, no model code) for `pathways-mm --help` and the leaves.
    By name, not by an import statement: the package's own module is a leaf of the layer rules."""
    if name == "load":
        return importlib.import_module("pathways_mm.inference.api").load
    raise AttributeError(f"module 'pathways_mm' has no attribute {name!r}")
