"""The batch the model reads: one padded multimodal sentence per row (built by `data.collate`).

Shape suffixes: B rows (sequences), L positions, Ni images and Na audio clips in the batch,
P patches per image, M frames per clip, S image rows, W image columns, A audio samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from pathways_mm.tasks.base import MODALITIES

IGNORE = -100  # label of a position that is not scored
PAD_MODALITY = -1  # modality id of padding: route telemetry skips it
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
    images: torch.Tensor | None = None  # [Ni, 1, S, W] prepared images, zero-padded to the widest
    image_widths: torch.Tensor | None = None  # [Ni]
    image_slots: torch.Tensor | None = None  # [Ni, P] flat index into B*L, -1 beyond the image
    audio: torch.Tensor | None = None  # [Na, A] float samples, zero-padded
    audio_lengths: torch.Tensor | None = None  # [Na]
    audio_slots: torch.Tensor | None = None  # [Na, M]
    audio_masks: torch.Tensor | None = None  # [Na, 4] SpecAugment (f0, f_width, t0, t_width); None in eval

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.pin_memory() for f in fields(self)})

    def packed(self) -> PackedBatch:
        """The batch as one flat tensor per dtype (two, where it holds media), for handing over
        between processes: each tensor a process receives is a shared-memory segment of its own."""
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        layout = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            group = groups.setdefault(v.dtype, [])
            layout.append((f.name, v.dtype, sum(t.numel() for t in group), tuple(v.shape)))
            group.append(v.reshape(-1))
        return PackedBatch({dtype: torch.cat(ts) for dtype, ts in groups.items()}, tuple(layout))


@dataclass
class PackedBatch:
    """A `Batch` as one flat buffer per dtype and where each field lies in it (`Batch.packed`)."""

    buffers: dict[torch.dtype, torch.Tensor]
    layout: tuple[tuple[str, torch.dtype, int, tuple[int, ...]], ...]  # field, dtype, offset, shape

    def unpacked(self) -> Batch:
        """The batch again: every field a view into its buffer (nothing is copied)."""
        views = {}
        for name, dtype, offset, shape in self.layout:
            numel = math.prod(shape)
            views[name] = self.buffers[dtype][offset : offset + numel].view(shape)
        return Batch(**views)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch({d: b.pin_memory() for d, b in self.buffers.items()}, self.layout)
