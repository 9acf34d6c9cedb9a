"""`pathways-mm plan`: per-GPU memory and all-to-all traffic of a training layout, on paper.

Pure arithmetic (no torch, no DeepSpeed), so a layout for 256 GPUs can be checked on a laptop.
Every number comes from a formula written next to it; docs/scaling.md walks through two models.

Memory per GPU = parameters + gradients + optimizer states + ZeRO buckets
                 + max(activations during forward/backward, temporaries after the backward)
                 + overhead (CUDA context and fragmentation).
Dense parameters (embeddings, attention, norms, dense FFNs, routers, pathway priors) live on every
GPU; each MoE layer's experts are split over `ep_size` GPUs. ZeRO-1/2 shard dense states over the
data-parallel group (all GPUs) and expert states over the expert-data-parallel group (GPUs / ep_size),
as DeepSpeed does with expert parameter groups.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from pathways_mm.config import SIZES, ModelConfig
from pathways_mm.errors import ConfigError

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
DEFAULT_VOCAB = 4096  # the repository's own tokenizer (encoders/assets/pmm_text.model)
DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16, 32)

# Bytes per parameter, ZeRO paper (Rajbhandari et al. 2020, sec. 3.1): mixed precision keeps
# 2 (bf16 weights) + 2 (bf16 gradients) + K = 12 (fp32 master weights, Adam momentum, variance).
# fp32 has no separate master copy under plain AdamW (K = 8), but DeepSpeed's ZeRO-1/2 optimizer
# clones an fp32 partition even of fp32 weights (stage_1_and_2.single_partition_of_fp32_groups): K = 12.
WEIGHT_BYTES = {"bf16": 2, "fp32": 4}
ACT_BYTES = WEIGHT_BYTES  # activations are in the compute dtype


def optimizer_bytes_per_param(precision: str, zero_stage: int) -> int:
    """K of the ZeRO paper: optimizer-state bytes per parameter (before sharding)."""
    return 8 if precision == "fp32" and zero_stage == 0 else 12


def step_temp_bytes(precision: str, zero_stage: int, held: float, largest_group: float) -> int:
    """Transient bytes of `optimizer.step()` (activations are freed by then).

    held: parameters whose optimizer states this GPU keeps; largest_group: the most of them in one
    optimizer parameter group (DeepSpeed splits expert weights into their own groups).
    torch's foreach AdamW materialises sqrt(v) for a whole group at once (4 B per parameter of the
    group). ZeRO-1/2 step one group at a time on an fp32 copy of its gradient partition (4 B more
    per parameter of the group); DeepSpeed's bf16 stage-0 optimizer converts every gradient to fp32
    before stepping (4 B per held parameter). Plain fp32 at stage 0 steps on the gradients in place.
    """
    if zero_stage >= 1:
        return math.ceil(8 * largest_group)
    return math.ceil(4 * largest_group + (4 * held if precision == "bf16" else 0))


# Not seen by torch's allocator: CUDA context (~0.5 GiB with lazy module loading), NCCL communicators
# for the world, expert-parallel and expert-data-parallel groups, cuBLAS workspaces.
CONTEXT_GIB = 1.0
# The caching allocator's fragmentation: reserved minus allocated, typically 5-15% in training.
FRAGMENTATION = 0.10
# DeepSpeed's ZeRO-1/2 allocates `reduce_bucket_size` gradient elements up front
# (stage_1_and_2.setup_buckets, contiguous_gradients on by default), twice with overlap_comm.
REDUCE_BUCKET_ELEMS = 500_000_000


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The decoder's dimensions, as pathways_mm.model.decoder and routing.moe build it, plus the encoders' parameter count."""

    name: str = "custom"
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int = DEFAULT_VOCAB
    max_tasks: int = 32
    num_experts: int = 0  # 0 = dense
    top_k: int = 2
    expert_d_ff: int | None = None  # None = d_ff
    moe_every: int = 2
    # Modality encoders and markers (PathwaysModel.vision, .audio, .marker_embed): dense, replicated,
    # trained with the rest. Not derived from the shape: count them on a built model. Their
    # activations are not modelled (text batches do not run them).
    encoder_params: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def expert_ff(self) -> int:
        return self.expert_d_ff or self.d_ff

    @property
    def num_moe_layers(self) -> int:
        """Blocks i with (i + 1) % moe_every == 0 (routing.moe.build_moe_ffn)."""
        return self.n_layers // self.moe_every if self.num_experts else 0


