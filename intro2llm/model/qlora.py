"""QLoRA: LoRA adapters over a frozen 4-bit NF4 base (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs").

``Linear4bit`` stores its weight as NF4 (``intro2llm.ops.nf4_quantize``: 4-bit codes of the 16 normal-quantile
levels, one absmax per 64-element block, optionally double-quantized absmax — bitsandbytes' exact format) and
computes ``y = x Wᵀ + b`` with ``intro2llm.ops.nf4_matmul``, which dequantizes block by block inside the matmul
instead of building the whole (out, in) weight. Its input gradient flows (``nf4_matmul`` has a backward for
``x``), the weight itself never trains. Compute dtype: bf16 (the paper's) or fp32.

Quantization swaps modules (gpt-fast style): ``prepare_qlora_model`` replaces each ``nn.Linear`` of the model
(not ``lm_head``) by a ``Linear4bit``, so the model code has no quantization branches. QLoRA is then
``get_lora_model(prepare_qlora_model(model))``: ``LoRALayer`` accepts a ``Linear4bit`` base.

Stored bytes per weight element: 0.5 (codes) + 4/64 (fp32 absmax) = 0.5625, i.e. 0.281× bf16; with double
quantization 0.5 + 1/64 + 4/(64·256) + ... ≈ 0.516, i.e. 0.258× bf16 (``Linear4bit.weight_nbytes``).

Not handled: quantized embeddings / LM head, re-quantizing a merged adapter (``merge_and_unload`` dequantizes),
``.to(dtype)`` of a quantized model (it would cast the fp32 absmax; move devices only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from intro2llm.ops import nf4 as nf4_ops  # intro2llm.ops.nf4_*: the op module itself (dispatch inside)

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


class Linear4bit(nn.Module):
    """``nn.Linear`` with a frozen NF4 weight: (..., in) → (..., out) in ``compute_dtype``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, double_quant: bool = True, blocksize: int = 64) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"Linear4bit: weight must be a 2-D (out, in) tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if not weight.is_floating_point():
            raise TypeError(f"Linear4bit: weight must be floating point, got {weight.dtype}")
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"Linear4bit: compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.double_quant = double_quant
        self.blocksize = blocksize
        q = nf4_ops.nf4_quantize(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        # the NF4Weight's tensors become buffers (state_dict, .to(device)); its other fields stay attributes
        self._nf4_fields: dict[str, Any] = {}
        self._nf4_tensor_fields: list[str] = []
        for f in dataclasses.fields(q):
            value = getattr(q, f.name)
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"nf4_{f.name}", value)
                self._nf4_tensor_fields.append(f.name)
            else:
                self._nf4_fields[f.name] = value
        self._nf4_cls = type(q)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, double_quant: bool = True,
                    blocksize: int = 64) -> Linear4bit:
        """Quantize an ``nn.Linear`` (its weight is not kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear expects nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, compute_dtype=compute_dtype, double_quant=double_quant,
                   blocksize=blocksize)

    def nf4_weight(self) -> Any:
        """The ``NF4Weight`` the ops take (rebuilt from the buffers: no copy)."""
        tensors = {name: getattr(self, f"nf4_{name}") for name in self._nf4_tensor_fields}
        return self._nf4_cls(**tensors, **self._nf4_fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        bias = self.bias
        return nf4_ops.nf4_matmul(x.to(self.compute_dtype), self.nf4_weight(), bias)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight the codes stand for, in ``compute_dtype``."""
        return nf4_ops.nf4_dequantize(self.nf4_weight()).to(self.compute_dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (compute dtype)."""
        w = self.dequantize()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def weight_nbytes(self) -> int:
        """Bytes the quantized weight occupies (codes + absmax or its double-quantized form + constants)."""
        return sum(getattr(self, f"nf4_{n}").numel() * getattr(self, f"nf4_{n}").element_size()
                   for n in self._nf4_tensor_fields)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, double_quant={self.double_quant}")


def prepare_qlora_model(model: nn.Module, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                        skip_modules: tuple[str, ...] = ("lm_head",), blocksize: int = 64) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (except those whose last name component is in ``skip_modules``) for a
    ``Linear4bit`` and freeze the whole model; in place, returns ``model``. Each layer is quantized and its
    full-precision weight dropped before the next, so peak memory grows by one layer at most.
    """
    from intro2llm.model.lora import is_lora_model

    if is_lora_model(model):
        raise ValueError("prepare_qlora_model: quantize the base before adding LoRA adapters (get_lora_model after)")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip_modules]
    if not names:
        raise ValueError("prepare_qlora_model: the model has no nn.Linear layer to quantize")
    tied = {id(p) for n, p in model.named_parameters() if n.startswith(tuple(skip_modules))}
    for name in names:
        linear = model.get_submodule(name)
        if id(linear.weight) in tied:  # a weight shared with a kept module must stay full precision
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(linear, compute_dtype=compute_dtype, double_quant=double_quant,
                                                      blocksize=blocksize))
        del linear
    model.requires_grad_(False)
    model.qlora_config = {"double_quant": double_quant, "blocksize": blocksize,
                          "compute_dtype": None if compute_dtype is None else str(compute_dtype).replace("torch.", "")}
    return model


def quantized_weight_report(model: nn.Module) -> dict[str, float]:
    """Stored bytes of every ``Linear4bit`` weight vs the same weights in bf16 (the ratio the lesson quotes)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    stored = sum(m.weight_nbytes() for m in layers)
    bf16 = sum(2 * m.in_features * m.out_features for m in layers)
    return {"layers": len(layers), "stored_bytes": stored, "bf16_bytes": bf16, "ratio": stored / bf16 if bf16 else 0.0}
