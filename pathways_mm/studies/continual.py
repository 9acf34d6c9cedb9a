"""The continual benchmark: train a first group of tasks, then add the others one at a time.

    pathways-mm continual configs/experiments/continual.yaml [--seeds N] [--out-dir DIR]

Each added task is learned three ways, from the same model and for the same steps:
(a) `add-task` (frozen old pathways, optional new experts, the new task's adapters, trained at
continual.add_lr), (b) fine-tuning the whole model on the new task (`add-task --train-all`, at
train.lr), (c) training the new task alone from scratch. The chain goes on from (a). Each seed
is its own chain under DIR/seedS. Every stage is a separate process writing its own run
directory; a stage whose result exists is not redone and a killed one resumes, so an
interrupted benchmark continues where it stopped. The table (printed, continual.md and
continual.json in the output folder) gives per added task, as mean and spread over seeds: the
change of every old task under (a) and (b), the new task's quality under (a), (b), (c), the
share of its routes on reused experts and the parameters added.
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
from pathways_mm.studies.common import final_eval, only_tasks, primary, run_stage, spread, train_stage

ROWS = "rows.json"  # a seed's finished rows, in its folder


def run_continual(
    cfg: ExperimentConfig, out: Path, seeds: int = 3, only_seed: int | None = None, say=print
) -> dict[str, Any] | None:
    """Every seed's chain (`out/seedS/...`), then the table of means and spreads over seeds.

    only_seed: run that seed's chain alone (one process or machine per seed); the table is
    written once every seed's chain is done. Returns None while some are not."""
    c = cfg.continual
    if not c.add:
        raise ConfigError(f"{cfg.source}: continual.add lists no task to add after {list(cfg.tasks)}")
    if not cfg.model.moe.num_experts:
        raise ConfigError("continual: the model needs MoE layers (model.moe.num_experts > 0) for add-task")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if only_seed is not None and not 0 <= only_seed < seeds:
        raise ConfigError(f"--only-seed {only_seed}: the seeds are 0 to {seeds - 1}")
    output_dir(out, "--out-dir").mkdir(parents=True, exist_ok=True)
    if only_seed is not None:
        _chain(cfg.replace(seed=only_seed), out / f"seed{only_seed}", say)
        missing = [s for s in range(seeds) if not (out / f"seed{s}" / ROWS).is_file()]
        if missing:
            say(f"continual: seed {only_seed} done; the table waits for seeds {missing}")
            return None
    per_seed = []
    for seed in range(seeds):
        done = out / f"seed{seed}" / ROWS  # a finished seed's rows, not its chain walked again
        if done.is_file():
            per_seed.append(json.loads(done.read_text()))
            continue
        say(f"continual: seed {seed + 1} of {seeds}")
        per_seed.append(_chain(cfg.replace(seed=seed), out / f"seed{seed}", say))
    result = {
        "config": str(cfg.source),
        "first_group": list(cfg.tasks),
        "steps_first": cfg.train.steps,
        "steps_each": c.steps,
        "grow_experts": c.grow_experts,
        "adapter_rank": c.adapter_rank,
        "add_lr": c.add_lr or cfg.train.lr,
        "seeds": seeds,
        "tasks": [summarize([rows[i] for rows in per_seed]) for i in range(len(c.add))],
        "per_seed": per_seed,
    }
    atomic_write_text(out / "continual.json", json.dumps(result, indent=2))
    atomic_write_text(out / "continual.md", format_markdown(result))
    say(format_markdown(result))
    say(f"continual: wrote {out / 'continual.md'} and {out / 'continual.json'}")
    return result


def _chain(cfg: ExperimentConfig, out: Path, say) -> list[dict[str, Any]]:
    """One seed: the first group, then each added task three ways; the chain goes on from add-task."""
    c = cfg.continual
    base = cfg.replace(continual=ContinualConfig())
    train_stage(base, out / "base", say)
    rows, chain = [], out / "base"
    for task in c.add:
        stage = {mode: _add(chain, task, mode, cfg, out, say) for mode in ("add", "finetune")}
        scratch = only_tasks(base, (task,)).replace(train=dataclasses.replace(cfg.train, steps=c.steps))
        train_stage(scratch, out / "scratch" / task, say)
        stage["scratch"] = final_eval(out / "scratch" / task)[task]
        rows.append(_row(task, stage))
        chain = out / "add" / task
    atomic_write_text(out / ROWS, json.dumps(rows, indent=2))  # this seed is done
    return rows


