"""The ablation: what multi-task training, sparsity and task-specific pathways each buy.

    pathways-mm ablate CONFIG --seeds N [--out-dir DIR] [--variant NAME ...] [--lr LR ...] [--set key=value ...]

At equal active parameters and equal samples per task, on CONFIG's tasks and schedule:

  single_dense      one dense model per task (`pathways-mm baseline`: the task's share of the steps)
  multi_dense       one dense model on every task
  dense_total       one dense model at equal TOTAL parameters (every FFN as wide as an MoE layer's
                    experts and shared expert, averaged over blocks): the ceiling, not a fair rival
  sparse_tokens     MoE, plain token routing: no task prior, load balance over all tokens
  sparse_pathways   MoE, the original pathways: a learned prior per task, balance per task
  sparse_specific   MoE, task-specific pathways: CONFIG's own routing (global balance, the
                    mutual-information loss, pathway masks)
  sparse_specific_example_norm
                    the same with every sample's loss weighted alike (`train.loss_norm: example`):
                    what CONFIG's own loss normalisation buys (run it when CONFIG uses another)
  flagship          the candidate for demo.yaml: a shared expert one expert wide, experts twice as
                    many and half as wide (the same pool), top_k so active parameters stay equal,
                    mi_coef 0.005 (Mod-Squad's), masks only after training (as pruneafter)
  shared            CONFIG's routing plus a shared expert one expert wide, top_k lowered to match
  fine16, fine32    CONFIG's routing over 16 / 32 experts of the same pool, top_k scaled
  mi005             CONFIG's routing with mi_coef 0.005
  nomask            CONFIG's routing without pathway masks while training
  pruneafter        CONFIG's routing with the masks chosen at the last training forward from the
                    routes of the last mask_window forwards (Mod-Squad prunes after training): no
                    task trains inside its mask, and its export keeps only its experts
  loadcap           CONFIG's routing with masks chosen with the load in view (mask_load_cap 1.5:
                    no expert gets more than 1.5x its fair share of the tallied routes)

Each (variant, seed) is its own run directory under DIR (default runs/ablate-NAME); a rerun
continues where it stopped. The table (printed, ablation.md and ablation.json in DIR) gives each
task's metric per variant as mean and spread over seeds, each variant's per-seed paired
difference against multi_dense, I(task; expert) per MoE layer as a share of its maximum, the
experts each task's export keeps, and training time. `--lr` (repeatable) is a learning-rate
screen: every variant at each rate, as its own column `VARIANT@lr=X` (run it with one seed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig, check_range
from pathways_mm.data.taskset import load_tasks, make_sampler
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text
from pathways_mm.metrics import LOWER_IS_BETTER
from pathways_mm.routes_file import load as load_routes
from pathways_mm.studies.baseline import baseline_config, dense_counterpart
from pathways_mm.studies.common import final_eval, primary, records, run_stage, spread, train_stage, trained
from pathways_mm.viz import views

VARIANTS = (
    "single_dense",
    "multi_dense",
    "dense_total",
    "sparse_tokens",
    "sparse_pathways",
    "sparse_specific",
    "flagship",
)
DENSE = ("single_dense", "multi_dense", "dense_total")
# Run only when asked for with --variant: the mechanisms the flagship combines, one at a time.
EXTRA = ("sparse_specific_example_norm", "shared", "fine16", "fine32", "mi005", "nomask", "pruneafter", "loadcap")
SPARSE = tuple(v for v in (*VARIANTS, *EXTRA) if v not in DENSE)
BASELINE = "multi_dense"  # the paired differences are taken against it
MOD_SQUAD_MI = 0.005
LOAD_CAP = 1.5  # loadcap: no expert above 1.5x its fair share of the routes the masks are chosen from


def equal_active(moe: MoEConfig, d_ff: int, *, num_experts: int, shared_d_ff: int = 0) -> MoEConfig:
    """`moe` over `num_experts` experts with the same pool of routed parameters (num_experts x
    expert_d_ff unchanged) and a shared expert of `shared_d_ff`, top_k chosen so that a token
    touches as many FFN parameters as before (d_ff: the model's, for expert_d_ff null)."""
    width = moe.expert_d_ff or d_ff
    active, pool = moe.top_k * width + moe.shared_d_ff, moe.num_experts * width
    if pool % num_experts:
        raise ConfigError(f"{num_experts} experts cannot split a pool of {pool} hidden units evenly")
    new_width = pool // num_experts
    top_k, rest = divmod(active - shared_d_ff, new_width)
    if rest or not 1 <= top_k <= num_experts:
        raise ConfigError(
            f"no top_k of {num_experts} experts of width {new_width} plus a shared expert of {shared_d_ff} "
            f"matches {active} active hidden units"
        )
    mask_max = None if moe.mask_max_experts is None else moe.mask_max_experts * num_experts // moe.num_experts
    return dataclasses.replace(
        moe,
        num_experts=num_experts,
        expert_d_ff=new_width,
        top_k=top_k,
        shared_d_ff=shared_d_ff,
        mask_max_experts=mask_max,
        expert_groups={},
    )


def dense_total(m: ModelConfig) -> ModelConfig:
    """The dense model with as many FFN parameters as `m` in all: every block's FFN as wide as the
    blocks' mean total width (an MoE block: all its experts plus the shared expert)."""
    e = m.moe
    num_moe = m.n_layers // e.moe_every
    moe_width = e.num_experts * (e.expert_d_ff or m.d_ff) + e.shared_d_ff
    width = round(((m.n_layers - num_moe) * m.d_ff + num_moe * moe_width) / m.n_layers)
    return dataclasses.replace(m, d_ff=width, moe=dataclasses.replace(e, num_experts=0, shared_d_ff=0))


def prune_after(moe: MoEConfig, cfg: ExperimentConfig) -> MoEConfig:
    """`moe` with its pathway masks set at the last training forward (mask_mass 0.95 if it had none)."""
    forwards = cfg.train.steps * cfg.train.grad_accum
    return dataclasses.replace(
        moe, mask_mass=moe.mask_mass or 0.95, mask_step=forwards, mask_window=min(moe.mask_window, forwards)
    )


def _sparse_moe(cfg: ExperimentConfig, variant: str) -> MoEConfig:
    moe, d_ff = cfg.model.moe, cfg.model.d_ff
    width = moe.expert_d_ff or d_ff
    base = dict(mi_coef=0.0, mask_mass=0.0)
    if variant == "sparse_tokens":
        return dataclasses.replace(moe, **base, balance="global", task_prior=False)
    if variant == "sparse_pathways":
        return dataclasses.replace(moe, **base, balance="per_task", task_prior=True)
    if variant == "flagship":
        grown = equal_active(moe, d_ff, num_experts=2 * moe.num_experts, shared_d_ff=width)
        return prune_after(dataclasses.replace(grown, mi_coef=MOD_SQUAD_MI), cfg)
    if variant == "shared":
        return equal_active(moe, d_ff, num_experts=moe.num_experts, shared_d_ff=width)
    if variant in ("fine16", "fine32"):
        return equal_active(moe, d_ff, num_experts=int(variant[4:]))
    if variant == "mi005":
        return dataclasses.replace(moe, mi_coef=MOD_SQUAD_MI)
    if variant == "nomask":
        return dataclasses.replace(moe, mask_mass=0.0)
    if variant == "pruneafter":
        return prune_after(moe, cfg)
    if variant == "loadcap":
        return dataclasses.replace(moe, mask_load_cap=LOAD_CAP)
    return moe  # sparse_specific (and its example-norm twin): CONFIG's own routing


def variant_config(cfg: ExperimentConfig, variant: str, seed: int, lr: float | None = None) -> ExperimentConfig:
    """CONFIG as one variant of the ablation (multi-task variants; single_dense: see `baseline_config`);
    `lr`: the learning-rate screen's rate (None: CONFIG's)."""
    cfg = cfg.replace(name=f"{cfg.name}-{variant}-s{seed}", seed=seed)
    if lr is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, lr=lr))
    no_routes = dataclasses.replace(cfg.eval, routes=False)
    if variant == "multi_dense":
        return cfg.replace(model=dense_counterpart(cfg.model), eval=no_routes)
    if variant == "dense_total":
        return cfg.replace(model=dense_total(cfg.model), eval=no_routes)
    if variant == "sparse_specific_example_norm":
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss_norm="example"))
    model = dataclasses.replace(cfg.model, moe=_sparse_moe(cfg, variant))
    return cfg.replace(model=model, eval=dataclasses.replace(cfg.eval, routes=True))


