"""Ask a trained model: `pathways_mm.load(path)` and `generate`, in one process, CPU or CUDA.

    import pathways_mm
    model = pathways_mm.load("runs/demo")                        # a run, a checkpoint or an export
    model.generate("digit_image", image="seven.png")             # 'seven'
    model.generate("digit_speech", audio="seven.wav")            # '7'
    model.generate("text_arith", text="what is two plus three?")
    model.generate_batch("digit_image", [{"image": a}, {"image": b}])
    model.generate("digit_image", image=a, return_experts=True)  # Generation(text, answer, tokens, experts)

No DeepSpeed launcher or process group is needed: every expert lives in this process (a
checkpoint saved at any ep_size loads here), and decoding is the greedy decoding `eval` scores.

Shape suffixes: B rows, L positions, K experts per token (top_k).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathways_mm.config import ExperimentConfig, config_from_dict, one_process
from pathways_mm.data.collate import collate
from pathways_mm.data.declared import declare_tasks
from pathways_mm.data.sources.base import MediaRules
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.inference.export import INFO, load_export
from pathways_mm.inference.inputs import user_inputs
from pathways_mm.model.batch import AUDIO, IGNORE, IMAGE, PAD_MODALITY, TEXT, Batch, marker_id
from pathways_mm.model.generate import greedy_generate
from pathways_mm.model.model import PathwaysModel, build_model
from pathways_mm.routing import moe_layers
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.tasks import MultimodalExample, Task, get_task

MARKERS = {
    marker_id(IMAGE, False): "<image>",
    marker_id(IMAGE, True): "</image>",
    marker_id(AUDIO, False): "<audio>",
    marker_id(AUDIO, True): "</audio>",
}


@dataclass(frozen=True)
class Generation:
    """One answer with the experts that read it (`generate(..., return_experts=True)`).

    tokens: what each position of the sequence is: "<task:NAME>", "<image>", "image" (a patch),
    "</image>", "<audio>", "audio" (a frame), "</audio>", a text piece of the prompt, then the
    answer's pieces (from `answer_start` on). experts: per MoE block ("block3"), per position,
    the top-k experts the token was sent to, best first (global ids).
    """

    text: str
    answer: str  # task.final_answer(text): what the metrics score (the last word after a scratchpad)
    tokens: list[str]
    answer_start: int
    experts: dict[str, list[list[int]]]


def pick_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA device; use 'cpu'")
    return dev


class TrainedModel:
    """A trained pathways-mm model, ready to answer its tasks on a user's own inputs."""

    def __init__(
        self, module: PathwaysModel, cfg: ExperimentConfig, table: dict[str, int], source: str, device: torch.device
    ):
        self.module = module.to(device).eval()
        self.cfg, self.table, self.source, self.device = cfg, dict(table), source, device
        self.tok: TextTokenizer = load_tokenizer()
        declare_tasks(cfg)  # the model's declared tasks are data, not code: safe to rebuild from its config
        self.rules = MediaRules.from_config(cfg)  # files given to it are held to the limits training data is

    @property
    def tasks(self) -> list[str]:
        """The tasks this model answers, in task-id order."""
        return sorted(self.table, key=self.table.get)

    def __repr__(self) -> str:
        return f"<TrainedModel {self.source} on {self.device}: {', '.join(self.tasks)}>"

    def task(self, name: str) -> Task:
        """The registered task `name`, if this model was trained on it (ConfigError otherwise)."""
        if name not in self.table:
            raise ConfigError(f"unknown task '{name}' for {self.source}; it answers {', '.join(self.tasks)}")
        return get_task(name)

    def generate(
        self,
        task: str,
        *,
        image: Any = None,
        audio: Any = None,
        text: str | None = None,
        max_new_tokens: int | None = None,
        return_experts: bool = False,
    ) -> str | Generation:
        """The model's answer to one input (greedy decoding).

        image: a file path, a PIL image or a grayscale array (ink bright on dark, as in training);
        audio: an audio file path (WAV, FLAC, OGG) or (samples, sample_rate), resampled to the
        model's rate as training resamples a declared task's files; text: the prompt. Only the inputs the task reads may be given. max_new_tokens: default the task's.
        return_experts: a `Generation` with the experts each token went to, instead of the text.
        """
        item = {"image": image, "audio": audio, "text": text}
        return self.generate_batch(task, [item], max_new_tokens=max_new_tokens, return_experts=return_experts)[0]

    def generate_batch(
        self,
        task: str,
        inputs: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
        return_experts: bool = False,
        batch_size: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[str] | list[Generation]:
        """`generate` for many inputs of one task (dicts with "image", "audio", "text"), run
        `batch_size` at a time (default eval.batch_size); `keys` name them in error messages."""
        t = self.task(task)
        steps = t.generation.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {steps}")
        bs = batch_size or self.cfg.eval.batch_size
        keys = list(keys) if keys is not None else [f"input {i}" for i in range(len(inputs))]
        out: list = []
        for start in range(0, len(inputs), bs):
            chunk = [self._read(t, inputs[i], keys[i]) for i in range(start, min(start + bs, len(inputs)))]
            out += self._run(t, chunk, steps, return_experts, keys[start : start + bs])
        return out

    def _read(self, t: Task, item: Mapping[str, Any], key: str) -> dict[str, Any]:
        unknown = set(item) - {"image", "audio", "text"}
        if unknown:
            raise ConfigError(f"{key}: unknown input {sorted(unknown)}; give image, audio and/or text")
        try:
            media = {m: item.get(m) for m in ("image", "audio", "text")}
            return user_inputs(
                t.name, t.modalities, **media, sample_rate=self.cfg.model.audio.sample_rate, rules=self.rules
            )
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None

    @torch.no_grad()
    def _run(self, t: Task, items: list[dict[str, Any]], steps: int, return_experts: bool, keys: Sequence[str]):
        tid = self.table[t.name]
        examples = [_example(t, item) for item in items]
        batch = collate(
            examples,
            [tid] * len(items),
            self.tok,
            self.cfg.data.max_len,
            with_target=False,
            model_cfg=self.cfg.model,
            keys=keys,
        ).to(self.device)
        longest = int(batch.lengths.max()) + steps
        if longest > self.cfg.model.max_seq_len:
            raise ConfigError(
                f"an input of {longest - steps} positions plus {steps} new tokens exceeds the model's "
                f"max_seq_len={self.cfg.model.max_seq_len}; lower max_new_tokens"
            )
        ids = greedy_generate(self.module, batch, steps, self.tok.eos_id, self.tok.pad_id)
        texts = [self.tok.decode(x) for x in ids]
        if not return_experts:
            return texts
        full = with_answers(batch, ids, self.tok.pad_id)
        routes = expert_routes(self.module, full)
        return [
            Generation(
                text=text,
                answer=t.final_answer(text),
                tokens=self._labels(full, b, t.name),
                answer_start=int(batch.lengths[b]),
                experts={block: per_pos[b, : int(full.lengths[b])].tolist() for block, per_pos in routes.items()},
            )
            for b, text in enumerate(texts)
        ]

    def _labels(self, batch: Batch, b: int, task: str) -> list[str]:
        n = int(batch.lengths[b])
        tokens, mods, markers = (x[b, :n].tolist() for x in (batch.tokens, batch.modality_ids, batch.markers))
        out = []
        for i, (tok, mod, mark) in enumerate(zip(tokens, mods, markers)):
            if i == 0:
                out.append(f"<task:{task}>")
            elif mark >= 0:
                out.append(MARKERS[mark])
            elif mod in (IMAGE, AUDIO):
                out.append("image" if mod == IMAGE else "audio")
            else:
                out.append(self.tok.decode([tok]))
        return out


def _example(t: Task, item: dict[str, Any]) -> MultimodalExample:
    return MultimodalExample(task=t.name, segments=tuple(t.segments_for(item)), target_text="")


def with_answers(batch: Batch, answers: list[list[int]], pad_id: int) -> Batch:
    """A prompt batch (as `collate(..., with_target=False)` makes it) with each row's answer
    tokens after its prompt: the sequence greedy decoding read, for one teacher-forced forward."""
    B, Lp = batch.tokens.shape
    lengths = batch.lengths + torch.tensor([len(a) for a in answers], device=batch.lengths.device)
    L = int(lengths.max())
    tokens = batch.tokens.new_full((B, L), pad_id)
    modality_ids = batch.modality_ids.new_full((B, L), PAD_MODALITY)
    markers = batch.markers.new_full((B, L), -1)
    tokens[:, :Lp], modality_ids[:, :Lp], markers[:, :Lp] = batch.tokens, batch.modality_ids, batch.markers
    for b, answer in enumerate(answers):
        start = int(batch.lengths[b])
        tokens[b, start : start + len(answer)] = torch.tensor(answer, dtype=tokens.dtype)
        modality_ids[b, start : start + len(answer)] = TEXT

    def reslot(slots: torch.Tensor | None) -> torch.Tensor | None:  # flat b*Lp + l -> b*L + l
        return None if slots is None else torch.where(slots >= 0, slots // Lp * L + slots % Lp, slots)

    return dataclasses.replace(
        batch,
        tokens=tokens,
        lengths=lengths,
        labels=torch.full_like(tokens, IGNORE),
        modality_ids=modality_ids,
        markers=markers,
        image_slots=reslot(batch.image_slots),
        audio_slots=reslot(batch.audio_slots),
    )


@torch.no_grad()
def expert_routes(model: PathwaysModel, batch: Batch) -> dict[str, torch.Tensor]:
    """Per MoE block ("block3"), the top-k experts of every position of one forward: `[B, L, K]`
    global expert ids (an exported sub-network's kept experts mapped back to their ids)."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    B, L = batch.tokens.shape
    for name, layer in moe_layers(model):
        block = f"block{name.split('blocks.')[-1].split('.')[0]}"

        def keep(layer, args, out, block=block):
            ids_TK = out.route.indices_TK
            kept = layer.router.kept
            found[block] = (ids_TK if kept is None else kept[ids_TK]).view(B, L, -1).cpu()

        hooks.append(layer.register_forward_hook(keep))
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return found


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> TrainedModel:
    """A trained model from a run directory, one of its checkpoints, or an `export` folder.

    device: "cpu", "cuda", "cuda:1", ...; default CUDA when there is one. Checkpoints are checked
    against their checksums and read as tensors only; an export is read from safetensors.
    """
    dev = pick_device(device)
    p = Path(path)
    if (p / INFO).is_file():
        module, info = load_export(p)
        cfg = config_from_dict(info["config"])
        table = info["task_table"] if info["kind"] == "run" else {info["task"]: info["task_id"]}
        return TrainedModel(module, cfg, table, str(p), dev)
    tok = load_tokenizer()
    tag_dir, meta, cfg = ckpt.open_checkpoint(p, tok)
    cfg = one_process(cfg)
    module = build_model(cfg.model, tok.vocab_size)
    ckpt.load_weights(module, ckpt.load_full_state(tag_dir), tag_dir)
    return TrainedModel(module, cfg, meta["task_table"], str(tag_dir), dev)