def _add(chain: Path, task: str, mode: str, cfg: ExperimentConfig, out: Path, say) -> dict[str, Any]:
    """add-task ("add") or whole-model fine-tuning ("finetune") of `task` onto `chain`; its report.
    Fine-tuning trains at train.lr; add-task's new parts at continual.add_lr. A stage killed
    midway continues from its last checkpoint."""
    c = cfg.continual
    run_dir = out / mode / task
    report = run_dir / "add_task_report.json"
    if not report.is_file():
        say(f"continual: {task}: {mode} from {chain.name} ({c.steps} steps)")
        grow = c.grow_experts if mode == "add" else 0
        lr = (c.add_lr or cfg.train.lr) if mode == "add" else cfg.train.lr
        flags = ["--grow-experts", str(grow), "--steps", str(c.steps), "--adapter-rank", str(c.adapter_rank)]
        flags += ["--out-dir", str(run_dir), "--resume"] + (["--train-all"] if mode == "finetune" else [])
        flags += ["--set", f"train.lr={lr}", "--set", f"train.save_every={_every(c.steps)}"]  # the seed: the chain's
        run_stage(["add-task", "--from", str(chain), "--task", task, *flags], out / f"{mode}-{task}.log")
    return json.loads(report.read_text())


def _every(steps: int) -> int:
    """Checkpoints a killed stage continues from: about four per stage."""
    return max(1, steps // 4)


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


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One added task's rows (one per seed) as means and spreads; `vs_finetune` is add-task's mean
    over fine-tuning's (inverted for a lower-is-better metric: above 1 is better either way)."""
    first = rows[0]
    stats = {k: spread([r[k] for r in rows]) for k in ("add_task", "finetune", "scratch", "reuse_share")}
    add, ft = stats["add_task"]["mean"], stats["finetune"]["mean"]
    lower = first["metric"] in LOWER_IS_BETTER
    ratio = (ft / add if add else float("inf")) if lower else (add / ft if ft else float("inf"))
    forgetting = {
        old: {
            "metric": f["metric"],
            "before": spread([r["forgetting"][old]["before"] for r in rows]),
            "add_task": spread([r["forgetting"][old]["add_task"] for r in rows]),
            "finetune": spread([r["forgetting"][old]["finetune"] for r in rows]),
        }
        for old, f in first["forgetting"].items()
    }
    return {
        "task": first["task"],
        "metric": first["metric"],
        "chance": first["chance"],
        **stats,
        "vs_finetune": ratio,
        "forgetting": forgetting,
        "largest_add_task_change": max(
            (abs(f["add_task"]) for r in rows for f in r["forgetting"].values()), default=0.0
        ),
        "old_outputs_bit_identical": all(r["old_outputs_bit_identical"] for r in rows),
        "params_added": max(r["params_added"] for r in rows),
        "params_added_pct": max(r["params_added_pct"] for r in rows),
        "closest_task": sorted({r["closest_task"] for r in rows}),
    }


def _ms(s: dict[str, float], bold: bool = False) -> str:
    """`mean ± sd` over seeds (just the mean for one seed)."""
    mean = f"**{s['mean']:.3f}**" if bold else f"{s['mean']:.3f}"
    return mean if s["n"] == 1 else f"{mean} ± {s['sd']:.3f}"


def format_markdown(result: dict[str, Any]) -> str:
    lr = result.get("add_lr")
    lines = [
        f"First group {', '.join(result['first_group'])} ({result['steps_first']} steps); each added task "
        f"{result['steps_each']} steps per method; add-task grows {result['grow_experts']} experts per MoE layer, "
        f"gives each new task adapters of rank {result.get('adapter_rank', 0)}"
        + (f" and trains them at lr {lr:g}" if lr else "")
        + f". Mean ± standard deviation over {result.get('seeds', 1)} seed(s).",
        "",
        "| added task | metric | add-task | fine-tune all | scratch | add-task / fine-tune | chance | reuse share "
        "| params added | started from |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["tasks"]:
        chance = "-" if r["chance"] is None else f"{r['chance']:.3f}"
        lines.append(
            f"| {r['task']} | {r['metric']} | {_ms(r['add_task'], bold=True)} | {_ms(r['finetune'])} | "
            f"{_ms(r['scratch'])} | {r['vs_finetune']:.2f}x | {chance} | {r['reuse_share']['mean']:.1%} | "
            f"{r['params_added']:,} ({r['params_added_pct']:.2f}%) | {', '.join(r['closest_task'])} |"
        )
    lines += [
        "",
        "Change of each old task's metric when the task above was added (after - before, mean over seeds):",
        "",
        "| added task | old task | metric | before | add-task | fine-tune all |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["tasks"]:
        for old, f in r["forgetting"].items():
            lines.append(
                f"| {r['task']} | {old} | {f['metric']} | {f['before']['mean']:.3f} | {f['add_task']['mean']:+.3f} | "
                f"{f['finetune']['mean']:+.3f} |"
            )
    largest = max((r["largest_add_task_change"] for r in result["tasks"]), default=0.0)
    same = all(r["old_outputs_bit_identical"] for r in result["tasks"])
    lines.append("")
    lines.append(
        f"Largest change of any old task under add-task, any seed: {largest:.3f}; old outputs bit-identical "
        f"after every addition: {'yes' if same else 'NO'}."
    )
    lines.append("Lower is better for " + ", ".join(LOWER_IS_BETTER) + "; higher for exact_match.")
    return "\n".join(lines) + "\n"
