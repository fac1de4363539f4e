"""``CausalLM``: the decoder-only language model (embeddings → N Transformer blocks → norm → LM head) and its
generation loop (greedy, temperature, top-k, top-p, repetition penalty; left-padded batches; KV cache).

Training: ``model(input_ids, labels=labels)`` shifts the labels inside (token t predicts token t+1; -100 is
ignored) and uses ``intro2llm.ops.cross_entropy``; with ``return_logits=False`` it calls
``intro2llm.ops.fused_linear_cross_entropy`` so the (B, T, V) logits never exist. ``set_gradient_checkpointing()``
recomputes each block in the backward instead of keeping its activations (QLoRA turns it on by default).

Generation (``generate`` / ``stream_generate``): the prompt is run once (prefill) into a ``StaticKVCache``
sized for prompt + new tokens, then one token per step (decode). Rows of a left-padded batch get
``position_ids = cumsum(attention_mask) - 1`` and their pad keys are masked, so each row generates exactly
what it would alone. The decode loop allocates nothing per step except the step's activations: the mask,
positions and rotary tables are sliced from buffers made once; each step runs on the decode-time weight
bundle of ``intro2llm.model.fast_decode`` (one C++ call per step on fp32 CPU) where the stack allows it.

Names of parameters follow Hugging Face Llama without the ``model.`` prefix (``embed_tokens``, ``layers.N.
self_attn.q_proj``, ``norm``, ``lm_head``): ``intro2llm.interop`` maps them. Not handled: beam search,
speculative decoding, stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.model import fast_decode
from intro2llm.model.config import ModelConfig
from intro2llm.model.embedding import (
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    check_positions,
    check_token_ids,
)
from intro2llm.model.kv_cache import DynamicKVCache, KVCache, StaticKVCache
from intro2llm.model.transformer_block import TransformerBlock, build_norm


@dataclass
class CausalLMOutput:
    """``logits`` (B, T, V) or None, ``loss`` scalar or None, ``kv_cache``, ``hidden_states`` (B, T, C) final-norm."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    kv_cache: KVCache | None = None
    hidden_states: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
@lesson_task(4)
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) logits with everything below the k-th largest per row set to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


@lesson_task(4)
def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep per row the smallest set of most likely tokens whose probability mass is ≥ p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p  # the set is complete once the mass before a token reaches p
    drop_sorted[..., 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): seen tokens' positive logits / penalty, negative ones × penalty."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


