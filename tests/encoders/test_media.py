"""Vision and audio encoders: shapes, masks with mixed lengths, batch independence, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathways_mm.config import AudioConfig, VisionConfig
from pathways_mm.encoders.audio import Audio, AudioEncoder, num_audio_tokens, pad_audio, prepare_audio
from pathways_mm.encoders.vision import MediaError, VisionEncoder, num_patches, pad_images, prepare_image

D = 32
VCFG, ACFG = VisionConfig(), AudioConfig()


def digit(width=28, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(28, width), dtype=np.uint8)


def clip(seconds, seed=0, rate=ACFG.sample_rate):
    rng = np.random.default_rng(seed)
    return Audio((rng.standard_normal(int(seconds * rate)) * 3000).astype(np.int16), rate)


@pytest.mark.parametrize("widths", [(28,), (28, 56), (84, 28, 112)])
def test_vision_shapes_and_masks_with_mixed_widths(widths):
    images = [prepare_image(digit(w, i), VCFG) for i, w in enumerate(widths)]
    enc = VisionEncoder(VCFG, D).eval()
    batch, px = pad_images(images)
    emb, mask = enc(batch, px)
    rows = VCFG.image_size // VCFG.patch_size
    assert emb.shape == (len(widths), rows * max(px.tolist()) // VCFG.patch_size, D)
    assert mask.sum(1).tolist() == [num_patches(im.shape[-1], VCFG) for im in images]
    assert [num_patches(im.shape[-1], VCFG) for im in images] == [
        rows * (w * VCFG.image_size // 28) // VCFG.patch_size for w in widths
    ]
    for i, im in enumerate(images):  # the same image alone encodes to the same patches
        alone, m = enc(*pad_images([im]))
        torch.testing.assert_close(emb[i, : m.sum()], alone[0], atol=1e-5, rtol=1e-5)


def test_vision_augmentation_is_random_only_in_training():
    img = digit()
    a = prepare_image(img, VCFG)
    assert torch.equal(a, prepare_image(img, VCFG))
    b = prepare_image(img, VCFG, np.random.default_rng(1))
    c = prepare_image(img, VCFG, np.random.default_rng(2))
    assert b.shape == a.shape and not torch.equal(b, c)
    assert torch.equal(b, prepare_image(img, VCFG, np.random.default_rng(1)))


@pytest.mark.parametrize("seconds", [(1.0,), (1.0, 2.5), (0.5, 2.5, 1.3)])
def test_audio_shapes_and_masks_with_mixed_lengths(seconds):
    clips = [prepare_audio(clip(s, i), ACFG) for i, s in enumerate(seconds)]
    enc = AudioEncoder(ACFG, D).eval()
    batch, lengths = pad_audio(clips)
    emb, mask = enc(batch, lengths)
    want = [num_audio_tokens(c.numel(), ACFG) for c in clips]
    assert emb.shape == (len(seconds), max(want), D)
    assert mask.sum(1).tolist() == want
    for i, c in enumerate(clips):
        alone, m = enc(*pad_audio([c]))
        torch.testing.assert_close(emb[i, : m.sum()], alone[0], atol=1e-4, rtol=1e-4)


def test_spec_augment_masks_change_only_masked_clips():
    clips = [prepare_audio(clip(1.0, i), ACFG) for i in range(2)]
    enc = AudioEncoder(ACFG, D).eval()
    batch, lengths = pad_audio(clips)
    plain, _ = enc(batch, lengths)
    masks = torch.tensor([[0, 0, 0, 0], [5, 8, 10, 10]])
    masked, _ = enc(batch, lengths, masks)
    torch.testing.assert_close(masked[0], plain[0])
    assert not torch.allclose(masked[1], plain[1])


@pytest.mark.parametrize(
    "raw, message",
    [
        (np.zeros((3, 28, 28), dtype=np.uint8), "grayscale"),
        (np.zeros((2, 2), dtype=np.uint8), "too small"),
        (np.full((28, 28), np.nan, dtype=np.float32), "finite"),
        (np.zeros((28, 28), dtype=np.int64), "dtype"),
        (np.zeros((28, 28 * 40), dtype=np.uint8), "max_patches_per_row"),
    ],
)
def test_bad_images_are_refused(raw, message):
    with pytest.raises(MediaError, match=message):
        prepare_image(raw, VCFG)


@pytest.mark.parametrize(
    "raw, message",
    [
        (Audio(np.zeros(0, dtype=np.int16), 16_000), "empty"),
        (Audio(np.zeros(8000, dtype=np.int16), 22_050), "22050 Hz"),
        (Audio(np.full(8000, np.inf, dtype=np.float32), 16_000), "corrupt"),
        (Audio(np.zeros((2, 8000), dtype=np.int16), 16_000), "mono"),
        (Audio(np.zeros(16_000 * 10, dtype=np.int16), 16_000), "max_seconds"),
        (np.zeros(8000, dtype=np.int16), "Audio"),
    ],
)
def test_bad_audio_is_refused(raw, message):
    with pytest.raises(MediaError, match=message):
        prepare_audio(raw, ACFG)
