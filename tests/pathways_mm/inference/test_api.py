"""`TrainedModel.generate`: a user's inputs become the batch evaluation decodes, on any device."""

import numpy as np
import pytest
import torch

from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig
from pathways_mm.data.collate import collate, prompt_only
from pathways_mm.encoders.audio import Audio, at_rate
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.inference.api import Generation, TrainedModel, pick_device
from pathways_mm.inference.inputs import write_png, write_wav
from pathways_mm.model.generate import greedy_generate
from pathways_mm.model.model import build_model
from pathways_mm.tasks import MultimodalExample, get_task

TOK = load_tokenizer()
TABLE = {"digit_image": 0, "digit_speech": 1, "image_speech_sum": 2, "text_arith": 3}
CFG = ExperimentConfig(
    tasks=tuple(TABLE), model=ModelConfig(n_layers=2, moe=MoEConfig(num_experts=4, top_k=2, expert_d_ff=32))
)
RNG = np.random.default_rng(0)
DIGITS = [RNG.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
CLIP = Audio((RNG.uniform(-0.3, 0.3, 16000) * 32767).astype(np.int16), 16000)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TrainedModel(build_model(CFG.model, TOK.vocab_size), CFG, TABLE, "random", torch.device("cpu"))


def eval_decoding(model, task, segments, steps):
    """What `eval` decodes for a sample with these segments (collate with a target, cut to the prompt)."""
    ex = MultimodalExample(task=task, segments=segments, target_text="x")
    batch = collate([ex], [TABLE[task]], TOK, CFG.data.max_len, model_cfg=CFG.model)
    ids = greedy_generate(model.module, prompt_only(batch, TOK.pad_id), steps, TOK.eos_id, TOK.pad_id)
    return TOK.decode(ids[0])


def test_generate_decodes_what_evaluation_decodes(model, tmp_path):
    write_png(tmp_path / "d.png", DIGITS[0])
    write_wav(tmp_path / "a.wav", CLIP)
    steps = 6
    want = eval_decoding(model, "image_speech_sum", (("image", DIGITS[0]), ("audio", CLIP)), steps)
    for image, audio in ((DIGITS[0], CLIP), (tmp_path / "d.png", tmp_path / "a.wav"), (DIGITS[0], (CLIP[0], 16000))):
        assert model.generate("image_speech_sum", image=image, audio=audio, max_new_tokens=steps) == want
    want = eval_decoding(model, "text_arith", (("text", "what is two plus two?"),), steps)
    assert model.generate("text_arith", text="what is two plus two?", max_new_tokens=steps) == want


def test_a_clip_at_another_rate_is_resampled_as_training_resamples_files(model):
    clip_8k = Audio(CLIP.samples[::2], 8000)
    resampled = at_rate(clip_8k, CFG.model.audio.sample_rate)
    assert resampled.sample_rate == 16000 and len(resampled.samples) == 2 * len(clip_8k.samples)
    asked = model.generate("digit_speech", audio=(clip_8k.samples, 8000), max_new_tokens=4)
    assert asked == model.generate("digit_speech", audio=resampled, max_new_tokens=4)


def test_a_batch_answers_each_input_in_order(model):
    items = [{"image": d} for d in DIGITS]
    out = model.generate_batch("digit_image", items, max_new_tokens=3, batch_size=2)
    assert out == [model.generate("digit_image", image=d, max_new_tokens=3) for d in DIGITS]
    assert model.generate_batch("digit_image", items[::-1], max_new_tokens=3) == out[::-1]


def test_experts_are_given_per_position_and_block(model):
    g = model.generate("image_speech_sum", image=DIGITS[1], audio=CLIP, max_new_tokens=4, return_experts=True)
    assert isinstance(g, Generation) and g.answer == get_task("image_speech_sum").final_answer(g.text)
    assert g.tokens[0] == "<task:image_speech_sum>"
    assert g.tokens[1] == "<image>" and "</image>" in g.tokens and "<audio>" in g.tokens
    assert g.tokens.count("image") == 16  # 28x28 -> 16 rows -> 4x4 patches
    answer = TOK.encode(g.text)
    assert len(g.tokens) == g.answer_start + len(answer) and "".join(g.tokens[g.answer_start :]) == g.text
    assert list(g.experts) == ["block1"]  # moe_every 2 of 2 layers
    routes = g.experts["block1"]
    assert len(routes) == len(g.tokens)
    assert all(len(r) == 2 and len(set(r)) == 2 and all(0 <= e < 4 for e in r) for r in routes)


@pytest.mark.parametrize(
    "task,inputs,message",
    [
        ("nope", {"image": DIGITS[0]}, "unknown task 'nope'"),
        ("digit_image", {"audio": CLIP}, "reads image, not audio"),
        ("digit_image", {}, "needs --image"),
        ("image_speech_sum", {"image": DIGITS[0]}, "needs --audio"),
        ("digit_speech", {"audio": Audio(CLIP.samples, 0)}, "sample rate must be >= 1"),
        ("digit_image", {"image": np.zeros((2, 2), np.uint8)}, "too small"),
    ],
)
def test_bad_inputs_are_one_clear_error(model, task, inputs, message):
    with pytest.raises(ConfigError, match=message):
        model.generate(task, **inputs)


def test_bad_options_are_refused(model):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate("digit_image", image=DIGITS[0], max_new_tokens=0)
    with pytest.raises(ConfigError, match="unknown input"):
        model.generate_batch("digit_image", [{"imgae": DIGITS[0]}])
    with pytest.raises(ConfigError, match="max_seq_len"):
        model.generate("text_arith", text="two", max_new_tokens=CFG.model.max_seq_len)


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_answers_as_the_cpu_does(model):
    cuda = TrainedModel(build_model(CFG.model, TOK.vocab_size), CFG, TABLE, "random", torch.device("cuda"))
    cuda.module.load_state_dict(model.module.state_dict())
    with torch.no_grad():
        logits = [m.module(_b().to(m.device)).logits.float().cpu() for m in (model, cuda)]
    assert torch.allclose(*logits, atol=1e-3)
    assert cuda.generate("digit_image", image=DIGITS[0], max_new_tokens=3) is not None


def _b():
    ex = MultimodalExample(task="digit_image", segments=(("image", DIGITS[0]),), target_text="seven")
    return collate([ex], [0], TOK, CFG.data.max_len, model_cfg=CFG.model)
