"""Reading a user's images and clips: files, PIL images and arrays give the same input."""

import numpy as np
import pytest
from PIL import Image

from pathways_mm.encoders.audio import Audio
from pathways_mm.errors import ConfigError
from pathways_mm.inference.inputs import (
    check_inputs,
    read_audio,
    read_image,
    read_wav,
    user_inputs,
    write_png,
    write_wav,
)

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
    clip = read_wav(tmp_path / "a.wav")
    assert clip.sample_rate == 16000 and clip.samples.dtype == np.int16 and len(clip.samples) == 16000
    want = samples if dtype == np.int16 else np.rint(samples.astype(np.float64) * 32767).astype(np.int16)
    assert np.array_equal(clip.samples, want)
    assert read_audio(str(tmp_path / "a.wav")).sample_rate == 16000


def test_a_stereo_wav_is_mixed_down_to_mono(tmp_path):
    import wave

    left, right = np.full(800, 1000, np.int16), np.full(800, 3000, np.int16)
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.stack([left, right], 1).tobytes())
    clip = read_wav(tmp_path / "s.wav")
    assert clip.samples.shape == (800,) and np.allclose(clip.samples, 2000 / 32768)


def test_audio_needs_its_rate():
    assert read_audio((np.zeros(4000, np.int16), 16000)).sample_rate == 16000
    with pytest.raises(ConfigError, match="sample_rate"):
        read_audio(np.zeros(4000, np.int16))


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
        read_wav(tmp_path / "bad.wav")


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
