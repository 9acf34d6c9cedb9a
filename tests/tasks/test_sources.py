"""The offline media sources: digit images and espeak speech banks are well-formed, rebuild to the
same bytes from one seed, and keep their test splits apart (images, voices)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pathways_mm.errors import ConfigError
from pathways_mm.tasks import digits, speech
from pathways_mm.tasks.digits import digit_images
from pathways_mm.tasks.speech import SAMPLE_RATE, split_voices, spoken_digits, spoken_numbers, synthesize

NUM_CLIPS = 40  # small speech banks keep the test quick; the recipe is the full one's


def bank_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "banks").iterdir())}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, {split: digit_images(split, root, 0) for split in ("train", "test")}


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    banks = {
        (fn.__name__, split): fn(split, root, 0, num_clips=NUM_CLIPS)
        for fn in (spoken_digits, spoken_numbers)
        for split in ("train", "test")
    }
    return root, banks


def test_images_are_well_formed(images):
    _, banks = images
    for split, bank in banks.items():
        assert bank.images.dtype == np.uint8 and bank.images.shape == (len(bank), 28, 28)
        assert bank.labels.dtype == np.int64 and set(bank.labels.tolist()) == set(range(10))
        assert set(bank.source.tolist()) == {"sklearn", "mnist"}, split
        assert bank.images.max() == 255 and bank.images[:, 0, :].max() < 64  # ink inside a margin
    assert 0.15 < len(banks["test"]) / (len(banks["train"]) + len(banks["test"])) < 0.25


def test_no_image_in_both_splits(images):
    _, banks = images
    train = {img.tobytes() for img in banks["train"].images}
    assert not any(img.tobytes() in train for img in banks["test"].images)


def test_image_banks_rebuild_byte_identical(images, tmp_path):
    root, _ = images
    for split in ("train", "test"):
        digit_images(split, tmp_path, 0)
    assert bank_bytes(tmp_path) == bank_bytes(root)


def test_image_bank_depends_on_seed(images, tmp_path):
    _, banks = images
    other = digit_images("test", tmp_path, 1)
    assert not np.array_equal(other.labels, banks["test"].labels)


def test_audio_banks_are_well_formed(audio):
    _, banks = audio
    for (name, split), bank in banks.items():
        seconds = 1.0 if name == "spoken_digits" else 2.5
        assert bank.audio.dtype == np.int16 and bank.audio.shape == (NUM_CLIPS, round(seconds * SAMPLE_RATE))
        assert bank.sample_rate == SAMPLE_RATE
        lengths = {len(t) for t in bank.texts}
        assert lengths == ({1} if name == "spoken_digits" else {2, 3, 4, 5}), (name, split)
        assert all(t.isdigit() for t in bank.texts)
        assert (np.abs(bank.audio.astype(np.int32)).max(axis=1) > 1000).all()  # every clip has speech


def test_audio_banks_rebuild_byte_identical(audio, tmp_path):
    root, _ = audio
    synthesize("a different utterance first", "fr+f2", 300, 90)  # espeak state must not leak into a bank
    for fn in (spoken_digits, spoken_numbers):
        for split in ("train", "test"):
            fn(split, tmp_path, 0, num_clips=NUM_CLIPS)
    assert bank_bytes(tmp_path) == bank_bytes(root)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_test_voices_are_disjoint(seed):
    train, test = set(split_voices("train", seed)), set(split_voices("test", seed))
    assert not train & test
    assert train | test == set(speech.voice_identities())
    assert len(test) == round(len(speech.voice_identities()) * speech.TEST_VOICE_FRACTION)


def test_banks_speak_only_with_their_split_voices(audio):
    _, banks = audio
    for (name, split), bank in banks.items():
        assert set(bank.voices.tolist()) <= set(split_voices(split, 0)), (name, split)


def test_full_size_plan_balances_digits_and_lengths():
    _, texts, voices = speech._plan(speech.SPOKEN_NUMBERS, "train", 0, 3000)
    assert np.bincount([len(t) for t in texts]).tolist() == [0, 0, 750, 750, 750, 750]
    assert np.bincount([int(t[0]) for t in texts]).tolist() == [300] * 10
    assert set(voices) == set(split_voices("train", 0))
    _, texts, _ = speech._plan(speech.SPOKEN_DIGITS, "test", 0, 500)
    assert np.bincount([int(t) for t in texts]).tolist() == [50] * 10


def test_synthesize_speaks_longer_for_longer_text():
    one = synthesize("seven", "en-us+m3")
    four = synthesize("three one four zero", "en-us+m3")
    assert one.dtype == np.int16 and one.ndim == 1
    assert np.abs(one.astype(np.int32)).max() > 1000
    assert len(four) > 2 * len(one)


def test_too_long_text_is_spoken_faster_not_cut():
    rng = np.random.default_rng(0)
    words = "three one four zero nine"
    start, end = speech._speech_extent(synthesize(words, "en", 150, 50))
    window = round((end - start) * 0.8)
    assert speech._render(words, "en", 150, 50, window, rng).shape == (window,)
    with pytest.raises(RuntimeError, match="does not fit"):
        speech._render(words, "en", 150, 50, 100, rng)


@pytest.mark.parametrize("voice", ["xx", "en+zz", "klingon+m1"])
def test_unknown_voice_is_a_config_error(voice):
    with pytest.raises(ConfigError, match=voice.replace("+", r"\+")):
        synthesize("seven", voice)


def test_corrupt_cache_file_names_the_file(tmp_path):
    path = digits.bank_path(tmp_path, "spoken_digits", "test", 0, speech.VERSION, 3)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}.*delete it"):
        spoken_digits("test", tmp_path, 0, num_clips=3)


@pytest.mark.parametrize("call", [lambda r: digit_images("dev", r, 0), lambda r: spoken_numbers("valid", r, 0)])
def test_unknown_split_is_a_config_error(call, tmp_path):
    with pytest.raises(ConfigError, match="unknown split"):
        call(tmp_path)
