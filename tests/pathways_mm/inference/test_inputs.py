"""Reading a user's images and clips: files, PIL images and arrays give the same input, and a
clip at another rate is resampled exactly as training resamples a declared task's files."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from PIL import Image

from pathways_mm.data.sources import Row
from pathways_mm.data.sources.media import decode_audio
from pathways_mm.encoders.audio import Audio
from pathways_mm.errors import ConfigError
from pathways_mm.inference.inputs import (
    check_inputs,
    read_audio,
    read_image,
    user_inputs,
    write_png,
    write_wav,
)
from tests.pathways_mm.data.test_limits import png_header, wav

RNG = np.random.default_rng(0)
DIGIT = RNG.integers(0, 256, (28, 28), dtype=np.uint8)


def test_an_image_reads_the_same_from_a_png_a_pil_image_and_an_array(tmp_path):
    write_png(tmp_path / "d.png", DIGIT)
    for value in (tmp_path / "d.png", str(tmp_path / "d.png"), Image.fromarray(DIGIT), DIGIT):
        got = read_image(value)
        assert got.dtype == np.uint8 and np.array_equal(got, DIGIT)


def test_a_colour_image_becomes_its_luminance(tmp_path):
    rgb = np.stack([DIGIT] * 3, axis=-1)
    assert np.array_equal(read_image(rgb), DIGIT)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(read_image(tmp_path / "c.png"), DIGIT)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(read_image(Image.fromarray(rgba)), DIGIT)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_wav_file_round_trips(tmp_path, dtype):
    samples = (RNG.uniform(-0.5, 0.5, 16000) * (32767 if dtype == np.int16 else 1)).astype(dtype)
    write_wav(tmp_path / "a.wav", Audio(samples, 16000))
    clip = read_audio(str(tmp_path / "a.wav"), 16000)
    assert clip.sample_rate == 16000 and len(clip.samples) == 16000
    want = samples if dtype == np.int16 else np.rint(samples.astype(np.float64) * 32767).astype(np.int16)
    # the encoder reads int16 as x / 32768: a 16-bit file gives the very floats of its int16 samples
    assert np.array_equal(clip.samples, want.astype(np.float32) / 32768.0)


def test_a_stereo_wav_is_mixed_down_to_mono(tmp_path):
    import wave

    left, right = np.full(800, 1000, np.int16), np.full(800, 3000, np.int16)
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.stack([left, right], 1).tobytes())
    clip = read_audio(tmp_path / "s.wav", 16000)
    assert clip.samples.shape == (800,) and np.allclose(clip.samples, 2000 / 32768)


def row_of(path: Path) -> Row:
    return Row({"audio": path.name}, path.parent, lambda: f"{path} row 1")


@pytest.mark.parametrize("rate,fmt", [(22_050, "WAV"), (44_100, "WAV"), (8_000, "FLAC"), (16_000, "FLAC")])
def test_a_clip_at_any_rate_reads_as_training_reads_it(tmp_path, rate, fmt):
    """`predict` and `load` decode a file with training's decoder: the same samples, bit for bit."""
    t = np.arange(rate // 2) / rate
    path = tmp_path / f"tone.{fmt.lower()}"
    soundfile.write(path, 0.4 * np.sin(2 * np.pi * 440 * t), rate, format=fmt, subtype="PCM_16")
    trained = decode_audio(row_of(path), "audio", 16_000)
    asked = read_audio(str(path), 16_000)
    assert asked.sample_rate == trained.sample_rate == 16_000
    assert len(asked.samples) == 8_000 and np.array_equal(asked.samples, trained.samples)
    samples, file_rate = soundfile.read(path, dtype="float32")
    given = read_audio((samples, file_rate), 16_000)  # in Python: (samples, rate) at the file's rate
    assert np.array_equal(given.samples, trained.samples)


def test_int16_samples_at_another_rate_are_resampled_as_floats():
    samples = (RNG.uniform(-0.5, 0.5, 22_050) * 32767).astype(np.int16)
    clip = read_audio((samples, 22_050), 16_000)
    want = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    assert clip.samples.dtype == np.float32 and np.allclose(clip.samples, AF.resample(want, 22_050, 16_000).numpy())


def test_audio_needs_its_rate():
    assert read_audio((np.zeros(4000, np.int16), 16000), 16000).sample_rate == 16000
    with pytest.raises(ConfigError, match="sample_rate"):
        read_audio(np.zeros(4000, np.int16), 16000)
    with pytest.raises(ConfigError, match="must be >= 1"):
        read_audio((np.zeros(4000, np.int16), 0), 16000)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b"not a png"), "cannot read image"),
        (lambda p: None, "cannot read image"),  # missing
    ],
)
def test_an_unreadable_image_names_the_file(tmp_path, make, message):
    make(tmp_path / "bad.png")
    with pytest.raises(ConfigError, match=message) as e:
        read_image(tmp_path / "bad.png")
    assert "bad.png" in str(e.value)


def test_an_unreadable_wav_names_the_file(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(ConfigError, match="cannot read audio .*bad.wav"):
        read_audio(tmp_path / "bad.wav", 16000)


@pytest.mark.parametrize(
    "modalities,given,message",
    [
        (("image",), ["image", "audio"], "reads image, not audio"),
        (("text",), ["image"], "reads text, not image"),
        (("image", "audio"), ["image"], "needs --audio"),
        (("audio",), [], "needs --audio"),
    ],
)
def test_inputs_must_be_the_tasks(modalities, given, message):
    with pytest.raises(ConfigError, match=message):
        check_inputs("t", modalities, given)


def test_text_may_be_left_out():
    assert user_inputs("t", ("text",)) == {"text": ""}
    assert user_inputs("t", ("text",), text="hi") == {"text": "hi"}


def test_files_given_to_a_model_are_held_to_the_data_limits(tmp_path):
    """predict --input can come from someone else: a bomb or a 64-channel clip is refused from its header."""
    (tmp_path / "bomb.png").write_bytes(png_header(12_000, 12_000))
    with pytest.raises(ConfigError, match="bomb.png: an image of 12000 x 12000 pixels; data.max_image_pixels"):
        read_image(tmp_path / "bomb.png")
    (tmp_path / "wide.wav").write_bytes(wav(1600, channels=64))
    with pytest.raises(ConfigError, match="wide.wav: 64 audio channels; data.max_audio_channels"):
        read_audio(tmp_path / "wide.wav", 16000)
    with pytest.raises(ConfigError, match="cannot read audio .*missing.wav"):
        read_audio(tmp_path / "missing.wav", 16000)
