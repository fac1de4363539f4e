"""Lesson 15 advanced tests: the fast flash attention (default backend) against the naive formula — GQA without
copies, cached decoding, gradients — and its memory: O(T·D) extra, where the naive formula needs O(T²)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import intro2llm.ops as ops


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_flash_attention_matches_naive_forward_and_backward(kv_heads):
    torch.manual_seed(0)
    q, do = torch.randn(2, 8, 67, 32), torch.randn(2, 8, 67, 32)
    k, v = torch.randn(2, kv_heads, 67, 32), torch.randn(2, kv_heads, 67, 32)
    got = _grads(lambda a, b, c: ops.flash_attention(a, b, c, window=20), q, k, v, do)
    want = _grads(lambda a, b, c: ops.flash_attention_reference(a, b, c, window=20), q, k, v, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5)
    assert got[2].shape == k.shape  # dK is summed over each group of query heads, not repeated


def test_decoding_step_equals_last_row_of_prefill():
    # with a KV cache, one new query at the end must see exactly what the last row of a full pass sees
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    full = ops.flash_attention(q, k, v, causal=True, window=16)
    step = ops.flash_attention(q[:, :, -1:], k, v, causal=True, window=16)
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


_CHILD = r"""
import torch, intro2llm.ops as ops
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
with torch.no_grad():
    q, k, v = (torch.randn(1, 4, 2048, 64) for _ in "qkv")
    for fn in (ops.flash_attention, ops.flash_attention_reference):  # flash first: nothing freed before it
        fn(*(t[:, :, :64] for t in (q, k, v)))  # warm-up: library initialization is not counted
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS:")
        fn(q, k, v)
        print(rss("VmHWM:") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak memory")
def test_flash_memory_is_linear_naive_is_quadratic():
    # one fresh process measures both (VmHWM reset before each call, minus VmRSS before it)
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    flash, naive = (int(x) for x in out.stdout.split()[-2:])
    scores_kib = 4 * 2048 * 2048 * 4 // 1024  # one fp32 (H, T, T) score matrix: 64 MiB
    assert naive >= scores_kib  # the naive formula materializes at least one score matrix
    assert flash < scores_kib / 8, f"flash attention used {flash} KiB, naive {naive} KiB"


# ------------------------------------------------------------------ the other optimizations: linear and sparse
from intro2llm.model import efficient_attention as ea  # noqa: E402
from intro2llm.ops.flash_attention import naive_attention  # noqa: E402


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_linear_attention_equals_its_quadratic_form(causal, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 33, 8, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, 33, 8, dtype=torch.float64), torch.randn(2, kv_heads, 33, 8, dtype=torch.float64)
    fast = ea.linear_attention(q, k, v, causal=causal)
    torch.testing.assert_close(fast, ea.linear_attention_quadratic(q, k, v, causal=causal))
    # it is not softmax attention: the kernel exp(q·k) was replaced by φ(q)·φ(k)
    assert not torch.allclose(fast, ops.flash_attention_reference(q, k, v, causal=causal), atol=1e-3)


def test_causal_linear_attention_is_an_rnn():
    # decoding token by token with a constant-size state gives the rows of the causal prefill
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    full = ea.linear_attention(q, k, v, causal=True)
    state = None
    for t in range(10):
        out, state = ea.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        torch.testing.assert_close(out, full[:, :, t])
    assert state[0].shape == (1, 2, 4, 4)  # (D, Dv) per head, independent of the 10 tokens seen


@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_attention_equals_masked_naive_attention(causal):
    torch.manual_seed(0)
    T, block = 45, 8  # 6 blocks, the last one partial
    q = torch.randn(2, 4, T, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, T, 16, dtype=torch.float64), torch.randn(2, 2, T, 16, dtype=torch.float64)
    layout = ea.sparse_layout(6, local_blocks=2, random_blocks=1, global_blocks=1, causal=causal, seed=3)
    got = ea.block_sparse_attention(q, k, v, layout, block, causal=causal)
    want = naive_attention(q, k, v, ea.block_sparse_mask(layout, block, T, T, causal=causal))
    torch.testing.assert_close(got, want)
    if causal:
        assert not layout.triu(1).any()  # never a tile above the diagonal
    # dense layout = ordinary (causal) attention
    dense = torch.ones(6, 6, dtype=torch.bool)
    torch.testing.assert_close(ea.block_sparse_attention(q, k, v, dense, block, causal=causal),
                               ops.flash_attention_reference(q, k, v, causal=causal))


def test_sparse_layout_keeps_local_global_and_random_blocks():
    layout = ea.sparse_layout(16, local_blocks=3, random_blocks=2, global_blocks=1, causal=True, seed=0)
    for i in range(16):
        row = set(layout[i].nonzero().flatten().tolist())
        local = set(range(max(0, i - 2), i + 1))
        assert local | {0} <= row  # the window and the global first block
        assert len(row - local - {0}) == min(2, max(0, i + 1 - len(local | {0})))  # random picks among the rest
    # the work: at most 3 + 1 + 2 tiles per row (linear in T), where causal attention computes 16·17/2 = 136
    assert layout.sum() <= 16 * 6 < 136


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_flash_attention_fwd_kernel")
def test_triton_flash_attention_kernel_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(ops.flash_attention(q, k, v, causal=True, backend="triton"),
                               ops.flash_attention_reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
