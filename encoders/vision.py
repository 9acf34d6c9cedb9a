"""Image encoder: torchvision transforms per image, then a conv stem cut into ViT-style patches.

Images are grayscale `[H, W]` arrays (uint8 0..255, or float 0..1) with ink bright on a dark
background. `prepare_image` resizes to `image_size` rows, keeps the aspect (a strip of k digits
stays k times as wide), and in training applies a random affine. The encoder turns a padded
batch into `[N, P, d_model]` patch embeddings in column-major order, so a narrower image's
patches are a prefix and its mask is `patch < num_patches`.

Shape suffixes: N images, C channels, H rows, W columns, P patches, D d_model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pathways_mm.config import VisionConfig


class MediaError(ValueError):
    """A sample's image or audio cannot be used; collate adds which task and sample."""


def image_width(height: int, width: int, cfg: VisionConfig) -> int:
    """Width after resizing to `image_size` rows: the aspect kept, rounded to whole patches."""
    p = cfg.patch_size
    return max(p, round(width * cfg.image_size / height / p) * p)


def num_patches(width: int, cfg: VisionConfig) -> int:
    """Patches of a prepared image `width` pixels wide."""
    return (cfg.image_size // cfg.patch_size) * (width // cfg.patch_size)


def prepare_image(img, cfg: VisionConfig, rng: np.random.Generator | None = None) -> torch.Tensor:
    """A raw image as a float `[1, image_size, W]` tensor in 0..1; random affine when `rng` is given."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise MediaError(f"image of shape {tuple(arr.shape)}: expected a grayscale [height, width] array")
    h, w = arr.shape
    if h < 4 or w < 4:
        raise MediaError(f"image of shape {(h, w)} is too small (at least 4x4 pixels)")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise MediaError("float image must hold finite values in 0..1")
        x = torch.from_numpy(arr.astype(np.float32))
    else:
        raise MediaError(f"image of dtype {arr.dtype}: expected uint8 or float")
    width = image_width(h, w, cfg)
    cols = width // cfg.patch_size
    if cols > cfg.max_patches_per_row:
        raise MediaError(
            f"image {h}x{w} becomes {cols} patches wide, more than model.vision.max_patches_per_row="
            f"{cfg.max_patches_per_row}"
        )
    x = TF.resize(x[None], [cfg.image_size, width], antialias=True)
    if rng is not None:
        aspect = width / cfg.image_size
        # a wide strip rotates less: its ends would otherwise leave the frame
        angle = float(rng.uniform(-1, 1)) * cfg.max_rotate / aspect
        tx = float(rng.uniform(-1, 1)) * cfg.max_translate * cfg.image_size
        ty = float(rng.uniform(-1, 1)) * cfg.max_translate * cfg.image_size
        scale = 1.0 + float(rng.uniform(-1, 1)) * cfg.max_scale
        x = TF.affine(
            x,
            angle=angle,
            translate=[tx, ty],
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
    return x.clamp_(0, 1)


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prepared `[1, S, W_i]` images into `[N, 1, S, W_max]` (zeros on the right) + widths `[N]`."""
    widths = torch.tensor([im.shape[-1] for im in images], dtype=torch.long)
    out = images[0].new_zeros(len(images), 1, images[0].shape[-2], int(widths.max()))
    for i, im in enumerate(images):
        out[i, :, :, : im.shape[-1]] = im
    return out, widths


class VisionEncoder(nn.Module):
    """Conv stem + patch projection + learned row/column embeddings -> `[N, P, d_model]`, mask `[N, P]`.

    Padding is zero, like the stem's own zero padding, so an image encodes the same whatever
    else shares its batch.
    """

    def __init__(self, cfg: VisionConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(1, cfg.stem_channels, 3, padding=1)
        self.patch = nn.Conv2d(cfg.stem_channels, d_model, cfg.patch_size, stride=cfg.patch_size)
        self.row_embed = nn.Embedding(cfg.image_size // cfg.patch_size, d_model)
        self.col_embed = nn.Embedding(cfg.max_patches_per_row, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, images_NCHW: torch.Tensor, widths_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch(F.gelu(self.stem(images_NCHW)))  # [N, D, rows, cols]
        N, D, rows, cols = x.shape
        pos = self.row_embed.weight[:, None] + self.col_embed.weight[None, :cols]  # [rows, cols, D]
        x = x.permute(0, 3, 2, 1) + pos.transpose(0, 1)  # [N, cols, rows, D]: column-major
        x_NPD = self.norm(x.reshape(N, cols * rows, D))
        num_N = (widths_N // self.cfg.patch_size) * rows
        mask_NP = torch.arange(cols * rows, device=x.device)[None] < num_N[:, None]
        return x_NPD, mask_NP
