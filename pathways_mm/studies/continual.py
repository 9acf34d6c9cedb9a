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

import dataclasses
import json
from pathlib import Path
from typing import Any

from pathways_mm.config import ContinualConfig, ExperimentConfig
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, output_dir
from pathways_mm.metrics import LOWER_IS_BETTER
from pathways_mm.studies.common import final_eval, only_tasks, primary, run_stage, train_stage


def run_continual(cfg: ExperimentConfig, out: Path, say=print) -> dict[str, Any]:
    c = cfg.continual
    if not c.add:
        raise ConfigError(f"{cfg.source}: continual.add lists no task to add after {list(cfg.tasks)}")
    if not cfg.model.moe.num_experts:
        raise ConfigError("continual: the model needs MoE layers (model.moe.num_experts > 0) for add-task")
    output_dir(out, "--out-dir").mkdir(parents=True, exist_ok=True)
    base = cfg.replace(continual=ContinualConfig())
    train_stage(base, out / "base", say)
    rows, chain = [], out / "base"
    for task in c.add:
        stage = {mode: _add(chain, task, mode, c, out, say) for mode in ("add", "finetune")}
        scratch = only_tasks(base, (task,)).replace(train=dataclasses.replace(cfg.train, steps=c.steps))
        train_stage(scratch, out / "scratch" / task, say)
        stage["scratch"] = final_eval(out / "scratch" / task)[task]
        rows.append(_row(task, stage))
        chain = out / "add" / task
    result = {
        "config": str(cfg.source),
        "first_group": list(cfg.tasks),
        "steps_first": cfg.train.steps,
        "steps_each": c.steps,
        "grow_experts": c.grow_experts,
        "adapter_rank": c.adapter_rank,
        "tasks": rows,
    }
    atomic_write_text(out / "continual.json", json.dumps(result, indent=2))
    atomic_write_text(out / "continual.md", format_markdown(result))
    say(format_markdown(result))
    say(f"continual: wrote {out / 'continual.md'} and {out / 'continual.json'}")
    return result


def _add(chain: Path, task: str, mode: str, c: ContinualConfig, out: Path, say) -> dict[str, Any]:
    """add-task ("add") or whole-model fine-tuning ("finetune") of `task` onto `chain`; its report."""
    run_dir = out / mode / task
    report = run_dir / "add_task_report.json"
    if not report.is_file():
        say(f"continual: {task}: {mode} from {chain.name} ({c.steps} steps)")
        grow = c.grow_experts if mode == "add" else 0
        flags = ["--grow-experts", str(grow), "--steps", str(c.steps), "--adapter-rank", str(c.adapter_rank)]
        flags += ["--out-dir", str(run_dir)] + (["--train-all"] if mode == "finetune" else [])
        run_stage(["add-task", "--from", str(chain), "--task", task, *flags], out / f"{mode}-{task}.log")
    return json.loads(report.read_text())


def _row(task: str, stage: dict[str, Any]) -> dict[str, Any]:
    m = primary(task)
    add, ft = stage["add"], stage["finetune"]
    forgetting = {}
    for old, metrics in add["old_tasks"].items():
        om = primary(old)
        forgetting[old] = {
            "metric": om,
            "before": metrics[om]["before"],
            "add_task": metrics[om]["change"],
            "finetune": ft["old_tasks"][old][om]["change"],
        }
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
        lines.append(
            f"| {r['task']} | {r['metric']} | **{r['add_task']:.3f}** | {r['finetune']:.3f} | {r['scratch']:.3f} | "
            f"{chance} | {r['reuse_share']:.1%} | {r['params_added']:,} ({r['params_added_pct']:.1f}%) | "
            f"{r['closest_task']} |"
        )
    lines += [
        "",
        "Change of each old task's metric when the task above was added (after - before):",
        "",
        "| added task | old task | metric | before | add-task | fine-tune all |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["tasks"]:
        for old, f in r["forgetting"].items():
            lines.append(
                f"| {r['task']} | {old} | {f['metric']} | {f['before']:.3f} | {f['add_task']:+.3f} | {f['finetune']:+.3f} |"
            )
    lines.append("")
    lines.append("Lower is better for " + ", ".join(LOWER_IS_BETTER) + "; higher for exact_match.")
    return "\n".join(lines) + "\n"
