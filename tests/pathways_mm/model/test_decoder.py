import pytest
import torch

from pathways_mm.config import SIZES, ModelConfig
from pathways_mm.model.decoder import Decoder
from pathways_mm.model.layers import Attention, apply_rope, attention_mask, rope_tables

VOCAB = 97


def make(prefix_lm=True, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SIZES["debug"], "prefix_lm": prefix_lm, "max_seq_len": 32, **kw})
    return Decoder(cfg, VOCAB).eval()


def batch(B=3, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (B, L), generator=g), torch.tensor([0, 1, 2][:B])


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_future_tokens_cannot_change_earlier_logits(prefix_lm):
    model = make(prefix_lm=prefix_lm)
    tokens, tasks = batch()
    prefix = torch.tensor([4, 1, 6])
    base = model(tokens, tasks, prefix).logits
    for t in range(7, 12):  # positions after every prefix
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits = model(changed, tasks, prefix).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-4


def test_prefix_is_bidirectional_only_inside_the_prefix():
    model = make(prefix_lm=True)
    tokens, tasks = batch(B=1)
    prefix = torch.tensor([5])
    base = model(tokens, tasks, prefix).logits
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] + 1) % VOCAB  # last prefix token
    logits = model(changed, tasks, prefix).logits
    assert (logits[0, :4] - base[0, :4]).abs().max() > 1e-4  # earlier prefix positions see it
    causal = make(prefix_lm=False)
    b2, c2 = causal(tokens, tasks, prefix).logits, causal(changed, tasks, prefix).logits
    torch.testing.assert_close(b2[0, :4], c2[0, :4], rtol=0, atol=1e-6)


def test_attention_mask_table():
    m = attention_mask(torch.tensor([2]), 4, torch.device("cpu"))[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (4, 2), (4, 4), (8, 2)])
def test_mqa_gqa_shapes(n_heads, n_kv_heads):
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=32, max_seq_len=16)
    attn = Attention(cfg)
    hd = 64 // n_heads
    assert attn.wq.weight.shape == (n_heads * hd, 64)
    assert attn.wk.weight.shape == (n_kv_heads * hd, 64)
    assert attn.wv.weight.shape == (n_kv_heads * hd, 64)
    cos, sin = rope_tables(hd, 16, 10000.0)
    x = torch.randn(2, 10, 64)
    assert attn(x, cos[:10], sin[:10], None).shape == (2, 10, 64)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa_cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8, max_seq_len=16)
    mha_cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=8, max_seq_len=16)
    gqa, mha = Attention(gqa_cfg), Attention(mha_cfg)
    hd = 8
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(32, 32)
            getattr(mha, name).weight.copy_(w)
    cos, sin = rope_tables(hd, 16, 10000.0)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x, cos[:9], sin[:9], None), mha(x, cos[:9], sin[:9], None))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, hd), cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k.view(1, 1, 1, hd), cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum().item()

    for delta in (0, 3, 17):
        ref = score(delta, 0)
        for shift in (1, 9, 40):
            assert score(delta + shift, shift) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert abs(score(5, 0) - score(6, 0)) > 1e-4  # and it does depend on the distance


def test_rope_preserves_norm():
    cos, sin = rope_tables(8, 32, 10000.0)
    x = torch.randn(2, 3, 32, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_embeddings_are_tied_and_no_biases():
    model = make()
    tokens, tasks = batch()
    out = model(tokens, tasks)
    assert model.norm.bias is None
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    grads = torch.autograd.grad(out.logits[0, -1, 5], model.tok_embed.weight, allow_unused=True)[0]
    assert grads[5].abs().sum() > 0  # the output row of token 5 is the embedding row
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    # Changing the embedding row of token 7 changes its output logit even if token 7 is not in the input.
    tokens = tokens.clamp(max=6)
    before = model(tokens, tasks).logits[..., 7].clone()
    with torch.no_grad():
        model.tok_embed.weight[7] += torch.randn(model.cfg.d_model)
    after = model(tokens, tasks).logits[..., 7]
    assert (after - before).abs().max() > 1e-3


def test_task_token_changes_the_output():
    model = make()
    tokens, _ = batch(B=2)
    a = model(tokens, torch.tensor([0, 0])).logits
    b = model(tokens, torch.tensor([0, 1])).logits
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_too_long_sequence_is_a_clear_error():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.long), torch.tensor([0]))


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes_build(size):
    cfg = ModelConfig(size=size)  # the size alone fills every dimension
    assert {k: getattr(cfg, k) for k in SIZES[size]} == SIZES[size]
    with torch.device("meta"):
        model = Decoder(cfg, 4096)
    assert len(model.blocks) == cfg.n_layers and model.tok_embed.weight.shape == (4096, cfg.d_model)
    assert model.blocks[0].ffn.w1.weight.shape == (cfg.d_ff, cfg.d_model)


def test_task_adapters_change_only_their_own_tasks_rows():
    """A model with adapters gives rows of tasks without a slot exactly the plain model's logits."""
    import dataclasses

    from pathways_mm.model.decoder import Decoder

    cfg = ModelConfig(max_seq_len=32)
    torch.manual_seed(0)
    plain = Decoder(cfg, 64)
    adapted = Decoder(dataclasses.replace(cfg, adapter_rank=4, adapter_tasks=(2,)), 64)
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("lora" in k or "adapter" in k for k in missing)
    for name, p in adapted.named_parameters():  # a trained adapter: every part non-zero
        if "lora" in name or "adapter" in name:
            torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, 64, (3, 10))
    tasks = torch.tensor([0, 2, 1])
    a, b = plain(tokens, tasks).logits, adapted(tokens, tasks).logits
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.allclose(a[1], b[1])
    at = torch.zeros(3, 10, dtype=torch.bool)
    at[:, -3:] = True
    a, b = plain(tokens, tasks, logits_at_BL=at).logits, adapted(tokens, tasks, logits_at_BL=at).logits
    assert torch.equal(a[:3], b[:3]) and torch.equal(a[6:], b[6:]) and not torch.allclose(a[3:6], b[3:6])
