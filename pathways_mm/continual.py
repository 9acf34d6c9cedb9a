"""The continual benchmark: train a first group of tasks, then add the others one at a time.

    pathways-mm continual configs/experiments/continual.yaml [--out-dir DIR]

Each added task is learned three ways, from the same model and for the same steps:
(a) `add-task` (frozen old pathways, optional new experts), (b) fine-tuning the whole model on
the new task (`add-task --train-all`), (c) training the new task alone from scratch. The chain
goes on from (a). Every stage is a separate process writing its own run directory; a stage whose
result exists is not redone, so an interrupted benchmark continues where it stopped. The table
(printed, continual.md and continual.json in the output folder) gives per added task: the change
of every old task under (a) and (b), the new task's quality under (a), (b), (c), the share of
its routes on reused experts and the parameters added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pathways_mm.checkpoint import atomic_write_text
from pathways_mm.config import ExperimentConfig, load_config, resolve_relative, to_dict
from pathways_mm.errors import ConfigError, TrainingAborted
from pathways_mm.tasks import get_task

LOWER_IS_BETTER = ("bits_per_byte", "char_error_rate", "loss")


def _cli(args: list[str], log: Path) -> None:
    """One stage in its own process (its own DeepSpeed engine and process group), logged to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    with log.open("w") as f:
        res = subprocess.run([sys.executable, "-m", "pathways_mm.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise TrainingAborted(f"stage `pathways-mm {' '.join(args[:3])} ...` failed (exit {res.returncode}): {tail[0]}; see {log}")


def _final_eval(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if '"eval"' in l][-1]["eval"]


def primary(task: str) -> str:
    return get_task(task).metrics[0]


def run_continual(cfg: ExperimentConfig, out: Path, say=print) -> dict[str, Any]:
    c = cfg.continual
    if not c.add:
        raise ConfigError(f"{cfg.source}: continual.add lists no task to add after {list(cfg.tasks)}")
    if not cfg.model.moe.num_experts:
        raise ConfigError("continual: the model needs MoE layers (model.moe.num_experts > 0) for add-task")
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "metrics.jsonl").is_file() or '"eval"' not in (base / "metrics.jsonl").read_text():
        say(f"continual: training the first group {list(cfg.tasks)} ({cfg.train.steps} steps) -> {base}")
        path = _stage_config(cfg, cfg.tasks, cfg.train.steps, base, out / "base.yaml")
        _cli(["train", str(path)], out / "base.log")
    rows, chain = [], base
    for task in c.add:
        stage = {}
        for mode, flags, grow in (("add", [], c.grow_experts), ("finetune", ["--train-all"], 0)):
            run_dir = out / mode / task
            report = run_dir / "add_task_report.json"
            if not report.is_file():
                say(f"continual: {task}: {mode} from {chain.name} ({c.steps} steps)")
                _cli(["add-task", "--from", str(chain), "--task", task, "--grow-experts", str(grow), "--steps", str(c.steps),
                      "--adapter-rank", str(c.adapter_rank), "--out-dir", str(run_dir), *flags], out / f"{mode}-{task}.log")  # fmt: skip
            stage[mode] = json.loads(report.read_text())
        scratch = out / "scratch" / task
        if not (scratch / "metrics.jsonl").is_file() or '"eval"' not in (scratch / "metrics.jsonl").read_text():
            say(f"continual: {task}: from scratch ({c.steps} steps)")
            path = _stage_config(cfg, (task,), c.steps, scratch, out / f"scratch-{task}.yaml")
            _cli(["train", str(path)], out / f"scratch-{task}.log")
        stage["scratch"] = _final_eval(scratch)[task]
        rows.append(_row(task, stage))
        chain = out / "add" / task
    result = {"config": str(cfg.source), "first_group": list(cfg.tasks), "steps_first": cfg.train.steps, "steps_each": c.steps,
              "grow_experts": c.grow_experts, "adapter_rank": c.adapter_rank, "tasks": rows}  # fmt: skip
    atomic_write_text(out / "continual.json", json.dumps(result, indent=2))
    atomic_write_text(out / "continual.md", format_markdown(result))
    say(format_markdown(result))
    say(f"continual: wrote {out / 'continual.md'} and {out / 'continual.json'}")
    return result


def _stage_config(cfg: ExperimentConfig, tasks: tuple[str, ...], steps: int, run_dir: Path, path: Path) -> Path:
    """The experiment (with the command line's --set applied) for one training stage, as a YAML file."""
    data = to_dict(cfg)
    data.pop("source", None)
    weights = {t: w for t, w in cfg.mixture.weights.items() if t in tasks}
    data.update(tasks=list(tasks), continual={}, mixture={**data["mixture"], "weights": weights})
    data["train"].update(steps=steps, out_dir=str(run_dir), ds_config=str(resolve_relative(cfg, cfg.train.ds_config)))
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def _row(task: str, stage: dict[str, Any]) -> dict[str, Any]:
    m = primary(task)
    add, ft = stage["add"], stage["finetune"]
    forgetting = {}
    for old, metrics in add["old_tasks"].items():
        om = primary(old)
        forgetting[old] = {"metric": om, "before": metrics[om]["before"], "add_task": metrics[om]["change"],
                           "finetune": ft["old_tasks"][old][om]["change"]}  # fmt: skip
    return {
        "task": task,
        "metric": m,
        "chance": add["new_task"]["chance"].get(m),
        "add_task": add["new_task"][m],
        "finetune": ft["new_task"][m],
        "scratch": stage["scratch"][m],
        "forgetting": forgetting,
        "old_outputs_bit_identical": add["old_outputs_bit_identical"],
        "reuse_share": add["reuse"]["share_on_old_experts"],
        "params_added": add["params_added"],
        "params_added_pct": add["params_added_pct"],
        "closest_task": add["closest_task"],
    }


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"First group {', '.join(result['first_group'])} ({result['steps_first']} steps); each added task "
        f"{result['steps_each']} steps per method; add-task grows {result['grow_experts']} experts per MoE layer "
        f"and gives each new task adapters of rank {result.get('adapter_rank', 0)}.",
        "",
        "| added task | metric | add-task | fine-tune all | scratch | chance | reuse share | params added | started from |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["tasks"]:
        chance = "-" if r["chance"] is None else f"{r['chance']:.3f}"
        lines.append(f"| {r['task']} | {r['metric']} | **{r['add_task']:.3f}** | {r['finetune']:.3f} | {r['scratch']:.3f} | "
                     f"{chance} | {r['reuse_share']:.1%} | {r['params_added']:,} ({r['params_added_pct']:.1f}%) | "
                     f"{r['closest_task']} |")  # fmt: skip
    lines += ["", "Change of each old task's metric when the task above was added (after - before):", "",
              "| added task | old task | metric | before | add-task | fine-tune all |", "|---|---|---|---:|---:|---:|"]
    for r in result["tasks"]:
        for old, f in r["forgetting"].items():
            lines.append(f"| {r['task']} | {old} | {f['metric']} | {f['before']:.3f} | {f['add_task']:+.3f} | {f['finetune']:+.3f} |")
    lines.append("")
    lines.append("Lower is better for " + ", ".join(LOWER_IS_BETTER) + "; higher for exact_match.")
    return "\n".join(lines) + "\n"


def main_cli(config: str, overrides: list[str], out_dir: str | None) -> None:
    cfg = load_config(config, overrides)
    out = Path(out_dir) if out_dir else Path("runs") / f"continual-{cfg.name}"
    run_continual(cfg, out, say=lambda s: print(s, file=sys.stderr))
