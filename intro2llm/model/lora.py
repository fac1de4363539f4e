"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of LLMs").

A frozen weight ``W₀ (out, in)`` gets a trainable update ``ΔW = (α / r) · B A`` with ``A (r, in)``, ``B (out, r)``,
``r ≪ min(in, out)``: ``h = W₀ x + (α / r) · B (A x)``. ``A`` starts Kaiming-uniform (like ``nn.Linear``), ``B``
starts at zero, so a fresh adapter leaves the model's outputs unchanged and only ``r · (in + out)`` numbers per
layer train instead of ``in · out`` (4096×4096, r = 8: 16 777 216 → 65 536, 256× fewer).

Layout follows PEFT's ``tuners/lora/layer.py``: the original module is kept intact as ``base_layer`` and the
adapter lives beside it in ``lora_A`` / ``lora_B`` (``nn.Linear`` without bias) and ``lora_dropout``, so the
state-dict names are PEFT's minus the adapter name. ``merge()`` folds ``ΔW`` into ``W₀`` (inference without the
extra matmuls), ``unmerge()`` takes it out again (both exact up to fp32 rounding; merging an already merged
layer, or unmerging an unmerged one, is a no-op with a warning, as in PEFT).

``save_lora_adapters`` / ``load_lora_adapters`` read and write PEFT's files (``adapter_model.safetensors`` with
``base_model.model.<Hugging Face module name>.lora_A.weight`` keys + ``adapter_config.json``), so ``peft`` loads
our adapters onto ``transformers``' model and we load adapters that ``peft`` saved. The base may be an
``nn.Linear`` or a 4-bit ``Linear4bit`` (QLoRA, ``intro2llm.model.qlora``).

``LoRALayer.forward`` is the plain formula; over a frozen ``nn.Linear`` it takes ``lora_linear``, a fast path with
the same math whose autograd function accumulates the base output and the adapter term in one buffer and never
computes a gradient for W₀ (``FAST_PATH = False`` turns it off; the tests compare the two).

Not handled: several adapters per layer, DoRA, rsLoRA, per-module rank/alpha patterns, LoRA on embeddings or
convolutions, ``modules_to_save`` (files using them are rejected with an error naming the feature).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intro2llm.course import lesson_task

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
QLORA_CONFIG = "qlora_config.json"  # ours: the base was NF4-quantized for training (double_quant, compute_dtype)
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """What ``get_lora_model`` applied (kept on the model as ``model.lora_config``)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    base_model_name_or_path: str | None = None  # where the frozen base comes from (a pointer, not the weights)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"qlora": {...}} recorded by the trainers


def _base_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or a ``Linear4bit``."""
    return int(base.out_features), int(base.in_features)


def _is_linear_like(module: nn.Module) -> bool:
    from intro2llm.model.qlora import Linear4bit

    return type(module) is nn.Linear or isinstance(module, Linear4bit)


