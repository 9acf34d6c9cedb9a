"""Audio encoder: torchaudio log-mel spectrogram, SpecAugment masks in training, conv subsampling.

A clip is an `Audio(samples, sample_rate)`: mono int16 (or float in -1..1) at exactly
`model.audio.sample_rate`. Files and clips at other rates go through one decoder, `read_clip` and
`at_rate`, which training (declared tasks), `predict` and `pathways_mm.load` all use: channels
averaged, resampled to the model's rate. The encoder itself refuses a clip at another rate, so a
task whose own code makes clips cannot be resampled behind its back. The encoder maps a padded batch to `[N, M, d_model]` with a length mask; padded
frames are zeroed before every convolution, so a clip encodes the same whatever shares its batch.

Shape suffixes: N clips, T samples, C channels, F mel bins, M frames after subsampling, D d_model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from pathways_mm.config import AudioConfig
from pathways_mm.encoders.vision import MediaError


class Audio(NamedTuple):
    samples: np.ndarray  # [T] int16, or float in -1..1
    sample_rate: int


def at_rate(clip: Audio, sample_rate: int) -> Audio:
    """`clip` at `sample_rate`: kept as it is when already there, else as float32 in -1..1
    resampled with torchaudio's windowed sinc (what training does to a declared task's files)."""
    if clip.sample_rate == sample_rate:
        return clip
    samples = np.asarray(clip.samples)
    x = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
    resampled = torchaudio.functional.resample(torch.from_numpy(x), clip.sample_rate, sample_rate).numpy()
    return Audio(np.clip(resampled, -1.0, 1.0).astype(np.float32), sample_rate)


def read_clip(src, sample_rate: int) -> Audio:
    """An audio file (a path or a binary stream; WAV, FLAC, OGG: anything libsndfile reads) as mono
    float32 samples at `sample_rate`: channels averaged, then `at_rate`. MediaError if unreadable."""
    import soundfile  # a reader only files need: the built-in tasks make their clips in memory

    try:
        samples_TC, rate = soundfile.read(src, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise MediaError(f"not an audio file libsndfile can read, e.g. WAV or FLAC ({e})") from None
    clip = at_rate(Audio(samples_TC.mean(axis=1), int(rate)), sample_rate)
    return Audio(np.clip(clip.samples, -1.0, 1.0).astype(np.float32), sample_rate)


def num_frames(num_samples: int, cfg: AudioConfig) -> int:
    return num_samples // cfg.hop_length + 1  # centred STFT frames


def num_audio_tokens(num_samples: int, cfg: AudioConfig) -> int:
    """Embeddings a clip of `num_samples` becomes: two stride-2 convolutions over its frames."""
    return math.ceil(math.ceil(num_frames(num_samples, cfg) / 2) / 2)


def prepare_audio(raw, cfg: AudioConfig) -> torch.Tensor:
    """A raw clip as a float `[T]` tensor in -1..1, after checking rate, shape, length and values."""
    if not isinstance(raw, Audio):
        raise MediaError(f"audio must be an Audio(samples, sample_rate), got {type(raw).__name__}")
    if raw.sample_rate != cfg.sample_rate:
        raise MediaError(
            f"audio at {raw.sample_rate} Hz; the model expects {cfg.sample_rate} Hz "
            "(resample the dataset, or set model.audio.sample_rate)"
        )
    arr = np.asarray(raw.samples)
    if arr.ndim != 1:
        raise MediaError(f"audio of shape {tuple(arr.shape)}: expected mono samples [T]")
    if arr.size < cfg.n_fft:
        raise MediaError(f"audio clip of {arr.size} samples is empty or shorter than one frame ({cfg.n_fft})")
    if arr.size > cfg.max_seconds * cfg.sample_rate:
        raise MediaError(f"audio clip of {arr.size / cfg.sample_rate:.2f} s is longer than model.audio.max_seconds")
    if arr.dtype == np.int16:
        return torch.from_numpy(arr.astype(np.float32) / 32768.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise MediaError(f"audio of dtype {arr.dtype}: expected int16 or float samples")
    if not np.isfinite(arr).all() or np.abs(arr).max() > 1.0:
        raise MediaError("audio is corrupt: float samples must be finite and within -1..1")
    return torch.from_numpy(arr.astype(np.float32))


def spec_augment_params(num_samples: int, cfg: AudioConfig, rng: np.random.Generator) -> list[int]:
    """One frequency and one time mask: (f0, f_width, t0, t_width), drawn where collate draws."""
    fw = int(rng.integers(0, cfg.freq_mask + 1))
    f0 = int(rng.integers(0, cfg.n_mels - fw + 1))
    frames = num_frames(num_samples, cfg)
    tw = int(rng.integers(0, min(cfg.time_mask, frames // 5) + 1))
    t0 = int(rng.integers(0, frames - tw + 1))
    return [f0, fw, t0, tw]


def pad_audio(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `[T_i]` clips into `[N, T_max]` (zeros on the right) + lengths `[N]`."""
    lengths = torch.tensor([c.numel() for c in clips], dtype=torch.long)
    out = clips[0].new_zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        out[i, : c.numel()] = c
    return out, lengths


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    out = torch.zeros(length, dim)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    return out


