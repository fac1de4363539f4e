"""Model building blocks against their well-known counterparts: RoPE (transformers), attention (PyTorch SDPA),
FFNs (torch.nn.functional), blocks (the formulas), KV caches, embeddings; plus the causal leakage test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import (
    BasicFFN,
    CausalLM,
    DynamicKVCache,
    FeedForward,
    GroupedQueryAttention,
    ModelConfig,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    StaticKVCache,
    SwiGLU,
    TokenEmbedding,
    TransformerBlock,
    repeat_kv,
)
from intro2llm.model.analysis import kv_cache_bytes
from intro2llm.model.attention import causal_mask, naive_attention, sliding_window_mask
from intro2llm.model.embedding import rope_inv_freq, sinusoidal_table


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------- embeddings
def test_token_embedding_rejects_bad_ids_before_indexing():
    emb = TokenEmbedding(10, 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        emb(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="-1"):
        emb(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([[1.0]]))
    torch.testing.assert_close(emb(torch.tensor([[3]]))[0, 0], emb.weight[3])


def test_sinusoidal_known_values():
    t = sinusoidal_table(5, 6)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1, 0, 1, 0, 1]))
    p, i, d = 3, 2, 6  # channel 2i = sin(p / 10000^(2i/d)), 2i+1 = cos
    assert t[p, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(p / 10000 ** (2 * i / d))).item(), abs=1e-6)
    assert t[p, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(p / 10000 ** (2 * i / d))).item(), abs=1e-6)
    pe = SinusoidalPositionalEncoding(6, 5)
    x = torch.zeros(1, 5, 6)
    torch.testing.assert_close(pe(x)[0], t)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pe(torch.zeros(1, 6, 6))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_rope_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_type": "default", "rope_theta": 500.0} if scaling is None else {**scaling,
                                                                                          "rope_theta": 500.0}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                      rope_parameters=rope_parameters)
    if scaling is None:
        dim = 16
        expected = 1.0 / (500.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(16, 500.0, scaling), expected.float())


def test_rope_matches_hf_apply_rotary_and_is_relative():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    rot = RotaryEmbedding(16, 64, base=10000.0)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # second row left-padded
    cos, sin = rot(pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = RotaryEmbedding.rotate(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)
    # relative position: <R_m q, R_n k> depends only on m - n
    qv, kv = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cm, sm = rot(torch.tensor([m]))
        cn, sn = rot(torch.tensor([n]))
        return (RotaryEmbedding.rotate(qv, qv, cm, sm)[0] * RotaryEmbedding.rotate(kv, kv, cn, sn)[1]).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rot(torch.tensor([64]))


# ---------------------------------------------------------------------------------------------------- attention
def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert repeat_kv(x, 1) is x


def _sdpa_reference(attn: GroupedQueryAttention, x, keep):
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = repeat_kv(attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2), H // Hkv)
    v = repeat_kv(attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2), H // Hkv)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_sdpa(kv_heads, window):
    torch.manual_seed(0)
    cfg = small_config(num_key_value_heads=kv_heads, sliding_window=window)
    attn = GroupedQueryAttention(cfg)
    x = torch.randn(2, 9, 32)
    keep = causal_mask(9) if window is None else sliding_window_mask(9, window)
    torch.testing.assert_close(attn(x), _sdpa_reference(attn, x, keep), atol=1e-5, rtol=1e-5)


def test_attention_padding_mask_matches_sdpa_on_real_tokens():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(small_config())
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = causal_mask(6)[None, None] & pad[:, None, None, :]
    keep = keep | ~keep.any(-1, keepdim=True)  # SDPA gives NaN for rows with no key; those are pads anyway
    out = attn(x, key_padding_mask=pad)
    ref = _sdpa_reference(attn, x, keep)
    torch.testing.assert_close(out[pad], ref[pad], atol=1e-5, rtol=1e-5)


def test_mha_ignores_kv_heads_and_naive_attention_matches_sdpa():
    mha = MultiHeadAttention(small_config(num_key_value_heads=1))
    assert mha.num_kv_heads == 4 and mha.k_proj.out_features == 32
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, causal_mask(5)), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- FFN / block
def test_ffns_match_functional():
    torch.manual_seed(0)
    cfg = small_config()
    x = torch.randn(2, 3, 32)
    sw = SwiGLU(cfg)
    torch.testing.assert_close(sw(x), sw.down_proj(F.silu(sw.gate_proj(x)) * sw.up_proj(x)), atol=1e-5, rtol=1e-5)
    ge = FeedForward(cfg)
    ref = ge.down_proj(F.gelu(ge.gate_proj(x), approximate="tanh") * ge.up_proj(x))
    torch.testing.assert_close(ge(x), ref, atol=1e-5, rtol=1e-5)
    basic = BasicFFN(cfg)
    torch.testing.assert_close(basic(x), basic.down_proj(torch.relu(basic.up_proj(x))))
    with pytest.raises(ValueError, match="activation"):
        BasicFFN(cfg, activation="tanh")


@pytest.mark.parametrize("position", ["pre", "post"])
def test_block_residual_formulas(position):
    torch.manual_seed(0)
    cfg = small_config(norm_position=position, use_rms_norm=False)
    blk = TransformerBlock(cfg)
    x = torch.randn(2, 5, 32)
    ln1 = lambda t: F.layer_norm(t, (32,), blk.input_layernorm.weight, blk.input_layernorm.bias, cfg.rms_norm_eps)
    ln2 = lambda t: F.layer_norm(t, (32,), blk.post_attention_layernorm.weight, blk.post_attention_layernorm.bias,
                                 cfg.rms_norm_eps)
    if position == "pre":
        h = x + blk.self_attn(ln1(x))
        ref = h + blk.mlp(ln2(h))
    else:
        h = ln1(x + blk.self_attn(x))
        ref = ln2(h + blk.mlp(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- KV cache
def test_static_and_dynamic_cache_agree_and_size_is_exact():
    cfg = small_config()
    static = StaticKVCache.from_config(cfg, batch_size=2, max_seq_len=10)
    dyn = DynamicKVCache()
    for T in (4, 1, 3):
        k, v = torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
        ks, vs = static.update(1, k, v)
        kd, vd = dyn.update(1, k, v)
        static.advance(T)
        dyn.advance(T)
        torch.testing.assert_close(ks, kd)
        torch.testing.assert_close(vs, vd)
    assert static.seq_len == dyn.seq_len == 8
    assert static.memory_bytes() == kv_cache_bytes(cfg, 2, 10, "float32")
    with pytest.raises(ValueError, match="overflows"):
        static.update(0, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))


def test_forward_with_cache_equals_full_forward():
    torch.manual_seed(0)
    model = CausalLM(small_config()).eval()
    ids = torch.randint(0, 67, (2, 10))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    step = model(ids[:, 6:], kv_cache=out.kv_cache).logits
    torch.testing.assert_close(torch.cat([out.logits, step], 1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- causal LM
@pytest.mark.parametrize("variant", [{}, {"use_rope": False, "use_rms_norm": False, "ffn_type": "gelu"},
                                     {"ffn_type": "geglu", "norm_position": "post"}, {"sliding_window": 4}])
def test_no_causal_leakage(variant):
    torch.manual_seed(0)
    model = CausalLM(small_config(**variant)).eval()
    ids = torch.randint(0, 67, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 5) % 67  # change only future tokens
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # and the future does change


def test_loss_shifts_labels_and_fused_loss_agrees():
    torch.manual_seed(0)
    model = CausalLM(small_config(tie_word_embeddings=True))
    ids = torch.randint(0, 67, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 67), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, ref, atol=1e-5, rtol=1e-5)
    fused.loss.backward()
    assert model.embed_tokens.weight.grad is not None and model.lm_head.weight is model.embed_tokens.weight


def test_forward_bad_input():
    model = CausalLM(small_config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 67]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