def model_shape(
    size: str | None = None,
    *,
    vocab: int = DEFAULT_VOCAB,
    d_model: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    d_ff: int | None = None,
    max_tasks: int = 32,
    num_experts: int = 0,
    top_k: int = 2,
    expert_d_ff: int | None = None,
    moe_every: int = 2,
    encoder_params: int = 0,
) -> ModelShape:
    """A named size of `pathways_mm.config.SIZES` with any dimension overridden, or every dimension given."""
    given = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff)
    given = {k: v for k, v in given.items() if v is not None}
    if size is not None:
        if size not in SIZES:
            close = difflib.get_close_matches(str(size), SIZES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown model size {size!r}; {hint}choose one of {', '.join(SIZES)} or give every dimension"
            )
        dims = {**SIZES[size], **given}
    else:
        missing = [k for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff") if k not in given]
        if missing:
            raise ConfigError(f"no model size named, so give {', '.join(missing)} (or name a size: {', '.join(SIZES)})")
        dims = given
    shape = ModelShape(name=size or "custom", vocab=vocab, max_tasks=max_tasks, num_experts=num_experts, top_k=top_k,
                       expert_d_ff=expert_d_ff, moe_every=moe_every, encoder_params=encoder_params, **dims)  # fmt: skip
    _check_shape(shape)
    return shape


def shape_from_config(cfg: ModelConfig, vocab: int = DEFAULT_VOCAB, encoder_params: int = 0) -> ModelShape:
    """The shape of an experiment's `model:` section (a loaded config: its size row already applied)."""
    m = cfg.moe
    shape = ModelShape(name=cfg.size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, vocab=vocab, max_tasks=cfg.max_tasks,
                       num_experts=m.num_experts, top_k=m.top_k, expert_d_ff=m.expert_d_ff, moe_every=m.moe_every,
                       encoder_params=encoder_params)  # fmt: skip
    _check_shape(shape)
    return shape


def _positive(**values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"{name} must be a positive number, got {v!r}")


def _check_shape(s: ModelShape) -> None:
    _positive(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_ff=s.d_ff,
              vocab=s.vocab, max_tasks=s.max_tasks, moe_every=s.moe_every)  # fmt: skip
    if s.encoder_params < 0:
        raise ConfigError(f"encoder_params must be >= 0, got {s.encoder_params}")
    if s.d_model % s.n_heads or s.n_heads % s.n_kv_heads:
        raise ConfigError(f"d_model ({s.d_model}) must divide by n_heads ({s.n_heads}) and n_heads by n_kv_heads "
                          f"({s.n_kv_heads}); change the head counts")  # fmt: skip
    if s.num_experts < 0:
        raise ConfigError(f"num_experts must be >= 0 (0 = dense), got {s.num_experts}")
    if s.num_experts:
        _positive(top_k=s.top_k, expert_d_ff=s.expert_ff)
        if s.top_k > s.num_experts:
            raise ConfigError(f"top_k ({s.top_k}) must be at most num_experts ({s.num_experts}); lower top_k")
        if s.num_moe_layers == 0:
            raise ConfigError(
                f"moe_every ({s.moe_every}) exceeds n_layers ({s.n_layers}): no MoE layer; lower moe_every"
            )


@dataclass(frozen=True)
class ParamCounts:
    """Decoder parameters over all GPUs; `active` counts top_k experts per MoE layer (model.param_counts)."""

    total: int
    active: int
    dense: int  # everything but the experts: replicated on every GPU
    per_expert: int  # one expert of one layer: 3 x d_model x expert_d_ff (SwiGLU w1, w3, w2)
    experts: int  # all experts of all MoE layers


def count_params(s: ModelShape) -> ParamCounts:
    """Parameters of `Decoder` (pathways_mm.model.decoder; bias-free LayerNorms, weight only) plus `encoder_params`."""
    D = s.d_model
    embeddings = s.vocab * D + s.max_tasks * D  # token table (tied LM head) + task tokens
    attention = 2 * D * D + 2 * D * s.kv_dim  # wq, wo: D x D; wk, wv: D x kv_dim
    per_block = attention + D  # + the block's norm
    dense_ffn = 3 * D * s.d_ff
    router = s.num_experts * D + s.max_tasks * s.num_experts  # wg [E, D] + pathway priors [max_tasks, E]
    n_moe = s.num_moe_layers
    dense = embeddings + s.n_layers * per_block + (s.n_layers - n_moe) * dense_ffn + n_moe * router + D  # + final norm
    dense += s.encoder_params
    per_expert = 3 * D * s.expert_ff
    experts = n_moe * s.num_experts * per_expert
    active = dense + n_moe * s.top_k * per_expert
    return ParamCounts(total=dense + experts, active=active, dense=dense, per_expert=per_expert, experts=experts)


@dataclass(frozen=True)
class Activations:
    """Bytes of activation memory on one GPU for one micro-batch."""

    saved: int  # what autograd holds for backward at the end of the forward
    peak: int  # saved + the largest transients of the backward


def block_saved_bytes(s: ModelShape, moe: bool, tokens: int, batch: int, seq_len: int, precision: str,
                      prefix_lm: bool) -> int:  # fmt: skip
    """What autograd saves in one ParallelBlock (counted tensor by tensor with saved_tensors_hooks).

    Per token, `a` bytes per element of the compute dtype:
      norm: input x and output h, a * 2D, plus fp32 mean and rstd (8)
      attention: q and k after RoPE, k and v after the GQA repeat (or k, v themselves for MHA),
        the SDPA output and its reshaped copy fed to wo: a * 5D; logsumexp per head (4H).
        SDPA (flash / memory-efficient) keeps no L x L score matrix, but a prefix-LM mask is turned
        into an additive float bias [B, 1, L, L] that each layer saves: a * B * L^2 per block.
      dense SwiGLU: w1 x, silu(w1 x), w3 x and their product: a * 4 d_ff
      MoE: top_k routed copies of the token in and out of the experts plus the experts' w1 x and
        w3 x (silu recomputed in backward): a * k (2D + 2 d_ff_expert); router: fp32 logits and
        probabilities (8E), mask (E), indices and weights of the k routes and the sort permutations
        (40k), the token's task id (8), and in bf16 the fp32 copy of h the router reads (4D).
    """
    D, a = s.d_model, ACT_BYTES[precision]
    per_token = a * 2 * D + 8 + a * 5 * D + 4 * s.n_heads
    if moe:
        k = s.top_k
        per_token += a * k * (2 * D + 2 * s.expert_ff) + 9 * s.num_experts + 40 * k + 8
        per_token += 4 * D if precision == "bf16" else 0
    else:
        per_token += a * 4 * s.d_ff
    mask = a * batch * seq_len * seq_len if prefix_lm else 0
    return tokens * per_token + mask


def activation_bytes(
    s: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16",
    checkpointing: bool = False,
    prefix_lm: bool = True,
    scored_fraction: float = 1.0,
) -> Activations:
    """Activation memory of one micro-batch of `micro_batch` x `seq_len` tokens.

    Saved: the blocks (`block_saved_bytes`), plus the LM head at the N = scored_fraction x tokens
    target positions only (the decoder computes logits there alone): the final norm's input and
    output (a * 2D + 8 per position) and cross-entropy's fp32 log-softmax (4V per position).
    With activation checkpointing every block keeps only its inputs (a * D per token, and the
    prefix-LM boolean mask once: B * L^2 bytes); its activations come back one block at a time in backward.
    Peak adds the backward's transients: the fp32 gradients of the log-softmax and of the logits
    (8V per scored position), and gradients about as large as one block's saved tensors (one more
    block with checkpointing: the recomputed one).
    Expert parallelism changes nothing here under uniform routing: a GPU sends top_k x tokens
    routes and receives as many.
    """
    _positive(micro_batch=micro_batch, seq_len=seq_len, scored_fraction=scored_fraction)
    if scored_fraction > 1:
        raise ConfigError(
            f"scored_fraction is the fraction of positions with a target, at most 1; got {scored_fraction}"
        )
    a, D = ACT_BYTES[precision], s.d_model
    tokens = micro_batch * seq_len
    scored = round(scored_fraction * tokens)
    blocks = [block_saved_bytes(s, (i + 1) % s.moe_every == 0 and s.num_experts > 0, tokens, micro_batch, seq_len,
                                precision, prefix_lm) for i in range(s.n_layers)]  # fmt: skip
    head = scored * (a * 2 * D + 8 + 4 * s.vocab)
    biggest = max(blocks)
    if checkpointing:
        # Each block's inputs: x, and the prefix-LM boolean mask (one tensor shared by every block).
        saved = s.n_layers * tokens * a * D + (micro_batch * seq_len * seq_len if prefix_lm else 0) + head
        peak = saved + 2 * biggest + 8 * scored * s.vocab
    else:
        saved = sum(blocks) + head
        peak = saved + biggest + 8 * scored * s.vocab
    return Activations(saved=saved, peak=peak)


def all_to_all_bytes(s: ModelShape, *, ep_size: int, tokens: int, precision: str = "bf16",
                     checkpointing: bool = False) -> int:  # fmt: skip
    """Bytes one GPU sends over all-to-alls in one forward + backward of `tokens` tokens.

    Per MoE layer and pass, each of the top_k routes of a token moves a d_model vector in the
    compute dtype, and under uniform routing (ep_size - 1) / ep_size of them go to another GPU.
    Passes: dispatch and combine in the forward, their gradients in the backward (4); with
    activation checkpointing the recomputed forward repeats dispatch and combine (6).
    Received bytes are the same. The per-layer exchange of expert counts (ep_size integers) is left out.
    """
    if not s.num_experts or ep_size == 1:
        return 0
    passes = 6 if checkpointing else 4
    per_pass = tokens * s.top_k * s.d_model * ACT_BYTES[precision] * (ep_size - 1) / ep_size
    return round(s.num_moe_layers * passes * per_pass)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """One layout's per-GPU memory (bytes) and all-to-all traffic."""

    model: ModelShape
    params: ParamCounts
    gpus: int
    gpu_mem_gib: float
    ep_size: int
    zero_stage: int
    micro_batch: int
    seq_len: int
    precision: str
    checkpointing: bool
    prefix_lm: bool
    dense_params: int  # on this GPU (replicated)
    expert_params: int  # on this GPU (num_experts / ep_size per MoE layer)
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    bucket_bytes: int  # ZeRO-1/2 gradient buckets
    activations: Activations
    step_bytes: int  # after backward (activations freed): stage-0 all-reduce copies, optimizer-step temporaries
    overhead_bytes: int
    total_bytes: int
    fits: bool
    a2a_bytes: int  # sent per GPU per micro-batch (forward + backward)

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel degree: GPUs holding the same experts (expert states shard over it)."""
        return self.gpus // self.ep_size

    @property
    def a2a_bytes_per_token(self) -> float:
        return self.a2a_bytes / (self.micro_batch * self.seq_len)


def _check_layout(s: ModelShape, gpus: int, gpu_mem_gib: float, ep_size: int, zero_stage: int, micro_batch: int,
                  seq_len: int, precision: str) -> None:  # fmt: skip
    _positive(gpus=gpus, gpu_mem_gib=gpu_mem_gib, ep_size=ep_size, micro_batch=micro_batch, seq_len=seq_len)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if zero_stage == 3:
        why = (
            "DeepSpeed cannot shard MoE experts with ZeRO-3" if s.num_experts else "the planner models stages 0-2 only"
        )
        raise ConfigError(f"ZeRO stage 3: {why}; use zero_stage 0, 1 or 2")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r}")
    if not s.num_experts and ep_size != 1:
        raise ConfigError(f"ep_size {ep_size} needs experts; a dense model (num_experts 0) takes ep_size 1")
    if s.num_experts and s.num_experts % ep_size:
        raise ConfigError(f"num_experts ({s.num_experts}) must be divisible by ep_size ({ep_size}); "
                          f"choose ep_size among {', '.join(map(str, _divisors(s.num_experts)))}")  # fmt: skip
    if gpus % ep_size:
        raise ConfigError(f"ep_size ({ep_size}) must divide the GPU count ({gpus}); change ep_size or the GPU count")


def plan(
    s: ModelShape,
    *,
    gpus: int,
    gpu_mem_gib: float,
    ep_size: int = 1,
    zero_stage: int = 0,
    micro_batch: int = 1,
    seq_len: int = 2048,
    precision: str = "bf16",
    checkpointing: bool = False,
    prefix_lm: bool = True,
    scored_fraction: float = 1.0,
    overlap_comm: bool | None = None,
    reduce_bucket_elems: int = REDUCE_BUCKET_ELEMS,
    context_gib: float = CONTEXT_GIB,
    fragmentation: float = FRAGMENTATION,
) -> Plan:
    """Per-GPU memory and all-to-all bytes of `s` trained on `gpus` GPUs of `gpu_mem_gib` GiB.

    Data-parallel degree = gpus (dense parameters replicated), expert-data-parallel = gpus / ep_size.
    prefix_lm: a prefix-LM attention mask (ModelConfig.prefix_lm), which SDPA saves per layer as a bias.
    scored_fraction: positions with a target (1.0 for LM pretraining; the head runs only there).
    overlap_comm: DeepSpeed's ZeRO flag (doubles the gradient buckets); None = as configs/ds/ (on at stage 2).
    """
    _check_layout(s, gpus, gpu_mem_gib, ep_size, zero_stage, micro_batch, seq_len, precision)
    if fragmentation < 0 or context_gib < 0 or reduce_bucket_elems < 0:
        raise ConfigError("fragmentation, context_gib and reduce_bucket_elems must be >= 0")
    counts = count_params(s)
    dense, experts = counts.dense, counts.experts // ep_size
    dp, edp = gpus, gpus // ep_size
    w = WEIGHT_BYTES[precision]
    k_opt = optimizer_bytes_per_param(precision, zero_stage)
    # Parameters whose gradients / optimizer states this GPU holds: sharded from stage 2 / stage 1 on.
    grad_held = dense / dp + experts / edp if zero_stage >= 2 else dense + experts
    opt_held = dense / dp + experts / edp if zero_stage >= 1 else dense + experts
    param_bytes = w * (dense + experts)
    grad_bytes = math.ceil(w * grad_held)
    optim_bytes = math.ceil(k_opt * opt_held)
    overlap = zero_stage == 2 if overlap_comm is None else overlap_comm
    bucket_bytes = reduce_bucket_elems * w * (2 if overlap else 1) if zero_stage >= 1 else 0
    acts = activation_bytes(s, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                            checkpointing=checkpointing, prefix_lm=prefix_lm, scored_fraction=scored_fraction)  # fmt: skip
    # Optimizer groups: dense weights with and without decay, expert weights; the larger of dense and
    # expert bounds the largest group.
    dense_held, expert_held = (dense / dp, experts / edp) if zero_stage >= 1 else (dense, experts)
    step_bytes = step_temp_bytes(precision, zero_stage, opt_held, max(dense_held, expert_held))
    if zero_stage == 0:
        # Before the step, DeepSpeed's stage-0 engine all-reduces gradients through flattened copies of
        # up to reduce_bucket_elems elements, dense and expert gradients apart (buffered_allreduce_fallback).
        step_bytes = max(step_bytes, w * min(max(dense, experts), reduce_bucket_elems))
    allocated = param_bytes + grad_bytes + optim_bytes + bucket_bytes + max(acts.peak, step_bytes)
    overhead = round(context_gib * GIB + fragmentation * allocated)
    total = allocated + overhead
    a2a = all_to_all_bytes(s, ep_size=ep_size, tokens=micro_batch * seq_len, precision=precision,
                           checkpointing=checkpointing)  # fmt: skip
    return Plan(model=s, params=counts, gpus=gpus, gpu_mem_gib=gpu_mem_gib, ep_size=ep_size, zero_stage=zero_stage,
                micro_batch=micro_batch, seq_len=seq_len, precision=precision, checkpointing=checkpointing,
                prefix_lm=prefix_lm, dense_params=dense, expert_params=experts, param_bytes=param_bytes,
                grad_bytes=grad_bytes, optim_bytes=optim_bytes, bucket_bytes=bucket_bytes, activations=acts,
                step_bytes=step_bytes, overhead_bytes=overhead, total_bytes=total,
                fits=total <= gpu_mem_gib * GIB, a2a_bytes=a2a)  # fmt: skip


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


ENOUGH_TOKENS = 16_384  # tokens per micro-batch past which a GPU's GEMMs gain little (8 x 2048)


def preference(p: Plan) -> tuple:
    """Search order, best first:
    1. no activation checkpointing (recompute costs another forward, ~1/3 more FLOPs, and
       repeats the forward all-to-alls);
    2. more tokens per micro-batch, up to ENOUGH_TOKENS (bigger GEMMs, also per expert);
    3. least all-to-all bytes per token: expert parallelism only as wide as memory needs;
    4. the largest micro-batch, then the least memory (headroom), then the lower ZeRO stage.
    """
    tokens = p.micro_batch * p.seq_len
    return (p.checkpointing, -min(tokens, ENOUGH_TOKENS), p.a2a_bytes_per_token, -p.micro_batch, p.total_bytes,
            p.zero_stage)  # fmt: skip


def search(
    s: ModelShape,
    *,
    gpus: int,
    gpu_mem_gib: float,
    seq_len: int = 2048,
    precision: str = "bf16",
    micro_batches: Iterable[int] = DEFAULT_MICRO_BATCHES,
    zero_stages: Iterable[int] = (0, 1, 2),
    ep_sizes: Iterable[int] | None = None,
    checkpointing: Iterable[bool] = (False, True),
    prefix_lm: bool = True,
    scored_fraction: float = 1.0,
    overlap_comm: bool | None = None,
    reduce_bucket_elems: int = REDUCE_BUCKET_ELEMS,
    context_gib: float = CONTEXT_GIB,
    fragmentation: float = FRAGMENTATION,
) -> list[Plan]:
    """Every layout that fits, best first (`preference`).

    ep_sizes: None = every ep_size dividing both num_experts and gpus (1 for a dense model).
    The last six arguments are `plan`'s, the same for every layout.
    """
    _positive(gpus=gpus)
    if ep_sizes is None:
        ep_sizes = _divisors(math.gcd(s.num_experts, gpus)) if s.num_experts else [1]
    # tuples first: the grid walks each axis once per combination of the axes before it
    axes = tuple(ep_sizes), tuple(zero_stages), tuple(micro_batches), tuple(checkpointing)
    grid = [(ep, z, mb, ck) for ep in axes[0] for z in axes[1] for mb in axes[2] for ck in axes[3]]
    plans = [
        plan(s, gpus=gpus, gpu_mem_gib=gpu_mem_gib, ep_size=ep, zero_stage=z, micro_batch=mb, seq_len=seq_len,
             precision=precision, checkpointing=ck, prefix_lm=prefix_lm, scored_fraction=scored_fraction,
             overlap_comm=overlap_comm, reduce_bucket_elems=reduce_bucket_elems, context_gib=context_gib,
             fragmentation=fragmentation)
        for ep, z, mb, ck in grid
    ]  # fmt: skip
    return sorted((p for p in plans if p.fits), key=preference)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe_model(s: ModelShape) -> str:
    moe = (f"{s.num_moe_layers} MoE layers of {s.num_experts} experts, top-{s.top_k}, expert d_ff {s.expert_ff}"
           if s.num_experts else "dense")  # fmt: skip
    return (f"{s.name}: d_model {s.d_model}, {s.n_layers} layers, {s.n_heads} heads ({s.n_kv_heads} kv), "
            f"d_ff {s.d_ff}, vocab {s.vocab}; {moe}")  # fmt: skip


def describe_layout(p: Plan) -> str:
    zero = f"ZeRO-{p.zero_stage}"
    ckpt = "checkpointing on" if p.checkpointing else "no checkpointing"
    return (f"{p.gpus} GPUs x {p.gpu_mem_gib:g} GiB, ep_size {p.ep_size} (expert-data-parallel {p.expert_dp}), {zero}, "
            f"micro-batch {p.micro_batch} x {p.seq_len}, {p.precision}, {ckpt}")  # fmt: skip


def format_plan(p: Plan) -> str:
    """The per-GPU table of one layout."""
    s, c = p.model, p.params
    w = WEIGHT_BYTES[p.precision]
    k_opt = optimizer_bytes_per_param(p.precision, p.zero_stage)
    shard = f"(dense / {p.gpus}, experts / {p.expert_dp})"
    shard_g = shard if p.zero_stage >= 2 else ""
    shard_o = shard if p.zero_stage >= 1 else ""
    moe_layers = s.num_moe_layers
    lines = [
        f"model    {describe_model(s)}",
        f"params   {_count(c.total)} total, {_count(c.active)} active; per GPU {_count(p.dense_params)} dense "
        f"(replicated) + {_count(p.expert_params)} expert ({s.num_experts // p.ep_size if s.num_experts else 0} "
        f"of {s.num_experts} per MoE layer)",
        f"layout   {describe_layout(p)}",
        f"{'per GPU':<34} {'GiB':>8}   how",
        f"{'parameters':<34} {_gib(p.param_bytes)}   {w} B x (dense + local experts)",
        f"{'gradients':<34} {_gib(p.grad_bytes)}   {w} B x params {shard_g}".rstrip(),
        f"{'optimizer states':<34} {_gib(p.optim_bytes)}   {k_opt} B x params {shard_o}".rstrip(),
        f"{'ZeRO gradient buckets':<34} {_gib(p.bucket_bytes)}",
        f"{'activations (peak)':<34} {_gib(p.activations.peak)}   saved {p.activations.saved / GIB:.2f} + backward transients",
        f"{'after-backward temporaries':<34} {_gib(p.step_bytes)}   all-reduce copies / fp32 grads + sqrt(v) in the step",
        f"{'overhead':<34} {_gib(p.overhead_bytes)}   CUDA context + fragmentation",
        f"{'total':<34} {_gib(p.total_bytes)}   of {p.gpu_mem_gib:g}: {'fits' if p.fits else 'DOES NOT FIT'} "
        f"(the larger of activations and after-backward temporaries counts)",
    ]  # fmt: skip
    if moe_layers and p.ep_size > 1:
        lines.append(f"all-to-all: {p.a2a_bytes / GIB:.2f} GiB sent per GPU per micro-batch ({moe_layers} MoE layers x "
                     f"{6 if p.checkpointing else 4} passes, {(p.ep_size - 1) / p.ep_size:.0%} of top-{s.top_k} routes "
                     f"leave the GPU), {p.a2a_bytes_per_token / 1024:.1f} KiB per token")  # fmt: skip
    else:
        lines.append("all-to-all: none (every expert on every GPU)")
    return "\n".join(lines)


def format_search(plans: list[Plan], limit: int | None = 20) -> str:
    """One row per layout that fits, best first (at most `limit` rows; None = all)."""
    if not plans:
        return "no layout fits: add GPUs, raise ep_size, or shorten the sequence"
    head = f"{describe_model(plans[0].model)}\n{len(plans)} layouts fit on {plans[0].gpus} GPUs x {plans[0].gpu_mem_gib:g} GiB"
    cols = (f"{'ep':>4} {'zero':>4} {'mb':>4} {'ckpt':>4} {'params':>8} {'grads':>8} {'optim':>8} {'buckets':>8} "
            f"{'act':>8} {'total':>8} {'a2a GiB':>8} {'KiB/tok':>8}")  # fmt: skip
    rows = [
        f"{p.ep_size:>4} {p.zero_stage:>4} {p.micro_batch:>4} {'on' if p.checkpointing else 'off':>4}"
        f"{_gib(p.param_bytes)} {_gib(p.grad_bytes)} {_gib(p.optim_bytes)} {_gib(p.bucket_bytes)}"
        f" {_gib(p.activations.peak)} {_gib(p.total_bytes)} {p.a2a_bytes / GIB:8.2f} {p.a2a_bytes_per_token / 1024:8.1f}"
        for p in plans[: limit if limit is not None else len(plans)]
    ]  # fmt: skip
    more = [] if limit is None or len(plans) <= limit else [f"... {len(plans) - limit} more"]
    return "\n".join([head, "memory in GiB per GPU; a2a sent per GPU per micro-batch", cols, *rows, *more])
