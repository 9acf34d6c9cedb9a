"""`pathways-mm samples`: held-out test inputs as ordinary files (PNG, WAV) to try `predict` on.

    pathways-mm samples --out samples [--task NAME ...] [--count N] [--split test]

For each task, the first N samples of its split (digit images no training sample shows, voices
training never hears) become files in DIR: `digit_image-0.png`, `digit_speech-0.wav`, ... and
one line each in DIR/inputs.jsonl, with the target, ready for `predict --input`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pathways_mm.config import DataConfig, data_root
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.encoders.audio import Audio
from pathways_mm.errors import ConfigError
from pathways_mm.inference.inputs import write_png, write_wav
from pathways_mm.io import atomic_write_text
from pathways_mm.tasks import get_task, list_tasks

INPUTS = "inputs.jsonl"
SUFFIX = {"image": "png", "audio": "wav"}


def write_samples(out: str, tasks: list[str], count: int = 3, split: str = "test") -> list[dict[str, Any]]:
    """Write `count` samples of each task (default: every built-in task) into `out`; returns the
    inputs.jsonl lines."""
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    names = tasks or [info.name for info in list_tasks() if info.source == "builtin"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = DataConfig().seed
    lines = []
    for name in names:
        task = get_task(name)
        for i, sample in enumerate(load_split(task, split, data_root(), seed)[:count]):
            example = encode(task, sample)
            line: dict[str, Any] = {"key": f"{name}/{split}[{i}]", "task": name}
            for modality, raw in example.segments:
                if modality == "text":
                    line["text"] = raw
                    continue
                path = out_dir / f"{name}-{i}.{SUFFIX[modality]}"
                if modality == "image":
                    write_png(path, raw)
                else:
                    write_wav(path, Audio(*raw))
                line[modality] = path.name
            lines.append(line | {"target": example.target_text})
    atomic_write_text(out_dir / INPUTS, "".join(json.dumps(line) + "\n" for line in lines))
    print(
        f"pathways-mm: wrote {len(lines)} inputs of {len(names)} tasks to {out_dir} ({INPUTS} lists them with "
        f"their targets); try: pathways-mm predict RUN --input {out_dir / INPUTS}",
        file=sys.stderr,
    )
    return lines
