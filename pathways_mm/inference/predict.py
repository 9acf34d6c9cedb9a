"""`pathways-mm predict`: a trained model's answers to one's own images, clips and sentences.

    pathways-mm predict RUN --task digit_image --image seven.png          # prints: seven
    pathways-mm predict RUN --task digit_speech --audio seven.wav         # prints: 7
    pathways-mm predict RUN --input inputs.jsonl --out answers.jsonl      # batches, progress bar

An input line is a JSON object: "task" (or --task for all lines), "image" and/or "audio" (file
paths, relative to the input file's folder) and/or "text", and optionally "key" (default: its
line number); other fields are ignored. Each output line holds the key, the task, the output
text and the answer the metrics would score (`Task.final_answer`), in input order. Every line's
task, inputs and files are checked before the model runs; a bad line (unknown task, an input its
task does not read, a missing file, or later a file that turns out unreadable) stops the command
with one line naming it, and nothing is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from pathways_mm.errors import ConfigError
from pathways_mm.inference.api import Generation, TrainedModel, load
from pathways_mm.inference.inputs import check_inputs
from pathways_mm.io import atomic_writer, existing

FIELDS = ("image", "audio", "text")


class Line(NamedTuple):
    """One checked input line: where it came from, its task and its inputs (paths resolved)."""

    key: str
    task: str
    inputs: dict[str, Any]
    where: str  # "FILE line N", for error messages


def _check(model: TrainedModel, task: str, inputs: dict[str, Any], where: str | None = None) -> None:
    """Unknown task, an input the task does not read or a missing one: ConfigError, naming `where`
    if given (files are read later, batch by batch)."""
    try:
        t = model.task(task)
        check_inputs(t.name, t.modalities, [m for m, v in inputs.items() if v is not None])
        for m in ("image", "audio"):
            if isinstance(inputs.get(m), str) and not Path(inputs[m]).is_file():
                raise ConfigError(f"cannot read {m} {inputs[m]}: no such file")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def read_lines(path: Path, default_task: str | None) -> list[Line]:
    """The input file's lines, parsed and with media paths made relative to its folder."""
    p = existing(path, "input file", "give a JSONL file with one input per line")
    lines = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p} line {n}"
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a JSON object with task, image, audio and/or text")
        task = obj.get("task", default_task)
        if not isinstance(task, str):
            raise ConfigError(f'{where}: no task (add "task" to the line or give --task)')
        inputs = {m: obj[m] for m in FIELDS if obj.get(m) is not None}
        for m in ("image", "audio"):
            if m in inputs:
                if not isinstance(inputs[m], str):
                    raise ConfigError(f"{where}: {m} must be a file path")
                inputs[m] = str(p.parent / inputs[m])
        if "text" in inputs and not isinstance(inputs["text"], str):
            raise ConfigError(f"{where}: text must be a string")
        lines.append(Line(str(obj.get("key", f"line {n}")), task, inputs, where))
    if not lines:
        raise ConfigError(f"{p}: no input lines")
    return lines


def predict_lines(model: TrainedModel, lines: Sequence[Line], batch_size: int | None, **kw: Any) -> list[dict]:
    """Each line's output record, in input order; lines of one task run together in batches."""
    out: list[dict | None] = [None] * len(lines)
    by_task: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        by_task.setdefault(line.task, []).append(i)
    bs = batch_size or model.cfg.eval.batch_size
    with tqdm(total=len(lines), desc="predict", unit="input", dynamic_ncols=True) as bar:
        for task, idx in by_task.items():
            t = model.task(task)
            for start in range(0, len(idx), bs):
                chunk = idx[start : start + bs]
                got = model.generate_batch(
                    task, [lines[i].inputs for i in chunk], keys=[lines[i].where for i in chunk], **kw
                )
                for i, g in zip(chunk, got):
                    out[i] = record(lines[i].key, t.name, g, t.final_answer)
                bar.update(len(chunk))
    return out  # type: ignore[return-value]


def record(key: str, task: str, g: str | Generation, final_answer: Callable[[str], str]) -> dict[str, Any]:
    """An output line: key, task, output text, scored answer (and, with --experts, the routes)."""
    if isinstance(g, str):
        return {"key": key, "task": task, "output": g, "answer": final_answer(g)}
    routes = {"tokens": g.tokens, "answer_start": g.answer_start, "experts": g.experts}
    return {"key": key, "task": task, "output": g.text, "answer": g.answer} | routes


def run_predict(
    source: str,
    task: str | None,
    image: str | None = None,
    audio: str | None = None,
    text: str | None = None,
    input_path: str | None = None,
    out: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    experts: bool = False,
) -> list[dict[str, Any]]:
    """One input (prints the output) or a JSONL file of them (writes `out`, or prints JSON lines)."""
    single = {"image": image, "audio": audio, "text": text}
    if input_path is not None and any(v is not None for v in single.values()):
        raise ConfigError("give either --input FILE.jsonl or --image/--audio/--text, not both")
    if input_path is None and out is not None:
        raise ConfigError("--out goes with --input FILE.jsonl (one input prints its answer)")
    if input_path is None and task is None:
        raise ConfigError("give --task (see the run's tasks with `pathways-mm tasks`)")
    model = load(source, device)
    kw = {"max_new_tokens": max_new_tokens, "return_experts": experts}
    if input_path is None:
        _check(model, task, single)
        rec = record("input", task, model.generate(task, **single, **kw), model.task(task).final_answer)
        print(json.dumps(rec) if experts else rec["output"])
        return [rec]
    lines = read_lines(Path(input_path), task)
    for line in lines:
        _check(model, line.task, line.inputs, line.where)
    records = predict_lines(model, lines, batch_size, **kw)
    text_out = "".join(json.dumps(r) + "\n" for r in records)
    if out is None:
        sys.stdout.write(text_out)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out) as f:
            f.write(text_out)
        print(f"pathways-mm: wrote {len(records)} predictions to {out}", file=sys.stderr)
    return records
