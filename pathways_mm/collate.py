"""Collation: `MultimodalExample`s -> one padded `Batch` laid out as the multimodal sentence.

Each row is `[task][<img> patches </img>][<aud> frames </aud>][prompt text][target][eos]`, the
segments in the order the task gave them. Text positions hold token ids; image and audio
positions hold the pad id and are filled by the encoders' embeddings (`*_slots` say where);
start/end markers are learned embeddings (`markers`). Training augmentation (random affine,
SpecAugment) is drawn here from the caller's generator, so a batch is a pure function of its key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from pathways_mm.config import ModelConfig
from pathways_mm.encoders.audio import num_audio_tokens, pad_audio, prepare_audio, spec_augment_params
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.encoders.vision import MediaError, num_patches, pad_images, prepare_image
from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import MODALITIES, MultimodalExample

IGNORE = -100
PAD_MODALITY = -1
TEXT, IMAGE, AUDIO = (MODALITIES.index(m) for m in ("text", "image", "audio"))


def marker_id(modality: int, end: bool) -> int:
    """Row of the marker embedding table: a start and an end marker per modality."""
    return 2 * modality + int(end)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] token ids; position 0 is the task slot, media positions hold pad
    task_ids: torch.Tensor  # [B]
    prefix_len: torch.Tensor  # [B] task token + media + prompt
    lengths: torch.Tensor  # [B] real length (the rest is padding)
    labels: torch.Tensor  # [B, L] next token at each position, IGNORE where no loss
    target_bytes: torch.Tensor  # [B] UTF-8 bytes of the target text that was kept
    modality_ids: torch.Tensor  # [B, L] index into MODALITIES, PAD_MODALITY beyond `lengths`
    markers: torch.Tensor  # [B, L] marker_id(...) at segment boundaries, -1 elsewhere
    images: torch.Tensor | None = None  # [Ni, 1, S, W_max] prepared images, zero-padded
    image_widths: torch.Tensor | None = None  # [Ni]
    image_slots: torch.Tensor | None = None  # [Ni, P_max] flat index into B*L, -1 beyond the image
    audio: torch.Tensor | None = None  # [Na, T_max] float samples, zero-padded
    audio_lengths: torch.Tensor | None = None  # [Na]
    audio_slots: torch.Tensor | None = None  # [Na, M_max]
    audio_masks: torch.Tensor | None = None  # [Na, 4] SpecAugment (f0, f_width, t0, t_width); None in eval

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _slots(rows_offsets: list[tuple[int, int, int]], L: int) -> torch.Tensor:
    """[(row, start, count)] -> `[N, max count]` flat positions, -1 past each count."""
    width = max(c for _, _, c in rows_offsets)
    out = torch.full((len(rows_offsets), width), -1, dtype=torch.long)
    for i, (b, start, count) in enumerate(rows_offsets):
        out[i, :count] = b * L + start + torch.arange(count)
    return out


def collate(
    examples: Sequence[MultimodalExample],
    task_ids: Sequence[int],
    tokenizer: TextTokenizer,
    max_len: int,
    with_target: bool = True,
    model_cfg: ModelConfig | None = None,
    rng: np.random.Generator | None = None,
    keys: Sequence[str] | None = None,
) -> Batch:
    """Tokenise, prepare media, lay out rows, pad right. Targets are cut to fit `max_len`.

    `rng` (training only) draws the augmentation; `keys` name the samples in error messages.
    """
    mcfg = model_cfg or ModelConfig()
    rows, mods, marks, prefixes, nbytes = [], [], [], [], []
    images, image_at, clips, clip_at, clip_masks = [], [], [], [], []
    for b, ex in enumerate(examples):
        row, mod, mark = [tokenizer.bos_id], [TEXT], [-1]  # slot 0 is replaced by the task embedding
        try:
            for modality, raw in ex.segments:
                if modality == "text":
                    if not isinstance(raw, str):
                        raise MediaError(f"a text segment must be a string, got {type(raw).__name__}")
                    ids = tokenizer.encode(raw)
                    row += ids
                    mod += [TEXT] * len(ids)
                    mark += [-1] * len(ids)
                    continue
                if modality == "image":
                    img = prepare_image(raw, mcfg.vision, rng)
                    n, m = num_patches(img.shape[-1], mcfg.vision), IMAGE
                    images.append(img)
                    image_at.append((b, len(row) + 1, n))
                elif modality == "audio":
                    clip = prepare_audio(raw, mcfg.audio)
                    n, m = num_audio_tokens(clip.numel(), mcfg.audio), AUDIO
                    clips.append(clip)
                    clip_at.append((b, len(row) + 1, n))
                    if rng is not None:
                        clip_masks.append(spec_augment_params(clip.numel(), mcfg.audio, rng))
                else:
                    raise MediaError(f"unknown modality {modality!r}; choose from {list(MODALITIES)}")
                row += [tokenizer.pad_id] * (n + 2)
                mod += [m] * (n + 2)
                mark += [marker_id(m, False)] + [-1] * n + [marker_id(m, True)]
        except MediaError as e:
            where = keys[b] if keys is not None else f"sample {b} of the batch"
            raise ConfigError(f"task '{ex.task}', {where}: {e}") from None
        if len(row) >= max_len:
            raise ConfigError(
                f"task '{ex.task}': an input of {len(row)} positions (task token, media and prompt) does not fit "
                f"data.max_len={max_len}; raise data.max_len"
            )
        target = tokenizer.encode(ex.target_text) if with_target else []
        target = target[: max_len - len(row) - 1]
        prefixes.append(len(row))
        nbytes.append(len(tokenizer.decode_bytes(target)))
        tail = target + ([tokenizer.eos_id] if with_target else [])
        rows.append(row + tail)
        mods.append(mod + [TEXT] * len(tail))
        marks.append(mark + [-1] * len(tail))
    B, L = len(rows), max(len(r) for r in rows)
    tokens = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    modality_ids = torch.full((B, L), PAD_MODALITY, dtype=torch.long)
    markers = torch.full((B, L), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        n, p = len(row), prefixes[i]
        tokens[i, :n] = torch.tensor(row)
        modality_ids[i, :n] = torch.tensor(mods[i])
        markers[i, :n] = torch.tensor(marks[i])
        labels[i, p - 1 : n - 1] = torch.tensor(row[p:], dtype=torch.long)
    batch = Batch(
        tokens=tokens,
        task_ids=torch.tensor(list(task_ids), dtype=torch.long),
        prefix_len=torch.tensor(prefixes, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        labels=labels,
        target_bytes=torch.tensor(nbytes, dtype=torch.long),
        modality_ids=modality_ids,
        markers=markers,
    )
    if images:
        batch.images, batch.image_widths = pad_images(images)
        batch.image_slots = _slots(image_at, L)
    if clips:
        batch.audio, batch.audio_lengths = pad_audio(clips)
        batch.audio_slots = _slots(clip_at, L)
        batch.audio_masks = torch.tensor(clip_masks, dtype=torch.long) if rng is not None else None
    return batch



def prompt_only(batch: Batch, pad_id: int) -> Batch:
    """`batch` cut to each row's prefix (task token, media, prompt): where greedy decoding starts.

    The batch `collate(..., with_target=False)` gives, without tokenising the text and preparing
    the media a second time.
    """
    B, L = batch.tokens.shape
    Lp = int(batch.prefix_len.max())
    beyond_BL = torch.arange(Lp, device=batch.tokens.device)[None] >= batch.prefix_len[:, None]

    def reslot(slots: torch.Tensor | None) -> torch.Tensor | None:  # flat b*L + l -> b*Lp + l
        return None if slots is None else torch.where(slots >= 0, slots // L * Lp + slots % L, slots)

    return dataclasses.replace(
        batch,
        tokens=batch.tokens[:, :Lp].masked_fill(beyond_BL, pad_id),
        lengths=batch.prefix_len.clone(),
        labels=torch.full_like(batch.labels[:, :Lp], IGNORE),
        target_bytes=torch.zeros_like(batch.target_bytes),
        modality_ids=batch.modality_ids[:, :Lp].masked_fill(beyond_BL, PAD_MODALITY),
        markers=batch.markers[:, :Lp].masked_fill(beyond_BL, -1),
        image_slots=reslot(batch.image_slots),
        audio_slots=reslot(batch.audio_slots),
    )
