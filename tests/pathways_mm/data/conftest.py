"""Small real datasets in every source format, made once per session from the built-in banks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathways_mm.data.examples import write_examples
from tests.helpers import EXAMPLE_SIZES


@pytest.fixture(scope="session")
def examples(tmp_path_factory, data_dir) -> Path:
    """The folder `pathways-mm data example` writes (experiment.yaml inside); media banks in data_dir."""
    out = tmp_path_factory.mktemp("own_data")
    write_examples(out, data_dir, sizes=EXAMPLE_SIZES)
    return out
