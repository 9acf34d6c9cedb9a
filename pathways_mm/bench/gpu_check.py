"""`pathways-mm bench gpu-check`: every figure the project owes from a GPU, in one run of a few minutes.

On a CUDA machine: the environment, `pytest -m gpu`, `bench moe` at h200-a, h200-b and h200-c
(every row of a config timed in the same run), `bench train --config 1b --dense` next to the
planner's memory estimate, and a short bf16 training run of the demo's tasks with its eval table
and its step time next to the same steps on this machine's CPU. Without CUDA the same parts run
on tiny configs (a dry run: CI proves the check works before a GPU session spends its minutes).

Every part is its own process with a time limit, so one that fails or hangs costs only itself,
and the whole check stays inside `budget_s`. Writes OUT/gpu_check.json, OUT/gpu_check.md (also
printed) and OUT/gpu_check.log (every part's output). Installs nothing: on an offline GPU
machine `make gpu-check WHEELS=DIR` installs the wheels first (docs/gpu.md).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathways_mm.bench.train import TRAIN_CONFIGS
from pathways_mm.config import data_root, load_config
from pathways_mm.data.datasets import load_split
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text
from pathways_mm.metrics import format_table
from pathways_mm.tasks import ensure_loaded, get_task

_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
# The issue's speed targets (docs/benchmarks.md): MoE layer vs FLOP-matched dense, and MFU of the 1b model.
MOE_TARGETS = {"h200-a": 0.90, "h200-b": 0.90, "h200-c": 0.85}
MFU_TARGET = 0.40


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU figures, or a dry run's tiny stand-ins."""

    moe_configs: tuple[str, ...]
    moe_args: tuple[str, ...]
    train_config: str
    train_args: tuple[str, ...]
    demo_steps: int
    log_every: int
    cpu_steps: int
    eval_samples: int
    ds_config: str
    pipeline_args: tuple[str, ...]
    timeouts: dict[str, int]


GPU = Sizes(
    moe_configs=("h200-a", "h200-b", "h200-c"),
    moe_args=("--iters", "20", "--warmup", "5"),
    train_config="1b",
    train_args=("--iters", "8", "--warmup", "3"),
    demo_steps=300,
    log_every=25,
    cpu_steps=20,
    eval_samples=50,
    ds_config="configs/ds/gpu_bf16.json",
    pipeline_args=("--workers", "2", "--batches", "5", "--steps", "40"),
    timeouts={
        "pytest": 240,
        "moe": 120,
        "train": 240,
        "plan": 60,
        "data": 300,
        "demo": 300,
        "cpu": 180,
        "pipeline": 150,
    },
)
DRY = Sizes(
    moe_configs=("cpu",),
    moe_args=("--tokens", "256", "--iters", "2", "--warmup", "1"),
    train_config="cpu",
    train_args=("--iters", "2", "--warmup", "1", "--batch", "2", "--seq-len", "32"),
    demo_steps=4,
    log_every=2,
    cpu_steps=4,
    eval_samples=1,
    ds_config="configs/ds/cpu.json",
    pipeline_args=("--workers", "1", "--batches", "2", "--steps", "2"),
    # A dry run proves the parts work; a shared CPU may take minutes (DeepSpeed's op build waits for a lock).
    timeouts={
        "pytest": 600,
        "moe": 600,
        "train": 600,
        "plan": 120,
        "data": 900,
        "demo": 900,
        "cpu": 900,
        "pipeline": 900,
    },
)


def build_data(config: str) -> None:
    """Build (or find) the train and eval splits of an experiment's tasks in the data cache."""
    cfg = load_config(config, [])
    ensure_loaded(cfg.plugins)
    for name in cfg.tasks:
        for split in ("train", cfg.eval.split):
            load_split(get_task(name), split, data_root(cfg), cfg.data.seed)


