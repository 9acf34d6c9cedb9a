"""A user's own inputs for a trained model: images and clips from arrays, PIL images or files.

Images become grayscale `[H, W]` arrays as the training data holds them (ink bright on a dark
background, as MNIST's); a colour image is converted to luminance. Audio becomes an
`Audio(samples, sample_rate)`: a WAV file (PCM, any channel count, mixed down to mono) or
samples given with their rate, resampled to the model's rate by the decoder training uses for a
declared task's files (`encoders.audio.read_clip`), so a clip that trained is a clip `predict`
takes.

Shape suffixes: H rows, W columns, C channels, T samples.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pathways_mm.data.sources.base import DEFAULT_RULES, MediaRules
from pathways_mm.data.sources.limits import check_audio_header, check_bytes, open_image
from pathways_mm.encoders.audio import Audio, at_rate, read_clip
from pathways_mm.encoders.vision import MediaError
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_writer

MEDIA = ("image", "audio")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, what PIL's convert("L") uses


def _as_path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, (str, os.PathLike)) else None


def read_image(value: Any, rules: MediaRules = DEFAULT_RULES) -> np.ndarray:
    """An image as a grayscale `[H, W]` uint8 or float array: from a file path, a PIL image, or an
    array (`[H, W]`, or `[H, W, C]` with 1, 3 or 4 channels). A file is held to the media limits
    training holds data to (`rules`: bytes and pixels, checked before its pixels are decoded)."""
    path = _as_path(value)
    if path is not None:
        try:
            check_bytes(path.stat().st_size, f"image {path}", rules)
            with open_image(path, f"image {path}", rules) as img:
                return np.asarray(img.convert("L"))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"cannot read image {path}: {e}") from None
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("L"))
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        rgb_HWC = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
        gray_HW = rgb_HWC.astype(np.float64) @ LUMA
        return np.rint(gray_HW).astype(np.uint8) if arr.dtype == np.uint8 else gray_HW.astype(np.float32)
    return arr


def read_audio(value: Any, sample_rate: int, rules: MediaRules = DEFAULT_RULES) -> Audio:
    """A clip as `Audio` at the model's `sample_rate`: from an audio file path (WAV, FLAC, OGG),
    an `Audio`, or a `(samples, sample_rate)` pair; decoded and resampled as training decodes a
    declared task's files (`encoders.audio.read_clip` and `at_rate`), a file held to the same
    media limits (`rules`: bytes, channels and length, from its header)."""
    path = _as_path(value)
    if path is not None:
        try:
            check_bytes(path.stat().st_size, f"audio {path}", rules)
            check_audio_header(path, f"audio {path}", rules)
            return read_clip(path, sample_rate)
        except OSError as e:
            raise ConfigError(f"cannot read audio {path}: {e}") from None
        except MediaError as e:
            raise ConfigError(f"cannot read audio {path}: {e}") from None
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], (int, np.integer)):
        value = Audio(np.asarray(value[0]), int(value[1]))
    if not isinstance(value, Audio):
        raise ConfigError(
            f"audio given as {type(value).__name__}: give an audio file path or (samples, sample_rate), "
            "e.g. (array, 16000)"
        )
    if value.sample_rate < 1:
        raise ConfigError(f"audio at {value.sample_rate} Hz: a sample rate must be >= 1")
    return at_rate(value, sample_rate)


def check_inputs(task_name: str, modalities: tuple[str, ...], given: Iterable[str]) -> None:
    """ConfigError for an input the task does not read, or an image or clip it needs and lacks
    (text may be left out: an empty prompt)."""
    given = list(given)
    extra = [m for m in given if m not in modalities]
    if extra:
        raise ConfigError(
            f"task '{task_name}' reads {' and '.join(modalities)}, not {' or '.join(extra)}; "
            f"give only {', '.join('--' + m for m in modalities)}"
        )
    missing = [m for m in MEDIA if m in modalities and m not in given]
    if missing:
        raise ConfigError(f"task '{task_name}' needs {' and '.join('--' + m for m in missing)}")


def user_inputs(
    task_name: str,
    modalities: tuple[str, ...],
    image: Any = None,
    audio: Any = None,
    text: str | None = None,
    sample_rate: int = 16_000,
    rules: MediaRules = DEFAULT_RULES,
) -> dict[str, Any]:
    """{modality: raw} for a task that reads `modalities`, checked (`check_inputs`) and read
    (audio at the model's `sample_rate`; files within the media limits `rules`)."""
    given = {"image": image, "audio": audio, "text": text}
    check_inputs(task_name, modalities, [m for m, v in given.items() if v is not None])
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"text must be a string, got {type(text).__name__}")
    out: dict[str, Any] = {}
    if "image" in modalities:
        out["image"] = read_image(image, rules)
    if "audio" in modalities:
        out["audio"] = read_audio(audio, sample_rate, rules)
    if "text" in modalities:
        out["text"] = text or ""
    return out


def write_png(path: Path, image_HW: np.ndarray) -> None:
    """A grayscale uint8 image as a PNG file (written atomically)."""
    with atomic_writer(path, "wb") as f:
        Image.fromarray(np.asarray(image_HW, dtype=np.uint8)).save(f, format="PNG")


def write_wav(path: Path, clip: Audio) -> None:
    """A mono clip as a 16-bit PCM WAV file (written atomically)."""
    samples = np.asarray(clip.samples)
    if samples.dtype != np.int16:
        samples = np.clip(np.rint(samples.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)
    with atomic_writer(path, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(clip.sample_rate)
        w.writeframes(samples.astype("<i2").tobytes())
