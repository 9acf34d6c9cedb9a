"""What every benchmark shares: synthetic batches, DeepSpeed configs, JSON rows (the timing loop
is `runtime/timing`, which `export --time-generation` uses too).

Benchmarks quote ratios of rows timed in the same run: iterations go round-robin over the rows,
so load on a shared host hits every row alike. Shape suffixes: B batch, L positions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pathways_mm.io import atomic_write_text
from pathways_mm.model.batch import IGNORE, PAD_MODALITY, TEXT, Batch


def synthetic_batch(
    B: int, L: int, vocab: int, num_tasks: int, device: torch.device, min_len: int | None = None
) -> Batch:
    """Random tokens with right padding (as collate lays them out), so telemetry skips real padding.

    Lengths are drawn from [min_len, L] (default L // 2); min_len = L gives no padding.
    """
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (B, L), generator=g)
    lengths = torch.randint(L // 2 if min_len is None else min_len, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, :]
    labels = torch.where(pos < lengths[:, None] - 1, tokens.roll(-1, dims=1), IGNORE)
    return Batch(
        tokens=tokens,
        task_ids=torch.randint(0, num_tasks, (B,), generator=g),
        prefix_len=torch.full((B,), 8),
        lengths=lengths,
        labels=labels,
        target_bytes=torch.zeros(B, dtype=torch.long),
        modality_ids=torch.where(pos < lengths[:, None], TEXT, PAD_MODALITY).expand(B, L).contiguous(),
        markers=torch.full((B, L), -1),
    ).to(device)


@contextmanager
def ds_config_file(extra: dict[str, Any] | None = None) -> Iterator[str]:
    """A throw-away DeepSpeed JSON for benchmark engines ("auto" batch sizes from the experiment config)."""
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **(extra or {}),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds, f)
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """A benchmark's figures for later reading (`--json FILE`; `bench gpu-check` collects them)."""
    atomic_write_text(Path(path), json.dumps(payload, indent=1))


def where(device: torch.device) -> str:
    """The device in words, for a benchmark's header line."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