class Check:
    """The parts of one gpu-check run, their results and the shared log and deadline."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, demo_config: str):
        self.out, self.dry_run, self.demo_config = out, dry_run, demo_config
        self.sizes = DRY if dry_run else GPU
        self.deadline = time.monotonic() + budget_s
        self.log = out / "gpu_check.log"
        self.output = ""  # the last part's stdout and stderr
        self.results: dict[str, Any] = {
            "mode": "dry run (no CUDA: tiny configs)" if dry_run else "gpu",
            "date": datetime.date.today().isoformat(),
        }

    def run(self, name: str, argv: list[str], kind: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """`python ARGV` with the part's time limit (never past the deadline); output appended to the log."""
        left = self.deadline - time.monotonic()
        limit = min(self.sizes.timeouts[kind], left - 5)
        if limit < 15:
            self.output = ""
            return {"status": f"skipped: out of time ({left:.0f} s of the budget left)"}
        child = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
        child.update(PYTHONUNBUFFERED="1", **(env or {}))
        t0 = time.monotonic()
        # Its own session: on a timeout the whole group goes (pytest's and the CLI's children too).
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = f"timed out after {limit:.0f} s"
        seconds = round(time.monotonic() - t0, 1)
        self.output = output
        with self.log.open("a") as f:
            f.write(f"\n===== {name}: {status}, {seconds} s: python {' '.join(argv)}\n{output}")
        part = {"status": status, "seconds": seconds}
        if status != "ok":
            part["tail"] = output[-1500:]
        return part

    def cli(self, name: str, args: list[str], kind: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        return self.run(name, ["-m", "pathways_mm.cli", *args], kind, env)


def environment() -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": importlib.metadata.version("deepspeed"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            card=props.name, capability=f"sm{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1)
        )
    return env


# The GPU tests by file, not `tests` as a whole: collecting every module would import what only
# some tests need (webdataset, datasets, soundfile), which an offline GPU machine lacks.
GPU_TESTS = ("tests/routing/test_gpu.py", "tests/pathways_mm/runtime/test_gpu.py")


def _pytest(c: Check) -> dict[str, Any]:
    part = c.run(
        "pytest -m gpu", ["-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", *GPU_TESTS], "pytest"
    )
    summary = [line for line in c.output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else "")
    return {**part, "counts": {k: int(n) for n, k in found}}


def _moe(c: Check) -> dict[str, Any]:
    out = {}
    for config in c.sizes.moe_configs:
        path = c.out / f"moe_{config}.json"
        part = c.cli(
            f"bench moe {config}", ["bench", "moe", "--config", config, *c.sizes.moe_args, "--json", str(path)], "moe"
        )
        out[config] = {**part, **(json.loads(path.read_text()) if part["status"] == "ok" else {})}
    return out


def _plan_args(config: str, dense: bool, batch: int, seq_len: int) -> list[str]:
    size, experts, top_k, expert_d_ff, _, _, vocab, dtype = TRAIN_CONFIGS[config]
    model = (
        ["--d-ff", str(top_k * expert_d_ff)]
        if dense
        else ["--experts", str(experts), "--top-k", str(top_k), "--expert-d-ff", str(expert_d_ff)]
    )
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    layout = ["--gpus", "1", "--gpu-mem", "1000", "--micro-batch", str(batch), "--seq-len", str(seq_len)]
    return [
        "plan",
        "--size",
        size,
        "--vocab",
        str(vocab),
        *model,
        *layout,
        "--precision",
        precision,
        "--context-gib",
        "0",
        "--fragmentation",
        "0",
    ]


def _train_bench(c: Check) -> dict[str, Any]:
    path = c.out / "train.json"
    args = ["bench", "train", "--config", c.sizes.train_config, "--dense", *c.sizes.train_args, "--json", str(path)]
    part = c.cli("bench train", args, "train")
    if part["status"] != "ok":
        return part
    bench = json.loads(path.read_text())
    planned = {}
    for dense in (True, False):  # the planner's allocated bytes (no CUDA context, no fragmentation)
        c.cli(
            f"plan {'dense' if dense else 'moe'}",
            _plan_args(c.sizes.train_config, dense, bench["batch"], bench["seq_len"]),
            "plan",
        )
        found = re.findall(r"^total\s+([\d.]+)", c.output, re.M)
        planned["dense" if dense else "moe"] = float(found[-1]) if found else None
    return {**part, **bench, "planned_gib": planned}


