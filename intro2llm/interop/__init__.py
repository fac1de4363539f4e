"""intro2llm.interop: Hugging Face format (config.json, safetensors, Llama/Qwen2 tensor names) for CausalLM."""

from intro2llm.interop.hf import (
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    export_model,
    export_tokenizer,
    load_pretrained,
    save_pretrained,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "export_model", "export_tokenizer", "load_pretrained",
    "save_pretrained",
]
