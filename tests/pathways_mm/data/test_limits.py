"""Media larger than the data.max_* limits (and clips longer than model.audio.max_seconds) are bad
samples, refused from the file's size or header before they are decoded."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pathways_mm.config import RANGES, DataConfig, DeclaredTaskConfig, ExperimentConfig, SourceConfig
from pathways_mm.data.datasets import encode
from pathways_mm.data.declared import declared_class
from pathways_mm.data.sources import BadSample, MediaRules, open_source
from pathways_mm.data.sources.base import DEFAULT_RULES, Row
from pathways_mm.data.sources.media import decode_audio, decode_image

RATE = 16_000


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit grayscale) and whose pixels are one short IDAT:
    what Pillow knows after `Image.open` without decoding, as a decompression bomb shows it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def wav(frames: int, channels: int = 1, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((frames, channels), np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def row(tmp_path: Path, value, rules: MediaRules = DEFAULT_RULES) -> Row:
    return Row({"m": value}, tmp_path, lambda: "m.jsonl line 2", rules)


def test_the_limits_are_ranged_config_keys_with_safe_defaults():
    d = DataConfig()
    for key in ("max_media_bytes", "max_image_pixels", "max_audio_channels"):
        lo, hi = RANGES[f"data.{key}"]
        assert lo <= getattr(d, key) <= hi
    assert d.max_image_pixels < 12_000 * 12_000  # the bomb is refused by default
    rules = MediaRules.from_config(ExperimentConfig())
    assert rules == DEFAULT_RULES and rules.max_audio_seconds == ExperimentConfig().model.audio.max_seconds


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(12_000, 12_000))  # 144 megapixels in a few bytes
    with pytest.raises(BadSample, match=r"bomb.png: an image of 12000 x 12000 pixels; data.max_image_pixels allows"):
        decode_image(row(tmp_path, "bomb.png"), "m")
    small = dataclasses.replace(DEFAULT_RULES, max_image_pixels=28 * 28 - 1)
    data = png_header(28, 28)
    with pytest.raises(BadSample, match=r"^m.jsonl line 2 field 'm': an image of 28 x 28 pixels"):
        decode_image(row(tmp_path, data, small), "m")  # file bytes (a shard member, an HF feature) too


def test_oversized_files_and_fields_are_refused_before_reading(tmp_path, examples):
    png = (examples / "images" / "train-0000.png").read_bytes()
    (tmp_path / "ok.png").write_bytes(png)
    tight = dataclasses.replace(DEFAULT_RULES, max_bytes=len(png) - 1)
    with pytest.raises(BadSample, match=rf"ok.png: {len(png)} bytes of media; data.max_media_bytes allows"):
        decode_image(row(tmp_path, "ok.png", tight), "m")
    with pytest.raises(BadSample, match="data.max_media_bytes"):
        decode_image(row(tmp_path, {"bytes": png, "path": None}, tight), "m")
    assert decode_image(row(tmp_path, "ok.png"), "m").shape == (28, 28)


@pytest.mark.parametrize(
    "clip,rules,message",
    [
        (wav(RATE * 5), {}, r"a clip of 5.00 s is longer than model.audio.max_seconds \(4.0\)"),
        (wav(100, channels=20), {}, r"20 audio channels; data.max_audio_channels allows 16"),
        (wav(RATE, channels=2), {"max_bytes": 100_000}, r"16000 frames x 2 channels decode to 128000 bytes"),
        (wav(RATE, rate=8_000), {"max_audio_seconds": 1.5}, r"a clip of 2.00 s"),  # seconds at the file's rate
    ],
)
def test_audio_past_the_limits_is_refused_from_its_header(tmp_path, clip, rules, message):
    (tmp_path / "a.wav").write_bytes(clip)
    r = dataclasses.replace(DEFAULT_RULES, **rules)
    with pytest.raises(BadSample, match=message):
        decode_audio(row(tmp_path, "a.wav", r), "m", RATE)
    with pytest.raises(BadSample, match=message):
        decode_audio(row(tmp_path, clip, r), "m", RATE)  # file bytes: the stream is read from its start after


def test_a_clip_within_the_limits_decodes_whole(tmp_path):
    clip = wav(RATE * 2, channels=2)
    assert len(decode_audio(row(tmp_path, clip), "m", RATE).samples) == RATE * 2


def test_oversized_shard_members_and_manifest_rows_are_refused_from_the_index(tmp_path):
    path = tmp_path / "s-000.tar"
    with tarfile.open(path, "w") as tf:
        for name, body in (("k0.png", b"x" * 5000), ("k0.txt", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    rules = dataclasses.replace(DEFAULT_RULES, max_bytes=4096)
    src = open_source(SourceConfig(path=str(path)), ["png", "txt"], "train", tmp_path, rules)
    with pytest.raises(BadSample, match=r"s-000.tar key k0: the .png member has 5000 bytes; data.max_media_bytes"):
        src[0]
    (tmp_path / "m.jsonl").write_text(json.dumps({"t": "1"}) + "\n" + json.dumps({"t": "x" * 5000}) + "\n")
    spec = DeclaredTaskConfig(
        inputs={"t": "text"}, target="t", splits={"train": SourceConfig(path=str(tmp_path / "m.jsonl"))}
    )
    task = declared_class("limits_rows", spec, RATE, rules)()
    src = task.open_split("train", tmp_path)
    assert encode(task, src[0]).target_text == "1"
    with pytest.raises(BadSample, match=r"m.jsonl line 2: a row of 5\d\d\d bytes; data.max_media_bytes allows 4096"):
        src[1]