def _demo(c: Check) -> dict[str, Any]:
    s = c.sizes
    common = ["train", c.demo_config, "--set", f"train.steps={s.demo_steps}", "--set", "train.save_every=0"]
    common += ["--set", "train.eval_every=0", "--set", f"eval.max_samples={s.eval_samples}"]
    runs = {}
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    where = [("cpu", cpu_env)] if c.dry_run else [("gpu", {}), ("cpu", cpu_env)]
    for dev, env in where:
        run_dir = c.out / f"demo_{dev}"
        ds = s.ds_config if dev == "gpu" else "configs/ds/cpu.json"
        steps = s.demo_steps if dev == "gpu" else s.cpu_steps
        args = [*common, "--set", f"train.out_dir={run_dir}", "--set", f"train.ds_config={Path(ds).resolve()}"]
        args += ["--set", f"train.log_every={s.log_every if dev == 'gpu' else max(1, steps // 4)}"]
        if dev == "cpu" and steps < s.demo_steps:
            args += ["--stop-after", str(steps)]  # the GPU run's first steps, same schedule; no eval
        part = c.cli(f"demo tasks on the {dev}", args, "demo" if dev == "gpu" else "cpu", env)
        runs[dev] = {**part, **_step_time(run_dir / "metrics.jsonl")}
    return runs


def _step_time(metrics: Path) -> dict[str, Any]:
    """ms per step between the first and the last logged step (start-up and warm-up left out), and the last eval."""
    if not metrics.is_file():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r for r in records if "loss" in r]
    out: dict[str, Any] = {"last_loss": logged[-1]["loss"]} if logged else {}
    if len(logged) >= 2:
        first, last = logged[0], logged[-1]
        out["ms_per_step"] = round((last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]) * 1e3, 1)
        out["steps_timed"] = last["step"] - first["step"]
    evals = [r["eval"] for r in records if "eval" in r]
    if evals:
        out["eval"] = evals[-1]
    return out


def _pipeline(c: Check) -> dict[str, Any]:
    """`bench data` on the demo's config: a step fed by DataLoader workers vs the same step on
    batches made beforehand (on a GPU the step is short, so the input pipeline shows most there)."""
    ds = Path(c.sizes.ds_config).resolve()
    args = ["bench", "data", "--config", c.demo_config, *c.sizes.pipeline_args, "--set", f"train.ds_config={ds}"]
    part = c.cli("bench data", args, "pipeline")
    found = re.search(r"^fed by the DataLoader\s+([\d.]+).*\npre-made batches\s+([\d.]+)", c.output, re.M)
    if part["status"] == "ok" and found:
        live, premade = map(float, found.groups())
        part.update(live_ms=live, premade_ms=premade, ratio=round(live / premade, 3))
    return part


PARTS = ("pytest", "moe", "train", "demo", "pipeline")


