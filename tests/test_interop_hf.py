"""Hugging Face interop: logits equal transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same safetensors
files (both directions, GQA, biases, tied embeddings, llama3 RoPE scaling, sharded checkpoints, left padding),
and loading errors that list what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from intro2llm.interop import config_from_hf, config_to_hf  # noqa: E402
from intro2llm.model import CausalLM, ModelConfig  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def random_hf(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(cfg_cls(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # biases too, and norms away from 1, so every tensor matters
    return model


CASES = [
    pytest.param(LlamaForCausalLM, LlamaConfig, {}, id="llama-gqa"),
    pytest.param(LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True,
                                                     rope_parameters=LLAMA3_ROPE), id="llama-tied-bias-llama3rope"),
    pytest.param(Qwen2ForCausalLM, Qwen2Config, {}, id="qwen2-qkv-bias"),
    pytest.param(Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True),
                 id="qwen2-mqa-tied"),
]


@pytest.mark.parametrize("cls, cfg_cls, kw", CASES)
def test_logits_match_transformers_both_directions(tmp_path, cls, cfg_cls, kw):
    hf = random_hf(cls, cfg_cls, **kw)
    hf.save_pretrained(tmp_path / "hf")
    ours = CausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    back = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max().item() <= 1e-4


def test_left_padded_logits_and_greedy_tokens_match_transformers(tmp_path):
    hf = random_hf(LlamaForCausalLM, LlamaConfig, seed=1)
    hf.save_pretrained(tmp_path)
    ours = CausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    ids[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4
    plain = torch.randint(0, 97, (2, 6))
    hf_tokens = hf.generate(plain, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(plain, 12), hf_tokens)


def test_sharded_checkpoint_round_trip(tmp_path):
    hf = random_hf(Qwen2ForCausalLM, Qwen2Config, seed=2)
    ours = CausalLM.from_pretrained(_save(hf, tmp_path / "a")).eval()
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        ref = ours(ids).logits
        assert torch.equal(CausalLM.from_pretrained(tmp_path / "sharded")(ids).logits, ref)
        assert (Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded")(ids).logits - ref).abs().max() <= 1e-4


def _save(hf, path):
    hf.save_pretrained(path)
    return path


def test_missing_and_mismatched_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _save(random_hf(LlamaForCausalLM, LlamaConfig), tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(5)
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        CausalLM.from_pretrained(path)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "model.norm.weight: file (5,) vs model (64,)" in msg
    assert "model.extra.weight" in msg


def test_unsupported_model_type_and_features(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="supported model types: llama, qwen2"):
        CausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        CausalLM.from_pretrained(tmp_path / "nowhere")
    layernorm = ModelConfig(**TINY, use_rms_norm=False)
    with pytest.raises(ValueError, match="LayerNorm"):
        config_to_hf(layernorm)
    with pytest.raises(ValueError, match="supported model types"):
        config_to_hf(ModelConfig(**TINY), model_type="mistral")


def test_config_round_trip():
    for c in (ModelConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True),
              ModelConfig(**TINY, attention_bias=True, model_type="qwen2", eos_token_id=3)):
        assert config_from_hf(config_to_hf(c)) == c
