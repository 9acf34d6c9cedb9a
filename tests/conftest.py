from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (PMM_DATA for subprocesses)."""
    return tmp_path_factory.mktemp("pmm_data")