def run_gpu_check(
    out: str,
    *,
    dry_run: bool | None = None,
    budget_s: float | None = None,
    demo_config: str = "configs/experiments/demo.yaml",
    parts: tuple[str, ...] = PARTS,
) -> dict[str, Any]:
    """Run the parts, write gpu_check.json / .md / .log under `out`, print the markdown; returns the results.

    dry_run: None = a dry run exactly when no CUDA device is visible. budget_s: None = 450 s on a
    GPU (the check and its installation inside 8 minutes), an hour for a dry run. parts: a subset
    of PARTS (a rerun of what failed).
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"unknown gpu-check part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    dry_run = not torch.cuda.is_available() if dry_run is None else dry_run
    budget_s = budget_s or (3600 if dry_run else 450)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = Check(out_dir, dry_run, budget_s, demo_config)
    atomic_write_text(c.log, "")
    r = c.results
    r["env"] = environment()
    data = _start_data_build(c) if {"demo", "pipeline"} & set(parts) else None
    for part, run in (("pytest", _pytest), ("moe", _moe), ("train", _train_bench)):
        if part in parts:
            r[part] = run(c)
    if data is not None:
        r["data"] = _wait_data_build(c, *data)
        if "demo" in parts:
            r["demo"] = _demo(c)
    if "pipeline" in parts:  # last: on a GPU it is what the budget leaves out first
        r["pipeline"] = _pipeline(c)
    r["seconds"] = round(budget_s - (c.deadline - time.monotonic()), 1)
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(r, indent=1))
    md = markdown(r)
    atomic_write_text(out_dir / "gpu_check.md", md)
    print(md)
    return r


def _start_data_build(c: Check) -> tuple[subprocess.Popen, Any]:
    """The demo's data builds on a CPU core while the GPU parts run."""
    log = (c.out / "data_build.log").open("w")
    code = f"from pathways_mm.bench.gpu_check import build_data; build_data({c.demo_config!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_data_build(c: Check, proc: subprocess.Popen, log: Any) -> dict[str, Any]:
    try:
        proc.wait(timeout=max(1, min(c.sizes.timeouts["data"], c.deadline - time.monotonic())))
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timed out"
    log.close()
    with c.log.open("a") as f:
        f.write(f"\n===== data build: {status}\n" + (c.out / "data_build.log").read_text())
    (c.out / "data_build.log").unlink()
    return {"status": status}


def failed_parts(r: dict[str, Any]) -> list[str]:
    """The parts of a check whose status is not ok."""
    parts = {"pytest -m gpu": r.get("pytest"), "data build": r.get("data"), "bench train": r.get("train")}
    parts["bench data"] = r.get("pipeline")
    parts.update({f"bench moe {k}": v for k, v in r.get("moe", {}).items()})
    parts.update({f"demo on the {k}": v for k, v in r.get("demo", {}).items()})
    return [name for name, part in parts.items() if part is not None and part["status"] != "ok"]


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(x) for x in cells) + " |"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def markdown(r: dict[str, Any]) -> str:
    """The check's results as markdown (for docs/benchmarks.md)."""
    env, dry = r["env"], r["mode"] != "gpu"
    card = env.get("card", "no CUDA device")
    gpu = f"{card} ({env['capability']}, {env['memory_gib']} GiB)" if "card" in env else card
    lines = [f"# gpu-check: {card}, {r['date']}, {r['mode']}, {r['seconds']:.0f} s", ""]
    lines += [_row("torch", "CUDA", "card", "DeepSpeed", "Python", "CPUs"), _row(*["---"] * 6)]
    lines += [_row(env["torch"], env["cuda"], gpu, env["deepspeed"], env["python"], env["cpu_count"]), ""]
    if "pytest" in r:
        counts = ", ".join(f"{n} {k}" for k, n in r["pytest"]["counts"].items())
        lines += [f"`pytest -m gpu`: {r['pytest']['status']}, {counts}", ""]
    if "moe" in r:
        lines += [*_moe_table(r["moe"], dry), ""]
    if "train" in r:
        lines += [*_train_table(r["train"], dry), ""]
    if "demo" in r:
        lines += _demo_lines(r["demo"], r["data"], dry)
    if "pipeline" in r:
        lines += ["", *_pipeline_lines(r["pipeline"])]
    return "\n".join(lines) + "\n"


def _pipeline_lines(p: dict[str, Any]) -> list[str]:
    lines = ["## `bench data`: a demo step fed by DataLoader workers vs on pre-made batches", ""]
    if "ratio" not in p:
        return [*lines, p["status"]]
    verdict = "met" if p["ratio"] <= 1.05 else "NOT met"
    return [
        *lines,
        f"{p['live_ms']:.1f} ms vs {p['premade_ms']:.1f} ms: ratio {p['ratio']:.3f} (target <= 1.05: {verdict})",
    ]