@lesson_task(4)
def sample_next_token(
    logits: torch.Tensor,  # (B, V)
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) int64
    """Greedy argmax, or a sample from softmax(logits / temperature) after top-k and top-p filtering.

    ``temperature == 0`` is greedy (the limit of temperature → 0).
    """
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions that restart at 0 wherever the segment id changes."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # start index of each segment
    return idx - first


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """Decoder-only Transformer language model built from a ``ModelConfig``."""

    @lesson_task(4)
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"CausalLM expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
            if config.use_rope
            else None
        )
        self.pos_encoding = (
            None if config.use_rope else SinusoidalPositionalEncoding(config.hidden_size,
                                                                      config.max_position_embeddings)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range  # Llama's init: N(0, 0.02) for every matrix, zero biases
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TokenEmbedding):
            nn.init.normal_(module.weight, std=std)

    gradient_checkpointing = False  # set_gradient_checkpointing(True): recompute each block in the backward

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation (gradient) checkpointing per Transformer block (``torch.utils.checkpoint``, non-reentrant):
        a training forward keeps only each block's input and the backward recomputes the block, trading one
        extra forward of the blocks for their activations' memory. Same values and gradients; no effect without
        autograd or with a KV cache."""
        self.gradient_checkpointing = bool(enabled)

    def num_parameters(self) -> int:
        """Unique parameters (a tied LM head counts once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------------ forward
    def _positions(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past, past + T, device=device)  # (T,) shared by every row
        # left padding: a row's first real token is position 0; pads get 0 too (they are masked anyway)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)

    @lesson_task(4)
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int
        attention_mask: torch.Tensor | None = None,  # (B, T_past + T) 1 = real token, 0 = padding
        labels: torch.Tensor | None = None,  # (B, T) int, -100 = ignore; shifted inside
        position_ids: torch.Tensor | None = None,  # (B, T) or (T,)
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        num_logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,  # (B, T) int: packed samples, attention stays within a segment
    ) -> CausalLMOutput:
        """Logits (B, T, V), and the next-token loss when ``labels`` are given (mean over non-ignored tokens).

        ``use_cache=True`` without a ``kv_cache`` starts a ``DynamicKVCache`` (returned in the output).
        ``return_logits=False`` with labels computes the loss with the fused linear + cross-entropy op and
        returns ``logits=None``. ``num_logits_to_keep=n`` computes logits for the last n positions only.
        ``segment_ids`` (packed rows, no cache): token i attends to token j only if their segment ids are equal,
        and positions restart at 0 at each segment start unless ``position_ids`` are given.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids must contain at least one token per row, got shape (B, 0)")
        if use_cache and kv_cache is None:
            kv_cache = DynamicKVCache()
        past = kv_cache.seq_len if kv_cache is not None else 0
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must have shape (B, T_past + T) = ({B}, {past + T}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(torch.bool)
        if segment_ids is not None:
            if kv_cache is not None or tuple(segment_ids.shape) != (B, T):
                raise ValueError(f"segment_ids must have the shape of input_ids {(B, T)} and no kv_cache, got "
                                 f"{tuple(segment_ids.shape)}")
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
        if position_ids is None:
            if past + T > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {past + T} exceeds max_position_embeddings="
                    f"{self.config.max_position_embeddings} (input_ids {tuple(input_ids.shape)}, {past} cached)"
                )
            position_ids = self._positions(B, T, past, attention_mask, input_ids.device)
        else:
            if position_ids.shape[-1] != T:
                raise ValueError(f"position_ids must end in T={T}, got shape {tuple(position_ids.shape)}")
            check_positions(position_ids, self.config.max_position_embeddings)
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have the shape of input_ids {(B, T)}, got {tuple(labels.shape)}")
        key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask

        h = self._backbone(input_ids, position_ids, kv_cache, key_padding_mask, check=True,
                           segment_ids=segment_ids)  # (B, T, C)

        loss = logits = None
        if labels is not None:
            targets = labels[:, 1:]  # token t predicts token t + 1
            if return_logits:
                logits = self.lm_head(h)  # (B, T, V)
                loss = ops.cross_entropy(logits[:, :-1], targets, ignore_index=-100)
            else:
                loss = ops.fused_linear_cross_entropy(h[:, :-1], self.lm_head.weight, targets, ignore_index=-100)
        elif return_logits:
            logits = self.lm_head(h[:, -num_logits_to_keep:] if num_logits_to_keep > 0 else h)
        return CausalLMOutput(logits=logits, loss=loss, kv_cache=kv_cache, hidden_states=h)

    def _backbone(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_cache: KVCache | None,
                  key_padding_mask: torch.Tensor | None, check: bool = False,
                  segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings → blocks → final norm, (B, T) → (B, T, C); ids already validated (``check``: positions)."""
        h = self.embed_tokens(input_ids, check=False)  # (B, T, C)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(position_ids, check=check)  # (T, D) or (B, T, D) each
        else:
            h = self.pos_encoding(h, position_ids)
        h = self.dropout(h)
        checkpointed = self.gradient_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:  # keep only the block's input; its activations are recomputed in the backward
                extra = () if segment_ids is None else (segment_ids,)
                h = checkpoint(layer, h, rope, None, key_padding_mask, *extra, use_reentrant=False)
            else:
                h = layer(h, rope, kv_cache, key_padding_mask, segment_ids) if segment_ids is not None \
                    else layer(h, rope, kv_cache, key_padding_mask)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return self.norm(h)

    # ------------------------------------------------------------------------------------------------ generation
    @torch.no_grad()  # not inference_mode: the returned ids must be usable in a later training forward
    @lesson_task(4)
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
        """(B, T0) prompt (left-padded, with ``attention_mask``) → (B, T0 + n) prompt + generated tokens.

        ``options`` are ``stream_generate``'s keyword arguments (sampling, ``eos_token_id``, ``attention_mask``,
        ``use_cache``, ...). n ≤ ``max_new_tokens``: generation stops early when every row has produced
        ``eos_token_id``; rows that finished earlier are filled with ``pad_token_id`` (default:
        config.pad_token_id, else the eos id).
        """
        steps = list(self.stream_generate(input_ids, max_new_tokens, **options))
        if not steps:
            return input_ids.clone()
        return torch.cat([input_ids, torch.stack(steps, dim=1).to(input_ids.dtype)], dim=1)

    @torch.no_grad()  # not inference_mode: the returned ids must be usable in a later training forward
    @lesson_task(4)
    def stream_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, a (B,) int64 tensor per step; ``generate`` collects them.

        Greedy unless ``do_sample`` (then ``temperature``, ``top_k``, ``top_p`` and ``generator`` apply);
        ``attention_mask`` marks a left-padded batch's real tokens.
        """
        _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
        B, T0 = input_ids.shape
        device = input_ids.device
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T0):
                raise ValueError(f"attention_mask must have the shape of input_ids {(B, T0)}, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
            elif not bool(mask[:, -1].all()):
                raise ValueError("attention_mask: batches must be left-padded (the last column must be all 1)")
        last_pos = (T0 if mask is None else int(mask.sum(-1).max())) + max_new_tokens - 1
        if max_new_tokens > 0 and last_pos >= self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if max_new_tokens == 0:
            return
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {self.config.vocab_size})")
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        seen = None
        if repetition_penalty != 1.0:
            real = torch.ones_like(input_ids) if mask is None else mask.long()  # pad ids are not "seen"
            counts = torch.zeros(B, self.config.vocab_size, dtype=torch.long, device=device)
            seen = counts.scatter_add_(1, input_ids, real) > 0  # (B, V); scatter_add: duplicates cannot clash
        finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_token_id is not None else None
        if self.rotary is not None:
            self.rotary.tables(min(T0 + max_new_tokens, self.config.max_position_embeddings), device)
        steps = (self._decode_cached if use_cache else self._decode_uncached)(input_ids, mask, max_new_tokens)
        logits = next(steps)  # (B, V) logits of the next position
        for i in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next_token(logits, **sampling)  # (B,)
            if finished is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                finished |= nxt == eos_token_id
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            yield nxt
            if i == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                steps.close()
                return
            logits = steps.send(nxt)  # the step function appends nxt and returns the following logits

    @lesson_task(4)
    def _decode_cached(self, input_ids: torch.Tensor, mask: torch.Tensor | None,
                       max_new_tokens: int) -> Iterator[torch.Tensor]:
        """Prefill then one-token steps with a StaticKVCache; yields (B, V) next-token logits."""
        B, T0 = input_ids.shape
        total = T0 + max_new_tokens
        device = input_ids.device
        cache = StaticKVCache.from_config(self.config, B, total, self.lm_head.weight.dtype, device)
        full_mask = None
        if mask is not None:
            full_mask = torch.ones(B, total, dtype=torch.bool, device=device)  # made once, sliced per step
            full_mask[:, :T0] = mask
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T0)
            next_pos = pos[:, -1:] + 1  # (B, 1)
            steps = next_pos + torch.arange(max_new_tokens, device=device)[None, :]  # (B, n) all decode positions
        else:
            pos = torch.arange(T0, device=device)
            steps = torch.arange(T0, total, device=device)[:, None]  # (n, 1): step i uses positions steps[i]
        h = self._backbone(input_ids, pos, cache, None if full_mask is None else full_mask[:, :T0])
        nxt = yield self.lm_head(h[:, -1])  # (B, V) in, (B,) next tokens back
        step = fast_decode.step_for(self, cache)  # None: a module was swapped (LoRA, 4-bit): the module path
        for i in range(max_new_tokens - 1):
            p = steps[i] if full_mask is None else steps[:, i : i + 1]
            kpm = None if full_mask is None else full_mask[:, : T0 + i + 1]
            if step is not None:
                nxt = yield step(nxt, p, kpm)
            else:
                h = self._backbone(nxt[:, None], p, cache, kpm)  # (B, 1, C)
                nxt = yield self.lm_head(h[:, -1])

    def _decode_uncached(self, input_ids: torch.Tensor, mask: torch.Tensor | None,
                         max_new_tokens: int) -> Iterator[torch.Tensor]:
        """The O(T²) loop: re-runs the whole sequence each step (the baseline the cache is measured against)."""
        seq, m = input_ids, mask
        for _ in range(max_new_tokens):
            pos = self._positions(seq.shape[0], seq.shape[1], 0, m, seq.device)
            h = self._backbone(seq, pos, None, m)
            nxt = yield self.lm_head(h[:, -1])  # (B, V)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if m is not None:
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)

    # ------------------------------------------------------------------------------------------------ interop
    # interop depends on model, not the reverse: these two thin methods import it when called.
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
                        ) -> CausalLM:
        """Load a Hugging Face-format directory (config.json with model_type llama|qwen2, safetensors)."""
        from intro2llm.interop.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, model_type: str | None = None, max_shard_bytes: int | None = None) -> None:
        """Write config.json + model.safetensors (sharded with an index above ``max_shard_bytes``)."""
        from intro2llm.interop.hf import save_pretrained

        save_pretrained(self, path, model_type=model_type, max_shard_bytes=max_shard_bytes)
