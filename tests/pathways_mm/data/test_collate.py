"""Collation of multimodal examples and the model's multimodal sentence."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from pathways_mm.config import ModelConfig
from pathways_mm.data.collate import collate, prompt_only
from pathways_mm.encoders.audio import Audio, num_audio_tokens
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.encoders.vision import num_patches
from pathways_mm.errors import ConfigError
from pathways_mm.model.batch import AUDIO, IGNORE, IMAGE, PAD_MODALITY, TEXT, marker_id
from pathways_mm.model.model import build_model
from pathways_mm.tasks import MultimodalExample

CFG = ModelConfig()
TOK = load_tokenizer()


def image(width=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(28, width), dtype=np.uint8)


def audio(seconds=1.0, seed=0, rate=16_000):
    return Audio((np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 2000).astype(np.int16), rate)


def examples():
    return [
        MultimodalExample("t", (("image", image()), ("audio", audio()), ("text", "same?")), "yes"),
        MultimodalExample("t", (("text", "what is two plus two?"),), "4"),
        MultimodalExample("t", (("audio", audio(2.5, 1)), ("image", image(84, 1))), "3140"),
    ]


def test_layout_of_the_multimodal_sentence():
    batch = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG)
    n_img, n_aud = num_patches(16, CFG.vision), num_audio_tokens(16_000, CFG.audio)
    row = batch.modality_ids[0]
    # [task][<img> n </img>][<aud> n </aud>][prompt][target][eos]
    assert row[0] == TEXT and (row[1 : 3 + n_img] == IMAGE).all()
    assert (row[3 + n_img : 5 + n_img + n_aud] == AUDIO).all()
    assert batch.markers[0, 1] == marker_id(IMAGE, False) and batch.markers[0, 2 + n_img] == marker_id(IMAGE, True)
    assert batch.markers[0, 3 + n_img] == marker_id(AUDIO, False)
    prompt = TOK.encode("same?")
    assert batch.prefix_len[0] == 5 + n_img + n_aud + len(prompt)
    assert batch.tokens[0, 5 + n_img + n_aud : batch.prefix_len[0]].tolist() == prompt
    # the text-only row has no media and pads beyond its length
    assert (batch.modality_ids[1, : batch.lengths[1]] == TEXT).all()
    assert (batch.modality_ids[1, batch.lengths[1] :] == PAD_MODALITY).all()
    # slots point exactly at the media positions of their rows
    L = batch.tokens.shape[1]
    assert batch.images.shape[0] == 2 and batch.audio.shape[0] == 2
    first_img = batch.image_slots[0][batch.image_slots[0] >= 0]
    assert first_img.tolist() == list(range(2, 2 + n_img))
    strip = batch.image_slots[1][batch.image_slots[1] >= 0]
    assert (strip // L == 2).all() and len(strip) == num_patches(48, CFG.vision)
    # labels: only the target tokens and eos are scored
    target = TOK.encode("yes") + [TOK.eos_id]
    scored = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert scored == target


def test_prompt_only_is_what_collate_gives_without_targets():
    full = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG)
    want = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, with_target=False)
    got = prompt_only(full, TOK.pad_id)
    for f in fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert (a is None and b is None) or torch.equal(a, b), f.name


def test_training_augmentation_is_a_function_of_the_generator():
    a = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, rng=np.random.default_rng(5))
    b = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, rng=np.random.default_rng(5))
    c = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, rng=np.random.default_rng(6))
    assert torch.equal(a.images, b.images) and torch.equal(a.audio_masks, b.audio_masks)
    assert not torch.equal(a.images, c.images)
    plain = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG)
    assert plain.audio_masks is None


def test_model_reads_the_sentence_and_media_get_gradients():
    torch.manual_seed(0)
    model = build_model(CFG, TOK.vocab_size)
    batch = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, rng=np.random.default_rng(0))
    out = model(batch)
    assert out.logits.shape == (*batch.tokens.shape, TOK.vocab_size)
    out.logits[batch.labels != IGNORE].logsumexp(-1).sum().backward()
    for enc in (model.vision, model.audio):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # the image changes what the model predicts for its row, and only for its row
    other = collate(examples(), [0, 1, 2], TOK, 128, model_cfg=CFG, rng=np.random.default_rng(0))
    other.images[0] = 1.0 - other.images[0]
    with torch.no_grad():
        a, b = model(batch).logits, model(other).logits
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


@pytest.mark.parametrize(
    "segment, message",
    [
        (("image", np.zeros((5, 28, 28), dtype=np.uint8)), "grayscale"),
        (("audio", Audio(np.zeros(0, dtype=np.int16), 16_000)), "empty"),
        (("audio", Audio(np.zeros(16_000, dtype=np.int16), 8_000)), "8000 Hz"),
        (("audio", Audio(np.array([np.nan] * 16_000, dtype=np.float32), 16_000)), "corrupt"),
        (("video", b""), "unknown modality"),
    ],
)
def test_bad_media_names_the_task_and_sample(segment, message):
    bad = [examples()[1], MultimodalExample("digit_speech", (segment,), "7")]
    with pytest.raises(ConfigError, match=rf"task 'digit_speech', train\[17\]: .*{message}"):
        collate(bad, [0, 1], TOK, 128, model_cfg=CFG, keys=["train[3]", "train[17]"])


def test_too_long_input_says_which_setting_to_raise():
    with pytest.raises(ConfigError, match="data.max_len"):
        collate([examples()[2]], [0], TOK, 32, model_cfg=CFG)


def test_a_target_that_does_not_fit_is_cut_or_refused_by_task():
    """A built-in LM chunk is cut to fit data.max_len; a task named in whole_targets (a declared
    task: one answer per row) refuses it, naming the task and the sample: cut, it could never match."""
    long = MultimodalExample("t", (("text", "q"),), "x " * 500)
    cut = collate([long], [0], TOK, 32, model_cfg=CFG)
    assert cut.tokens.shape[1] == 32 and int(cut.lengths[0]) == 32
    with pytest.raises(ConfigError, match=r"task 't', train\[5\]: a target of \d+ tokens does not fit data.max_len=32"):
        collate([long], [0], TOK, 32, model_cfg=CFG, keys=["train[5]"], whole_targets={"t"})
    fits = MultimodalExample("t", (("text", "q"),), "x")
    assert collate([fits], [0], TOK, 32, model_cfg=CFG, whole_targets={"t"}).tokens.shape[0] == 1
    bad = []
    batch = collate(
        [fits, long], [0, 1], TOK, 32, model_cfg=CFG, on_bad=lambda b, e: bad.append(b), whole_targets={"t"}
    )
    assert bad == [1] and batch.tokens.shape[0] == 1  # a bad sample like any other: skipped with on_bad
