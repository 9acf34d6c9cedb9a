"""Collation: `MultimodalExample`s -> one padded `Batch` laid out as the multimodal sentence.

Each row is `[task][<img> patches </img>][<aud> frames </aud>][prompt text][target][eos]`, the
segments in the order the task gave them. Text positions hold token ids; image and audio
positions hold the pad id and are filled by the encoders' embeddings (`*_slots` say where);
start/end markers are learned embeddings (`markers`). Training augmentation (random affine,
SpecAugment) is drawn here from the caller's generator, so a batch is a pure function of its key.

Shape suffixes: B rows, L positions, Lp prefix positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pathways_mm.config import ModelConfig
from pathways_mm.encoders.audio import num_audio_tokens, pad_audio, prepare_audio, spec_augment_params
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.encoders.vision import MediaError, num_patches, pad_images, prepare_image
from pathways_mm.errors import ConfigError
from pathways_mm.model.batch import AUDIO, IGNORE, IMAGE, PAD_MODALITY, TEXT, Batch, marker_id
from pathways_mm.tasks.base import MODALITIES, MultimodalExample


@dataclass
class _Row:
    """One sequence laid out, before padding: parallel lists of token, modality and marker ids."""

    tokens: list[int]
    modalities: list[int]
    markers: list[int]
    prefix_len: int = 0
    target_bytes: int = 0

    def extend(self, tokens: list[int], modality: int, markers: list[int] | None = None) -> None:
        self.tokens += tokens
        self.modalities += [modality] * len(tokens)
        self.markers += markers or [-1] * len(tokens)


@dataclass
class _Media:
    """Prepared images and clips of the whole batch, and where each one's embeddings go."""

    images: list[torch.Tensor] = field(default_factory=list)
    image_at: list[tuple[int, int, int]] = field(default_factory=list)  # (row, first position, count)
    clips: list[torch.Tensor] = field(default_factory=list)
    clip_at: list[tuple[int, int, int]] = field(default_factory=list)
    clip_masks: list[Any] = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return tuple(len(v) for v in vars(self).values())

    def rollback(self, mark: tuple[int, ...]) -> None:
        """Forget what was added since `mark` (a sample that failed halfway through its segments)."""
        for v, n in zip(vars(self).values(), mark):
            del v[n:]

    def attach(self, batch: Batch, L: int, training: bool) -> None:
        if self.images:
            batch.images, batch.image_widths = pad_images(self.images)
            batch.image_slots = _slots(self.image_at, L)
        if self.clips:
            batch.audio, batch.audio_lengths = pad_audio(self.clips)
            batch.audio_slots = _slots(self.clip_at, L)
            batch.audio_masks = torch.tensor(self.clip_masks, dtype=torch.long) if training else None


def _slots(rows_offsets: list[tuple[int, int, int]], L: int) -> torch.Tensor:
    """[(row, start, count)] -> `[N, max count]` flat positions, -1 past each count."""
    width = max(c for _, _, c in rows_offsets)
    out = torch.full((len(rows_offsets), width), -1, dtype=torch.long)
    for i, (b, start, count) in enumerate(rows_offsets):
        out[i, :count] = b * L + start + torch.arange(count)
    return out