def _check(cfg: ExperimentConfig, seeds: int, variants: tuple[str, ...]) -> None:
    if not cfg.model.moe.num_experts:
        raise ConfigError(f"{cfg.source}: the ablation compares sparse variants; set model.moe.num_experts > 0")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    unknown = [v for v in variants if v not in VARIANTS + EXTRA]
    if unknown:
        raise ConfigError(f"--variant {unknown[0]}: not one of {', '.join(VARIANTS + EXTRA)}")
    dense_counterpart(cfg.model)  # raises if no dense width matches the active parameters
    for v in variants:
        try:
            if v not in DENSE:
                _sparse_moe(cfg, v)  # raises if the variant has no equal-active setting for this model
        except ConfigError as e:
            raise ConfigError(f"--variant {v}: {e}; leave this variant out") from None


def arm_name(variant: str, lr: float | None) -> str:
    """A column of the table: the variant, and in a learning-rate screen its rate."""
    return variant if lr is None else f"{variant}@lr={lr:g}"


def run_ablation(
    cfg: ExperimentConfig,
    seeds: int,
    out: Path,
    variants: tuple[str, ...] = VARIANTS,
    say=print,
    lrs: tuple[float, ...] = (),
):
    """Train, evaluate and export every (variant, seed) not done yet; write and return the table.
    lrs: a learning-rate screen, every variant at each of these rates (empty: CONFIG's rate)."""
    variants = variants or VARIANTS
    _check(cfg, seeds, variants)
    for lr in lrs:
        check_range("train.lr", lr, "--lr")
    out.mkdir(parents=True, exist_ok=True)
    ts = load_tasks(cfg)
    shares = {t.name: float(p) for t, p in zip(ts.tasks, make_sampler(cfg, ts).probs)}
    arms = [(v, lr) for v in variants for lr in (lrs or (None,))]
    runs: dict[str, list[dict[str, Any]]] = {arm_name(v, lr): [] for v, lr in arms}
    for seed in range(seeds):
        for variant, lr in arms:
            name = arm_name(variant, lr)
            run_dir = out / name / f"seed{seed}"
            say(f"ablate: {name}, seed {seed}")
            if variant == "single_dense":
                scfg = cfg if lr is None else cfg.replace(train=dataclasses.replace(cfg.train, lr=lr))
                runs[name].append(_single_dense(scfg, seed, shares, run_dir, say))
            else:
                runs[name].append(_multi(cfg, variant, seed, run_dir, say, lr))
    result = summarize(cfg, seeds, runs)
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=2))
    atomic_write_text(out / "ablation.md", format_markdown(result))
    say(format_markdown(result))
    say(f"ablate: wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return result


def _timed_train(cfg: ExperimentConfig, run_dir: Path, say) -> float:
    """Train (unless done) and return the training time the run logged (seconds, last log step)."""
    started = time.time()
    done_before = trained(run_dir)
    train_stage(cfg, run_dir, say)
    logged = [r["elapsed_s"] for r in records(run_dir) if "elapsed_s" in r]
    return logged[-1] if logged else (0.0 if done_before else time.time() - started)


def _single_dense(cfg: ExperimentConfig, seed: int, shares: dict[str, float], run_dir: Path, say) -> dict[str, Any]:
    metrics, seconds = {}, 0.0
    for task in cfg.tasks:
        bcfg = baseline_config(cfg.replace(seed=seed), task, shares[task], run_dir)
        bcfg = bcfg.replace(eval=dataclasses.replace(bcfg.eval, routes=False))
        seconds += _timed_train(bcfg, run_dir / task, say)
        metrics[task] = final_eval(run_dir / task)[task]
    return {"metrics": metrics, "train_s": seconds}


def _multi(cfg: ExperimentConfig, variant: str, seed: int, run_dir: Path, say, lr: float | None) -> dict[str, Any]:
    vcfg = variant_config(cfg, variant, seed, lr)
    seconds = _timed_train(vcfg, run_dir, say)
    result = {"metrics": final_eval(run_dir), "train_s": seconds}
    if variant in SPARSE:
        routes = sorted((run_dir / "routes").glob("step_*.json"))[-1]
        result["routes"] = route_summary(load_routes(routes))
        result["export"] = {t: _export(run_dir, t, vcfg, say) for t in cfg.tasks}
    return result


def _export(run_dir: Path, task: str, cfg: ExperimentConfig, say) -> dict[str, Any]:
    """`pathways-mm export` of one task (unless done): experts kept per layer, parameters, parity."""
    out = run_dir.parent / f"{run_dir.name}-export" / task
    info = out / "export.json"
    if not info.is_file():
        say(f"ablate: export {task} from {run_dir}")
        samples = str(cfg.eval.max_samples)
        run_stage(["export", "--from", str(run_dir), "--task", task, "--out", str(out), "--max-samples", samples],
                  out.with_name(f"{task}.log"))  # fmt: skip
    e = json.loads(info.read_text())
    per_layer = [len(ids) for ids in e["kept_experts"].values()]
    return {"experts_kept": per_layer, "params_export": e["params_export"], "params_full": e["params_full"]}


def route_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Per MoE layer: I(task; expert) and its maximum (bits), the least-used expert's load / fair share."""
    layers = []
    for layer in doc["layers"]:
        joint_TE = views.task_expert_joint(layer)
        layers.append({
            "block": layer["block"],
            "num_experts": layer["num_experts"],
            "mi_task": views.mutual_information(joint_TE),
            "mi_task_max": views.mutual_information_max(joint_TE),
            "min_expert_load": float(views.expert_load(joint_TE).min()),
        })  # fmt: skip
    return {"layers": layers}


def summarize(cfg: ExperimentConfig, seeds: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and spread over seeds of every number the table shows."""
    table: dict[str, Any] = {}
    for variant, per_seed in runs.items():
        row: dict[str, Any] = {"train_s": spread([r["train_s"] for r in per_seed]), "tasks": {}}
        for task in cfg.tasks:
            m = primary(task)
            row["tasks"][task] = {m: spread([r["metrics"][task][m] for r in per_seed])}
        if "routes" in per_seed[0]:
            n_layers = len(per_seed[0]["routes"]["layers"])
            mi = [[r["routes"]["layers"][i]["mi_task"] / max(r["routes"]["layers"][i]["mi_task_max"], 1e-12)
                   for r in per_seed] for i in range(n_layers)]  # fmt: skip
            row["mi_share"] = [spread(v) for v in mi]
            row["min_expert_load"] = [spread([r["routes"]["layers"][i]["min_expert_load"] for r in per_seed])
                                      for i in range(n_layers)]  # fmt: skip
            row["experts_kept"] = {t: [spread([r["export"][t]["experts_kept"][i] for r in per_seed])
                                       for i in range(n_layers)] for t in cfg.tasks}  # fmt: skip
            row["experts"] = per_seed[0]["routes"]["layers"][0].get("num_experts", cfg.model.moe.num_experts)
        table[variant] = row
    for arm, per_seed in runs.items():
        variant, at = arm.partition("@")[::2]
        baseline = runs.get(arm_name(BASELINE, None) + (f"@{at}" if at else ""))  # the same rate in a screen
        if baseline and variant != BASELINE:
            table[arm]["paired"] = paired_differences(cfg.tasks, per_seed, baseline)
    moe: MoEConfig = cfg.model.moe
    return {"config": str(cfg.source), "name": cfg.name, "seeds": seeds, "steps": cfg.train.steps,
            "experts": moe.num_experts, "top_k": moe.top_k, "tasks": list(cfg.tasks), "variants": table}  # fmt: skip


def paired_differences(
    tasks: tuple[str, ...], runs: list[dict[str, Any]], baseline: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per task, this variant's metric minus the baseline's at the same seed (the same batches):
    the per-seed differences and their spread, signed so that > 0 is better."""
    out = {}
    for task in tasks:
        m = primary(task)
        sign = -1.0 if m in LOWER_IS_BETTER else 1.0
        # + 0.0: a tie reads 0.000, not -0.000
        diffs = [sign * (r["metrics"][task][m] - b["metrics"][task][m]) + 0.0 for r, b in zip(runs, baseline)]
        out[task] = {"per_seed": [round(d, 4) for d in diffs], **spread(diffs)}
    return out


def _cell(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def format_markdown(result: dict[str, Any]) -> str:
    variants = list(result["variants"])
    head = f"| task | metric | {' | '.join(variants)} |"
    lines = [f"{result['seeds']} seeds, {result['steps']} steps each; mean ± standard deviation over seeds.", "",
             head, "|---|---|" + "---:|" * len(variants)]  # fmt: skip
    for task in result["tasks"]:
        m = primary(task)
        cells = [_cell(result["variants"][v]["tasks"][task][m]) for v in variants]
        lines.append(f"| {task} | {m}{' (lower is better)' if m in LOWER_IS_BETTER else ''} | {' | '.join(cells)} |")
    lines.append(f"| training time | s | {' | '.join(_cell(result['variants'][v]['train_s'], 0) for v in variants)} |")
    paired = [v for v in variants if "paired" in result["variants"][v]]
    if paired:
        lines += ["", f"Paired differences against {BASELINE} at the same seed (> 0: better than {BASELINE}; "
                  "mean ± sd over seeds, then each seed's difference).", "",
                  f"| task | {' | '.join(paired)} |", "|---|" + "---:|" * len(paired)]  # fmt: skip
        for task in result["tasks"]:
            cells = [result["variants"][v]["paired"][task] for v in paired]
            text = [f"{_cell(c)} ({', '.join(f'{d:+.3f}' for d in c['per_seed'])})" for c in cells]
            lines.append(f"| {task} | {' | '.join(text)} |")
    sparse = [v for v in variants if "mi_share" in result["variants"][v]]
    if sparse:
        lines += ["", "Routing (test split): I(task; expert) as a share of its maximum per MoE layer, the least-used "
                  "expert's load / fair share, and the experts each task's export keeps per layer.", "",
                  f"| | {' | '.join(sparse)} |", "|---|" + "---:|" * len(sparse)]  # fmt: skip
        n_layers = len(result["variants"][sparse[0]]["mi_share"])
        for i in range(n_layers):
            lines.append(f"| I(task; expert) / max, MoE layer {i + 1} | "
                         f"{' | '.join(_cell(result['variants'][v]['mi_share'][i], 2) for v in sparse)} |")  # fmt: skip
            lines.append(f"| min expert load, MoE layer {i + 1} | "
                         f"{' | '.join(_cell(result['variants'][v]['min_expert_load'][i], 2) for v in sparse)} |")  # fmt: skip
        for task in result["tasks"]:
            cells = [
                " / ".join(f"{s['mean']:.1f}" for s in result["variants"][v]["experts_kept"][task])
                + f" of {result['variants'][v].get('experts', result['experts'])}"
                for v in sparse
            ]
            lines.append(f"| experts kept by {task}'s export (per layer) | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
