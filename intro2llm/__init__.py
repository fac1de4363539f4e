"""intro2llm: a modern LLM stack built from scratch — tokenizers, Transformer, pretraining, evaluation,
alignment (SFT, DPO, PPO, GRPO), LoRA/QLoRA — with every hot op as a readable PyTorch reference plus
Triton, C++ and CUDA fast paths (see ``intro2llm.ops``).
"""

__version__ = "0.1.0"
