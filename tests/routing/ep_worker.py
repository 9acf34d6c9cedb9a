"""Worker for the expert-parallel tests, run by `deepspeed --num_gpus 2` (gloo on CPU) or alone.

Modes: equiv (ep_size=world vs an in-process ep_size=1 reference), save / load (checkpoint
round trip across ep_size and impl), zero (every token forced to one expert). Asserts; prints
EP_WORKER_OK on success.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pathways_mm.routing import PathwaysMoE  # noqa: E402
from pathways_mm.runtime.engine import shutdown  # noqa: E402

D, FF, E, TASKS, B_LOCAL, L = 16, 24, 4, 3, 2, 6
PREFIX = "moe.deepspeed_moe.experts.deepspeed_experts."


class Tiny(nn.Module):
    """Linear -> PathwaysMoE -> Linear, enough to check gradients on both sides of the MoE."""

    def __init__(self, ep_size: int, impl: str, top_k: int, capacity: float | None, route_to: int | None):
        super().__init__()
        self.inp = nn.Linear(D, D, bias=False)
        self.moe = PathwaysMoE(
            D, FF, E, TASKS, top_k, ep_size=ep_size, impl=impl, capacity_factor=capacity, debug_route_to=route_to
        )
        with torch.no_grad():
            self.moe.router.pathway.normal_()  # distinct per-task routing
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x_BLD, task_BL):
        y = self.moe(self.inp(x_BLD), task_BL)
        return self.out(y.out), y.aux_loss


def localize(full_sd: dict, rank: int, num_local: int) -> dict:
    """A full (ep_size=1) state dict -> the keys and experts one expert-parallel rank holds."""
    out = {}
    for key, val in full_sd.items():
        if key.startswith(PREFIX):
            gid, rest = key[len(PREFIX) :].split(".", 1)
            lid = int(gid) - rank * num_local
            if 0 <= lid < num_local:
                out[f"{PREFIX}{lid}.{rest}"] = val
        else:
            out[key] = val
    return out


def data(seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, D, generator=g)
    tasks = torch.randint(0, TASKS, (batch, 1), generator=g).expand(batch, L)
    return x, tasks, torch.randn(batch, L, D, generator=g)


def loss_fn(model, x, tasks, target):
    out, aux = model(x, tasks)
    return F.mse_loss(out, target) + aux


def engine_for(model):
    cfg = {
        "train_micro_batch_size_per_gpu": B_LOCAL,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return engine


def close(a, b, what, atol=1e-5):
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def equiv(args, rank, world):
    torch.manual_seed(0)
    ref = Tiny(1, args.impl, args.top_k, args.capacity, None)
    model = Tiny(world, args.impl, args.top_k, args.capacity, None)
    model.load_state_dict(localize(ref.state_dict(), rank, E // world))
    engine = engine_for(model)
    x, tasks, target = data(1, B_LOCAL * world)
    shard = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    loss = loss_fn(engine, x[shard], tasks[shard], target[shard])
    engine.backward(loss)
    # Data parallelism averages the per-rank losses; the reference does the same in one process.
    ref_losses = [
        loss_fn(
            ref,
            x[r * B_LOCAL : (r + 1) * B_LOCAL],
            tasks[r * B_LOCAL : (r + 1) * B_LOCAL],
            target[r * B_LOCAL : (r + 1) * B_LOCAL],
        )
        for r in range(world)
    ]
    torch.stack(ref_losses).mean().backward()
    close(loss.detach(), ref_losses[rank].detach(), "loss")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    num_local = E // world
    for name, p in engine.module.named_parameters():
        want = ref_grads[name]
        if name.startswith("moe.deepspeed_moe.experts."):
            want = want[rank * num_local : (rank + 1) * num_local]
        assert p.grad is not None, name
        close(p.grad, want, f"grad {name}")
    assert any(g.get("moe") for g in engine.optimizer.param_groups), "no expert param group"
    engine.step()


def eval_outputs(engine):
    x, tasks, _ = data(7, 4)
    engine.eval()
    with torch.no_grad():
        return engine(x, tasks)[0]


def save(args, rank, world):
    torch.manual_seed(3)
    engine = engine_for(Tiny(world, args.impl, args.top_k, args.capacity, None))
    x, tasks, target = data(2 + rank, B_LOCAL)
    engine.backward(loss_fn(engine, x, tasks, target))
    engine.step()  # trained weights differ from any fresh init
    engine.save_checkpoint(args.dir, tag="t")
    out = eval_outputs(engine)
    if rank == 0:
        torch.save(out, os.path.join(args.dir, "outputs.pt"))


def load(args, rank, world):
    torch.manual_seed(11)  # different init: everything must come from the checkpoint
    engine = engine_for(Tiny(world, args.impl, args.top_k, args.capacity, None))
    engine.load_checkpoint(args.dir, tag="t", load_module_only=True)
    close(eval_outputs(engine), torch.load(os.path.join(args.dir, "outputs.pt")), "outputs after load")


def zero(args, rank, world):
    # Experts 0-1 live on rank 0 and 2-3 on rank 1: route_to 3 idles rank 0, route_to 0 idles rank 1.
    for top_k, route_to in [(1, 3), (2, 0)]:
        torch.manual_seed(0)
        engine = engine_for(Tiny(world, args.impl, top_k, args.capacity, route_to))
        for step in range(2):
            x, tasks, target = data(step * 10 + rank, B_LOCAL)
            engine.backward(loss_fn(engine, x, tasks, target))
            engine.step()
        assert all(torch.isfinite(p).all() for p in engine.module.moe.experts.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["equiv", "save", "load", "zero"], required=True)
    ap.add_argument("--impl", default="grouped")
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity", type=float, default=None)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    globals()[args.mode](args, rank, world)
    print(f"EP_WORKER_OK mode={args.mode} rank={rank}", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