class AudioEncoder(nn.Module):
    """Log-mel -> per-clip normalisation -> SpecAugment -> 2 x (conv stride 2, GELU) -> `[N, M, D]`."""

    def __init__(self, cfg: AudioConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            pad_mode="constant",  # zeros at the ends, as batch padding: the last frames do not depend on the batch
        )
        self.conv1 = nn.Conv1d(cfg.n_mels, d_model, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        max_tokens = num_audio_tokens(int(cfg.max_seconds * cfg.sample_rate), cfg)
        self.register_buffer("pos", _sinusoids(max_tokens, d_model), persistent=False)
        self.norm = nn.LayerNorm(d_model)

    @staticmethod
    def _zero_beyond(x_NCF: torch.Tensor, num_N: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(x_NCF.shape[-1], device=x_NCF.device)[None] < num_N[:, None]
        return x_NCF * keep[:, None]

    def forward(
        self, audio_NT: torch.Tensor, lengths_N: torch.Tensor, masks_N4: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frames_N = lengths_N // self.cfg.hop_length + 1
        spec = torch.log(self.mel(audio_NT.float()) + 1e-6)  # [N, mels, F], float32 whatever the model dtype
        valid = (torch.arange(spec.shape[-1], device=spec.device)[None] < frames_N[:, None])[:, None]  # [N, 1, F]
        count = valid.sum((1, 2)) * spec.shape[1]
        mean = (spec * valid).sum((1, 2)) / count
        var = (((spec - mean[:, None, None]) * valid) ** 2).sum((1, 2)) / count
        spec = (spec - mean[:, None, None]) / (var[:, None, None].sqrt() + 1e-5)
        if masks_N4 is not None:
            f = torch.arange(spec.shape[1], device=spec.device)[None]
            t = torch.arange(spec.shape[2], device=spec.device)[None]
            f0, fw, t0, tw = masks_N4.unbind(-1)
            fmask = (f >= f0[:, None]) & (f < (f0 + fw)[:, None])  # [N, mels]
            tmask = (t >= t0[:, None]) & (t < (t0 + tw)[:, None])  # [N, F]
            spec = spec.masked_fill(fmask[:, :, None] | tmask[:, None, :], 0.0)
        x = self._zero_beyond(spec, frames_N).to(self.conv1.weight.dtype)
        half_N = (frames_N + 1) // 2
        x = self._zero_beyond(F.gelu(self.conv1(x)), half_N)
        num_N = (half_N + 1) // 2
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [N, M, D]
        x_NMD = self.norm(x + self.pos[: x.shape[1]].to(x.dtype))
        mask_NM = torch.arange(x.shape[1], device=x.device)[None] < num_N[:, None]
        return x_NMD, mask_NM