@lesson_task(14)
class LoRALayer(nn.Module):
    """``base_layer(x) + (alpha / r) · lora_B(lora_A(dropout(x)))`` over a frozen ``nn.Linear`` / ``Linear4bit``."""

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__()
        if not _is_linear_like(base_layer):
            raise TypeError(f"LoRALayer wraps nn.Linear or Linear4bit, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALayer: r must be a positive int, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"LoRALayer: alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALayer: dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = _base_shape(base_layer)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        ref = next(iter(base_layer.parameters()), None)
        device = ref.device if ref is not None else None
        # adapters train in fp32 even over a bf16/4-bit base (they are the master weights; PEFT does the same)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ← Kaiming-uniform (nn.Linear's init, a = √5), B ← 0: a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        if not self.merged and _fast_path_applies(self, x):  # same math, fewer tensors (see lora_linear)
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling)
        y = self.base_layer(x)
        if self.merged:
            return y
        a = self.lora_A.weight
        ax = nn.functional.linear(self.lora_dropout(x).to(a.dtype), a)  # (..., r)
        # y + scaling · (A x) Bᵀ in one addmm; under autocast both operands come out in the autocast dtype
        out = torch.addmm(y.reshape(-1, self.out_features).to(ax.dtype), ax.reshape(-1, self.r),
                          self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(y.shape).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B A, (out, in) fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _plain_base(self) -> nn.Linear:
        if type(self.base_layer) is not nn.Linear:
            raise TypeError(
                f"merge()/unmerge() need an nn.Linear base, this layer's base is {type(self.base_layer).__name__}: "
                "adding ΔW to 4-bit weights would re-quantize them; use merge_and_unload(model), which replaces the "
                "layer by a dequantized nn.Linear holding W₀ + ΔW"
            )
        return self.base_layer

    @torch.no_grad()
    def merge(self) -> None:
        """W₀ ← W₀ + ΔW; the forward then runs the base only. Already merged: no-op with a warning."""
        base = self._plain_base()
        if self.merged:
            warnings.warn("LoRALayer.merge(): already merged; nothing to do", UserWarning, stacklevel=2)
            return
        w = base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ ← W₀ − ΔW (W₀ back up to rounding). Not merged: no-op with a warning."""
        base = self._plain_base()
        if not self.merged:
            warnings.warn("LoRALayer.unmerge(): not merged; nothing to do", UserWarning, stacklevel=2)
            return
        w = base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


# ---------------------------------------------------------------------------------------------------------------
# Fast path: the same forward and gradients over a frozen nn.Linear, without the temporaries
# ---------------------------------------------------------------------------------------------------------------
FAST_PATH = True  # LoRALayer uses lora_linear where it applies; False: always the plain forward (tests compare)


def _fast_path_applies(layer: LoRALayer, x: torch.Tensor) -> bool:
    """``lora_linear`` computes ``LoRALayer.forward``'s values and gradients (up to fp32 rounding) when: the base is
    a frozen ``nn.Linear``, there is no dropout, no autocast, and x, W₀, A and B share one dtype (fp32 adapters over
    an fp32 base)."""
    base = layer.base_layer
    if not FAST_PATH or type(base) is not nn.Linear or not isinstance(layer.lora_dropout, nn.Identity):
        return False
    w, a = base.weight, layer.lora_A.weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.dtype == w.dtype == a.dtype == layer.lora_B.weight.dtype and x.device == w.device


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W₀ᵀ + b + s (x Aᵀ) Bᵀ with W₀, b frozen; x is (N, in). Autograd of the plain forward keeps the base
    output and the sum as two (N, out) tensors and adds x's two gradient contributions in a third; here each sum is
    accumulated in place into one buffer (``addmm_``), and no gradient is ever computed for W₀ or b:

        forward:  y = x W₀ᵀ + b;  u = x Aᵀ (N, r, saved);  y += s u Bᵀ
        backward: du = s g B;  dB = s gᵀ u;  dA = duᵀ x;  dx = g W₀ + du A
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        u = torch.mm(x, lora_a.t())  # (N, r)
        y.addmm_(u, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        g = g.contiguous()
        du = torch.mm(g, lora_b * s)  # (N, r)
        grad_a = torch.mm(du.t(), x) if ctx.needs_input_grad[3] else None  # (r, in)
        grad_b = torch.mm(u.t(), g).t().mul_(s) if ctx.needs_input_grad[4] else None  # (out, r)
        grad_x = torch.mm(g, weight).addmm_(du, lora_a) if ctx.needs_input_grad[0] else None  # (N, in)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x W₀ᵀ + b + scaling · (x Aᵀ) Bᵀ`` for x (..., in), W₀ (out, in) and b frozen, A (r, in), B (out, r): the
    plain forward's values and gradients (tested equal up to fp32 rounding), fewer temporaries
    (``_LoRALinearFunction``)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    lead = x.shape[:-1]
    y = _LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, float(scaling))
    return y.view(*lead, weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Module name → LoRALayer for every adapted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALayer) for m in model.modules())


def _check_targets(target_modules: Any) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty sequence of module names, got {target_modules!r}")
    return targets


def _apply(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> None:
    for name in names:
        _set_submodule(model, name, LoRALayer(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout))


@lesson_task(14)
def get_lora_model(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                   target_modules: Any = DEFAULT_TARGETS, base_model_name_or_path: str | None = None) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each linear layer whose last name component is in
    ``target_modules`` in a ``LoRALayer`` (in place; returns ``model``). ``lm_head`` is adapted only if named.

    Raises ``ValueError`` when no module matches (listing the linear layers there are) or the model already has
    adapters.
    """
    targets = _check_targets(target_modules)
    if is_lora_model(model):
        raise ValueError("get_lora_model: the model already has LoRA adapters (one adapter per layer is supported)")
    names = [n for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1] in targets and _is_linear_like(m)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear_like(m)})
        raise ValueError(f"get_lora_model: no linear layer matches target_modules {list(targets)}; "
                         f"the model's linear layers are named {linear}")
    model.requires_grad_(False)
    _apply(model, names, r, alpha, dropout)
    found = tuple(t for t in targets if any(n.rsplit(".", 1)[-1] == t for n in names))
    model.lora_config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=found,
                                   base_model_name_or_path=base_model_name_or_path)
    return model