def _text(raw: Any, what: str) -> str:
    """`raw` if it is text the tokenizer can encode (UTF-8: no lone surrogates), else a MediaError."""
    if not isinstance(raw, str):
        raise MediaError(f"{what} must be a string, got {type(raw).__name__}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MediaError(f"{what} is not valid Unicode ({e.reason} at character {e.start})") from None
    return raw


def _lay_out_segments(
    ex: MultimodalExample,
    b: int,
    row: _Row,
    tokenizer: TextTokenizer,
    mcfg: ModelConfig,
    rng: np.random.Generator | None,
    media: _Media,
) -> None:
    """Append the example's segments to `row`; media go to `media` (MediaError on a bad one)."""
    for modality, raw in ex.segments:
        if modality == "text":
            row.extend(tokenizer.encode(_text(raw, "a text segment")), TEXT)
            continue
        if modality == "image":
            img = prepare_image(raw, mcfg.vision, rng)
            n, m = num_patches(img.shape[-1], mcfg.vision), IMAGE
            media.images.append(img)
            media.image_at.append((b, len(row.tokens) + 1, n))
        elif modality == "audio":
            clip = prepare_audio(raw, mcfg.audio)
            n, m = num_audio_tokens(clip.numel(), mcfg.audio), AUDIO
            media.clips.append(clip)
            media.clip_at.append((b, len(row.tokens) + 1, n))
            if rng is not None:
                media.clip_masks.append(spec_augment_params(clip.numel(), mcfg.audio, rng))
        else:
            raise MediaError(f"unknown modality {modality!r}; choose from {list(MODALITIES)}")
        row.extend([tokenizer.pad_id] * (n + 2), m, [marker_id(m, False)] + [-1] * n + [marker_id(m, True)])


def _lay_out(
    ex: MultimodalExample,
    b: int,
    tokenizer: TextTokenizer,
    max_len: int,
    with_target: bool,
    mcfg: ModelConfig,
    rng: np.random.Generator | None,
    media: _Media,
    where: str,
    whole_target: bool = False,
) -> _Row:
    """One example as a row: the task slot, its segments, then the target (cut to fit, or with
    `whole_target` a ConfigError if it does not) and eos."""
    row = _Row([tokenizer.bos_id], [TEXT], [-1])  # slot 0 is replaced by the task embedding
    try:
        _lay_out_segments(ex, b, row, tokenizer, mcfg, rng, media)
    except MediaError as e:
        raise ConfigError(f"task '{ex.task}', {where}: {e}") from None
    if len(row.tokens) >= max_len:
        raise ConfigError(
            f"task '{ex.task}': an input of {len(row.tokens)} positions (task token, media and prompt) does not fit "
            f"data.max_len={max_len}; raise data.max_len"
        )
    try:
        target = tokenizer.encode(_text(ex.target_text, "the target")) if with_target else []
    except MediaError as e:
        raise ConfigError(f"task '{ex.task}', {where}: {e}") from None
    room = max_len - len(row.tokens) - 1
    if whole_target and len(target) > room:
        raise ConfigError(
            f"task '{ex.task}', {where}: a target of {len(target)} tokens does not fit data.max_len={max_len} after "
            f"its input of {len(row.tokens)} positions (cut, it could never be matched); shorten it or raise data.max_len"
        )
    target = target[:room]
    row.prefix_len = len(row.tokens)
    row.target_bytes = len(tokenizer.decode_bytes(target))
    row.extend(target + ([tokenizer.eos_id] if with_target else []), TEXT)
    return row


def _pad(rows: list[_Row], task_ids: Sequence[int], pad_id: int) -> Batch:
    """Right-pad the rows into one batch; labels are the next token after the prefix."""
    B, L = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    modality_ids = torch.full((B, L), PAD_MODALITY, dtype=torch.long)
    markers = torch.full((B, L), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        n, p = len(row.tokens), row.prefix_len
        tokens[i, :n] = torch.tensor(row.tokens)
        modality_ids[i, :n] = torch.tensor(row.modalities)
        markers[i, :n] = torch.tensor(row.markers)
        labels[i, p - 1 : n - 1] = torch.tensor(row.tokens[p:], dtype=torch.long)
    return Batch(
        tokens=tokens,
        task_ids=torch.tensor(list(task_ids), dtype=torch.long),
        prefix_len=torch.tensor([r.prefix_len for r in rows], dtype=torch.long),
        lengths=torch.tensor([len(r.tokens) for r in rows], dtype=torch.long),
        labels=labels,
        target_bytes=torch.tensor([r.target_bytes for r in rows], dtype=torch.long),
        modality_ids=modality_ids,
        markers=markers,
    )


def collate(
    examples: Sequence[MultimodalExample],
    task_ids: Sequence[int],
    tokenizer: TextTokenizer,
    max_len: int,
    with_target: bool = True,
    model_cfg: ModelConfig | None = None,
    rng: np.random.Generator | None = None,
    keys: Sequence[Any] | None = None,
    on_bad: Callable[[int, ConfigError], None] | None = None,
    whole_targets: Container[str] = (),
) -> Batch:
    """Tokenise, prepare media, lay out rows, pad right. Targets are cut to fit `max_len`, except
    those of the tasks named in `whole_targets`: there a target that does not fit is a bad sample.

    `rng` (training only) draws the augmentation; `keys` name the samples in error messages
    (str() of each, taken only for a message). A sample that cannot be laid out (bad media, too
    long) raises a ConfigError, or with `on_bad` is left out of the batch and reported to
    `on_bad(its index, the error)`.
    """
    mcfg = model_cfg or ModelConfig()
    media = _Media()
    rows, kept = [], []
    for b, ex in enumerate(examples):
        where = keys[b] if keys is not None else f"sample {b} of the batch"
        mark = media.mark()
        try:
            whole = ex.task in whole_targets
            rows.append(_lay_out(ex, len(rows), tokenizer, max_len, with_target, mcfg, rng, media, where, whole))
        except ConfigError as e:
            if on_bad is None:
                raise
            media.rollback(mark)
            on_bad(b, e)
            continue
        kept.append(b)
    if not rows:
        raise ConfigError(f"no sample of the batch could be used ({len(examples)} were bad)")
    batch = _pad(rows, [task_ids[b] for b in kept], tokenizer.pad_id)
    media.attach(batch, batch.tokens.shape[1], training=rng is not None)
    return batch


def prompt_only(batch: Batch, pad_id: int) -> Batch:
    """`batch` cut to each row's prefix (task token, media, prompt): where greedy decoding starts.

    The batch `collate(..., with_target=False)` gives, without tokenising the text and preparing
    the media a second time.
    """
    B, L = batch.tokens.shape
    Lp = int(batch.prefix_len.max())
    beyond_BLp = torch.arange(Lp, device=batch.tokens.device)[None] >= batch.prefix_len[:, None]

    def reslot(slots: torch.Tensor | None) -> torch.Tensor | None:  # flat b*L + l -> b*Lp + l
        return None if slots is None else torch.where(slots >= 0, slots // L * Lp + slots % L, slots)

    return dataclasses.replace(
        batch,
        tokens=batch.tokens[:, :Lp].masked_fill(beyond_BLp, pad_id),
        lengths=batch.prefix_len.clone(),
        labels=torch.full_like(batch.labels[:, :Lp], IGNORE),
        target_bytes=torch.zeros_like(batch.target_bytes),
        modality_ids=batch.modality_ids[:, :Lp].masked_fill(beyond_BLp, PAD_MODALITY),
        markers=batch.markers[:, :Lp].masked_fill(beyond_BLp, -1),
        image_slots=reslot(batch.image_slots),
        audio_slots=reslot(batch.audio_slots),
    )
