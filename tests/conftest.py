from pathlib import Path

import pytest

import pathways_mm  # noqa: F401  (before DeepSpeed is imported: pins its accelerator, finds ninja)


@pytest.fixture(scope="session", autouse=True)
def deepspeed_op_built() -> None:
    """DeepSpeed's shared-memory op, built (or found in the cache) once before any test starts a
    process. Left to the first training process, a test that kills a run could kill it mid-build:
    the build's lock file stays behind and every later process waits on it until its timeout."""
    from deepspeed.comm.torch import build_shm_op  # after pathways_mm has pinned the accelerator

    build_shm_op()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (PMM_DATA for subprocesses)."""
    return tmp_path_factory.mktemp("pmm_data")
