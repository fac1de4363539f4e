"""Hugging Face checkpoint format for ``CausalLM``: ``config.json`` + safetensors (single file or sharded).

Reads and writes what ``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` read and write:

- config: HF field names are ours (``vocab_size``, ``num_key_value_heads``, ``rms_norm_eps``, …); RoPE comes
  from ``rope_parameters`` (transformers ≥ 5) or ``rope_theta`` + ``rope_scaling`` (older files); Llama's
  ``attention_bias`` covers q/k/v/o, Qwen2 always has q/k/v biases and none on o_proj.
- tensors: HF names are ours with a ``model.`` prefix (``model.layers.0.self_attn.q_proj.weight`` ↔
  ``layers.0.self_attn.q_proj.weight``); ``lm_head.weight`` is absent from files of tied models.

Loading checks everything before copying: missing tensors, unexpected tensors and shape mismatches are listed
together in one ``ValueError``. Not handled: ``pytorch_model.bin`` (pickle) files, quantized checkpoints,
Qwen2 with sliding windows on only some layers, activations other than SiLU. Tokenizer files:
``export_tokenizer`` (the tokenizer's own ``save_pretrained`` + chat template + generation config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from intro2llm._io import atomic_write
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------------
# config.json ↔ ModelConfig
# ---------------------------------------------------------------------------------------------------------------
def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict (model_type llama or qwen2)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is supported")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or None
    if rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling {kind!r}: supported are 'linear' and 'llama3'")
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        window = None
        if hf.get("use_sliding_window"):
            layers_sliding = hf["num_hidden_layers"] - min(hf.get("max_window_layers", 0), hf["num_hidden_layers"])
            if layers_sliding == hf["num_hidden_layers"]:
                window = hf.get("sliding_window")
            elif layers_sliding > 0:
                raise ValueError("unsupported Qwen2 config: sliding window on only some layers (max_window_layers)")
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        window = None
    ids = {k: _first_id(hf.get(k)) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    ids = {k: v for k, v in ids.items() if v is not None and 0 <= v < hf["vocab_size"]}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_output_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=window,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        model_type=model_type,
        **ids,
    )


def config_to_hf(config: ModelConfig, model_type: str | None = None, dtype: torch.dtype | None = None
                 ) -> dict[str, Any]:
    """Hugging Face ``config.json`` dict for ``config``; ``ValueError`` when the model has no HF equivalent."""
    model_type = model_type or config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    problems = []
    if not config.use_rms_norm:
        problems.append("use_rms_norm=False (LayerNorm)")
    if not config.use_rope:
        problems.append("use_rope=False (sinusoidal positions)")
    if config.ffn_type != "swiglu":
        problems.append(f"ffn_type={config.ffn_type!r}")
    if config.norm_position != "pre":
        problems.append("norm_position='post'")
    if model_type == "llama" and config.attention_bias != config.attention_output_bias:
        problems.append("llama needs attention_bias == attention_output_bias")
    if model_type == "qwen2" and (not config.attention_bias or config.attention_output_bias):
        problems.append("qwen2 needs attention_bias=True and attention_output_bias=False")
    if model_type == "qwen2" and config.mlp_bias:
        problems.append("qwen2 has no mlp_bias")
    if model_type == "llama" and config.sliding_window is not None:
        problems.append("llama has no sliding window")
    if problems:
        raise ValueError(f"cannot express this model as Hugging Face {model_type}: {'; '.join(problems)}")
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters = {**config.rope_scaling, "rope_theta": config.rope_theta}
        rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,  # older transformers read these two
        "rope_scaling": config.rope_scaling,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "use_cache": True,
    }
    if model_type == "llama":
        hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                  max_window_layers=0 if config.sliding_window is not None else config.num_hidden_layers)
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
    return hf


# ---------------------------------------------------------------------------------------------------------------
# tensor names
# ---------------------------------------------------------------------------------------------------------------
def hf_name(name: str) -> str:
    """Our parameter name → the Hugging Face tensor name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    """Hugging Face tensor name → ours."""
    return name[len("model."):] if name.startswith("model.") else name


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = directory / SAFE_NAME, directory / INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = directory / shard
            if not path.is_file():
                raise ValueError(f"shard {shard} named in {index} is missing")
            tensors.update(load_file(str(path)))
        return tensors
    raise ValueError(f"no {SAFE_NAME} or {INDEX_NAME} in {directory} (pickle .bin checkpoints are not supported)")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None):
    """``CausalLM`` from a Hugging Face-format directory; errors list missing/unexpected/mismatched tensors."""
    directory = Path(path)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"no config.json in {directory}")
    config = config_from_hf(json.loads(cfg_path.read_text()))
    tensors = {our_name(k): v for k, v in _read_tensors(directory).items() if not k.endswith(_IGNORED_SUFFIXES)}
    model = CausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(hf_name(k) for k in expected if k not in tensors)
    unexpected = sorted(hf_name(k) for k in tensors if k not in expected)
    mismatched = sorted(
        f"{hf_name(k)}: file {tuple(t.shape)} vs model {tuple(expected[k])}"
        for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise ValueError(f"checkpoint {directory} does not match its config.json: " + "; ".join(parts))
    if dtype is None:
        dtype = tensors["embed_tokens.weight"].dtype
    model.load_state_dict(tensors, strict=False)  # strictness checked above (lm_head may be tied)
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------
def save_pretrained(model, path: str | os.PathLike, model_type: str | None = None,
                    max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards + index) that ``transformers`` loads."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    dtype = state["embed_tokens.weight"].dtype
    hf_cfg = config_to_hf(model.config, model_type, dtype)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    tensors = {hf_name(k): v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        (directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index would not be read, but would confuse
        atomic_write(directory / SAFE_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(directory / fname, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_NAME).unlink(missing_ok=True)  # the loader prefers a single file: drop a stale one
        atomic_write(directory / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True))
    atomic_write(directory / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True))


GENERATION_CONFIG_FILE = "generation_config.json"


def export_model(model, out_dir: str | os.PathLike, tokenizer: Any | None = None, template: Any | None = None
                 ) -> None:
    """Write a checkpoint directory that both we and ``transformers`` load end to end: ``save_pretrained`` files
    (or, for a LoRA model, only the adapters in PEFT's layout), and with a tokenizer ``export_tokenizer``'s files
    (``AutoTokenizer.from_pretrained(out_dir)`` gives our ids; ``generation_config.json`` stops where we stop)."""
    from intro2llm.model.lora import is_lora_model, save_lora_adapters

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora_model(model):  # only the adapters, PEFT's layout, pointing at the frozen base (lesson 14)
        save_lora_adapters(model, out_dir)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(out_dir)
    if tokenizer is not None:
        export_tokenizer(out_dir, tokenizer, template=template, config=getattr(model, "config", None))


def export_tokenizer(out_dir: str | os.PathLike, tokenizer: Any, template: Any | None = None,
                     config: ModelConfig | None = None) -> None:
    """The tokenizer files of a checkpoint directory: ``intro2llm_tokenizer.json`` (ours), ``tokenizer.json``
    (Hugging Face format, same ids), ``tokenizer_config.json`` (special tokens + the Jinja ``chat_template``) and
    ``generation_config.json`` (bos/eos/pad ids; eos = the template's stop token and the tokenizer's EOS).

    ``template``: a ``data.chat`` template name or object; None keeps the one ``out_dir`` already records, else
    ``"plain"`` (the synthetic Q/A format) when the tokenizer has its end token, else no chat template.
    """
    from intro2llm.data import chat

    out_dir = Path(out_dir)
    max_len = getattr(config, "max_position_embeddings", None)
    tokenizer.save_pretrained(out_dir, model_max_length=max_len)
    if template is None:
        template = chat.read_chat_template_name(out_dir)
        plain = chat.get_template("plain")
        if template is None and all(t in tokenizer.special_tokens for t in plain.special_tokens):
            template = plain
    stops: list[int] = []
    if template is not None:
        template = chat.get_template(template)
        chat.write_chat_template(out_dir, tokenizer, template)
        stops.append(chat.stop_token_id(tokenizer, template))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    gen: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,  # greedy by default, as our generate
    }
    if max_len is not None:
        gen["max_length"] = int(max_len)
    atomic_write(out_dir / GENERATION_CONFIG_FILE, json.dumps(gen, indent=2) + "\n")