def _moe_table(moe: dict[str, Any], dry: bool) -> list[str]:
    lines = ["## `bench moe`: one MoE FFN layer, forward + backward; vs dense = dense ms / row ms", ""]
    lines += [_row("config", "row", "ms", "TFLOP/s", "vs dense", "target"), _row(*["---"] * 6)]
    for config, m in moe.items():
        if m["status"] != "ok":
            lines.append(_row(config, m["status"], "", "", "", ""))
            continue
        dense_ms, want = m["rows"][0]["ms"], None if dry else MOE_TARGETS.get(config)
        for row in m["rows"]:
            ratio = dense_ms / row["ms"]
            target = (
                f">= {want:.2f}: {'met' if ratio >= want else 'NOT met'}" if want and "grouped (" in row["name"] else ""
            )
            tflops = m["flops"] / row["ms"] / 1e9
            lines.append(_row(config, row["name"], f"{row['ms']:.2f}", _num(tflops), f"{ratio:.2f}", target))
        lines += [_row(config, f"skipped: {why}", "", "", "", "") for why in m["skipped"]]
        shape = f"d_model {m['d_model']}, d_ff {m['d_ff']}, {m['num_experts']} experts, top-{m['top_k']}"
        lines.append(
            _row(config, f"({shape}, {m['tokens']} tokens, {m['dtype'].replace('torch.', '')})", "", "", "", "")
        )
    return lines


def _train_table(t: dict[str, Any], dry: bool) -> list[str]:
    lines = ["## `bench train --dense`: full training steps, MFU on active parameters", ""]
    if t["status"] != "ok":
        return [*lines, t["status"]]
    peak = t["peak_tflops"]
    lines += [
        f"config {t['config']}: batch {t['batch']} x {t['seq_len']}, {t['dtype']}, {t['device']}. Peak memory: CUDA "
        "max allocated (on a CPU the process peak RSS); planner: `pathways-mm plan` for the same shape, allocated "
        "bytes only (no CUDA context, no fragmentation, encoders not counted)",
        "",
    ]
    lines += [_row("model", "params", "active", "ms/step", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "planner GiB")]
    lines.append(_row(*["---"] * 9))
    for row in t["rows"]:
        tflops = row["flops"] / row["ms"] / 1e9
        planned = t["planned_gib"].get("dense" if row["name"].startswith("dense") else "moe")
        cells = [row["name"], f"{row['total_params'] / 1e6:.1f}M", f"{row['active_params'] / 1e6:.1f}M"]
        cells += [f"{row['ms']:.1f}", _num(row["tokens"] / row["ms"] * 1e3), _num(tflops)]
        cells += [f"{tflops / peak:.1%}" if peak else "n/a", f"{row['peak_bytes'] / 2**30:.2f}", planned]
        lines.append(_row(*cells))
    if peak and not dry:
        moe = t["rows"][-1]
        mfu = moe["flops"] / moe["ms"] / 1e9 / peak
        lines += ["", f"target: MoE MFU >= {MFU_TARGET:.0%}: {'met' if mfu >= MFU_TARGET else 'NOT met'} ({mfu:.1%})"]
    return lines


def _demo_lines(d: dict[str, Any], data: dict[str, Any], dry: bool) -> list[str]:
    lines = ["## The demo's tasks: a short training run" + ("" if dry else " in bf16 on the GPU"), ""]
    lines += [f"data build: {data['status']}", ""]
    lines += [_row("device", "status", "ms/step", "steps timed", "last loss"), _row(*["---"] * 5)]
    for dev, run in d.items():
        loss = f"{run['last_loss']:.4f}" if "last_loss" in run else ""
        lines.append(_row(dev, run["status"], run.get("ms_per_step", ""), run.get("steps_timed", ""), loss))
    gpu, cpu = d.get("gpu", {}), d["cpu"]
    if gpu.get("ms_per_step") and cpu.get("ms_per_step"):
        ratio = cpu["ms_per_step"] / gpu["ms_per_step"]
        lines += ["", f"the GPU takes a step {ratio:.1f}x faster than this machine's CPU (the same first steps)"]
    evaluated = gpu if "eval" in gpu else cpu
    if "eval" in evaluated:
        lines += ["", "```", format_table(evaluated["eval"]), "```"]
    return lines