def set_lora_merged(model: nn.Module, merged: bool) -> None:
    """``merge()`` (True) or ``unmerge()`` (False) every LoRALayer that is not already in that state."""
    for layer in lora_layers(model).values():
        if layer.merged != merged:
            layer.merge() if merged else layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALayer by a plain ``nn.Linear`` holding W₀ + ΔW (a 4-bit base is dequantized first, in its
    compute dtype); the model is then an ordinary one (``save_pretrained``, the fast decode path). In place."""
    from intro2llm.model.qlora import Linear4bit

    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if isinstance(base, Linear4bit):
            base = base.to_linear()
        elif layer.merged:
            _set_submodule(model, name, base)
            continue
        w = base.weight
        w.copy_((w.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        base.requires_grad_(False)
        _set_submodule(model, name, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@dataclass
class ParameterReport:
    """Trainable vs all parameters (a 4-bit weight counts its in·out elements)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # PEFT's print_trainable_parameters() wording
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: " \
               f"{100 * self.fraction:.4f}"


def trainable_parameter_report(model: nn.Module) -> ParameterReport:
    """How many parameters train (requires_grad) out of all of them."""
    from intro2llm.model.qlora import Linear4bit

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return ParameterReport(trainable=trainable, total=total)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (``layers.0.self_attn.q_proj.lora_A.weight``)."""
    return {n: p for n, p in model.state_dict(keep_vars=True).items() if ".lora_A." in n or ".lora_B." in n}


# ---------------------------------------------------------------------------------------------------------------
# PEFT files
# ---------------------------------------------------------------------------------------------------------------
def _hf_module(name: str) -> str:
    from intro2llm.interop.hf import hf_name

    return hf_name(name)


def save_lora_adapters(model: nn.Module, directory: str | os.PathLike,
                       base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's layout (loadable by
    ``peft.PeftModel.from_pretrained`` onto the ``transformers`` version of the base)."""
    from safetensors.torch import save_file

    from intro2llm._io import atomic_write

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_lora_adapters: the model has no LoRA adapters (call get_lora_model first)")
    ranks = {layer.r for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"save_lora_adapters: one rank and alpha for every layer is supported, got ranks "
                         f"{sorted(ranks)} and alphas {sorted(alphas)}")
    cfg = getattr(model, "lora_config", None)
    base = base_model_name_or_path or (cfg.base_model_name_or_path if cfg is not None else None)
    tensors = {}
    for name, layer in layers.items():
        prefix = _PEFT_PREFIX + _hf_module(name)
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    layer0 = next(iter(layers.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    dropout = layer0.lora_dropout.p if isinstance(layer0.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": layer0.r, "lora_alpha": layer0.alpha,
        "lora_dropout": dropout, "target_modules": targets, "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    qlora = cfg.extra.get("qlora") if cfg is not None else None
    if qlora:  # beside PEFT's files (peft warns on unknown config keys): how to quantize the base again
        atomic_write(directory / QLORA_CONFIG, json.dumps(qlora, indent=2, sort_keys=True))
    else:
        (directory / QLORA_CONFIG).unlink(missing_ok=True)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory``, checked for the features this module implements."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"no {ADAPTER_CONFIG} in {directory}")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    unsupported = []
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            unsupported.append(f"{key}={cfg[key]}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            unsupported.append(f"{key}={cfg[key]}")
    for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices"):
        if cfg.get(key) not in (None, [], {}):
            unsupported.append(f"{key}={cfg[key]}")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        unsupported.append(f"bias={cfg.get('bias')}")
    if unsupported:
        raise ValueError(f"{path}: unsupported LoRA features {unsupported}")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise ValueError(f"{path}: r must be a positive int, got {cfg.get('r')!r}")
    return cfg


def _read_adapter_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Our module name → {"A": (r, in), "B": (out, r)} from a PEFT ``adapter_model.safetensors``."""
    from safetensors.torch import load_file

    from intro2llm.interop.hf import our_name

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"no {ADAPTER_WEIGHTS} in {directory} (pickle adapter_model.bin files are not supported)")
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    out: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in load_file(str(path)).items():
        m = pattern.match(key)
        if m is None:
            bad.append(key)
            continue
        out.setdefault(our_name(m.group(1)), {})[m.group(2)] = t
    if bad:
        raise ValueError(f"{path}: tensors that are not LoRA A/B weights: {sorted(bad)}")
    incomplete = sorted(_hf_module(n) for n, ab in out.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{path}: modules with only one of lora_A / lora_B: {incomplete}")
    return out


@torch.no_grad()
def load_lora_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load PEFT-format adapters into ``model`` (in place; returns it). A model without adapters gets them on
    exactly the modules the file has; a model with adapters must have the same rank and adapted modules.

    Raises ``ValueError`` naming the problem: rank, target modules or base shapes that do not match.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    tensors = _read_adapter_tensors(directory)
    r, alpha, dropout = cfg["r"], cfg.get("lora_alpha", 8), float(cfg.get("lora_dropout", 0.0))
    modules = dict(model.named_modules())
    unknown = sorted(_hf_module(n) for n in tensors if n not in modules)
    adapted = lora_layers(model)
    if adapted:
        model_ranks = sorted({layer.r for layer in adapted.values()})
        if model_ranks != [r]:
            raise ValueError(f"load_lora_adapters: rank mismatch: the adapter in {directory} has r={r}, the model's "
                             f"adapters have r={model_ranks}")
        extra = sorted(_hf_module(n) for n in tensors if n not in adapted and n not in unknown)
        missing = sorted(_hf_module(n) for n in adapted if n not in tensors)
        if unknown or extra or missing:
            raise ValueError(
                f"load_lora_adapters: target modules do not match: the adapter in {directory} has "
                f"{sorted(set(unknown) | set(extra))} that the model does not adapt, the model adapts {missing} "
                "that the adapter lacks"
            )
        if any(layer.merged for layer in adapted.values()):
            raise ValueError("load_lora_adapters: the model's adapters are merged; unmerge() them first")
    else:
        not_linear = sorted(_hf_module(n) for n in tensors if n in modules and not _is_linear_like(modules[n]))
        if unknown or not_linear:
            raise ValueError(f"load_lora_adapters: target modules do not match: the adapter in {directory} adapts "
                             f"{unknown + not_linear}, which are not linear layers of the model")
    mismatched = []
    for name, ab in tensors.items():
        layer = adapted.get(name) or modules[name]
        out_f, in_f = _base_shape(layer.base_layer if isinstance(layer, LoRALayer) else layer)
        a, b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if a[0] != r or b[1] != r:
            mismatched.append(f"{_hf_module(name)}: lora_A {a} / lora_B {b} do not have rank r={r} of the config")
        elif a != (r, in_f) or b != (out_f, r):
            mismatched.append(f"{_hf_module(name)}: adapter base (out, in) = ({b[0]}, {a[1]}) vs model ({out_f}, "
                              f"{in_f})")
    if mismatched:
        raise ValueError(f"load_lora_adapters: shape mismatch with {directory}: {mismatched}")
    if not adapted:
        model.requires_grad_(False)
        _apply(model, sorted(tensors), r, alpha, dropout)
        targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in tensors}))
        model.lora_config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                                       base_model_name_or_path=cfg.get("base_model_name_or_path"))
    for name, layer in lora_layers(model).items():
        layer.alpha, layer.scaling = alpha, alpha / r
        layer.lora_A.weight.copy_(tensors[name]["A"])
        layer.lora_B.weight.copy_(tensors[name]["B"])
    if hasattr(model, "lora_config"):
        model.lora_config.alpha = alpha
    return model


def lora_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """``model.lora_config`` as a JSON-ready dict, or None for a model without adapters."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        layers = lora_layers(model)
        if not layers:
            return None
        first = next(iter(layers.values()))  # adapters added by hand: describe them from the layers
        cfg = LoRAConfig(r=first.r, alpha=first.alpha, target_modules=tuple(sorted({n.rsplit(".", 1)[-1]
                                                                                    for n in layers})))
    d = asdict(cfg)
    d["target_modules"] = list(d["target_modules"])
    return d


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints (used by intro2llm.training.trainer.Trainer)
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint stores: only the adapters of a LoRA model (the frozen base is referenced by
    ``model.lora_config.base_model_name_or_path``), else the whole ``state_dict()``."""
    if not is_lora_model(model):
        return model.state_dict()
    return {n: t.detach() for n, t in lora_state_dict(model).items()}


def checkpoint_missing_keys(model: nn.Module, missing: list[str]) -> list[str]:
    """Of the keys ``load_state_dict(strict=False)`` reported missing, those a checkpoint should have had (for a
    LoRA model: adapter tensors only, the frozen base comes from elsewhere)."""
    if not is_lora_model(model):
        return list(missing)
    return [k for k in missing if ".lora_A." in k or ".lora_B." in k]
