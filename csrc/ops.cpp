// The one schema list of the intro2llm operator library, and the Python module init for intro2llm._C.
//
// Every op the C++ (csrc/cpu) and CUDA (csrc/cuda) backends implement is declared here once; the
// implementations register with TORCH_LIBRARY_IMPL(intro2llm, CPU|CUDA, m) in their own files, and the
// Python side (intro2llm/ops/<op>.py) adds register_fake + register_autograd. Importing intro2llm._C runs the
// static registrations below; the module itself exports nothing.
#include <Python.h>
#include <torch/library.h>

// A bare module: loading the shared object is what registers the ops (no pybind11, which would double
// the compile time of every file). PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "intro2llm compiled ops (torch.ops.intro2llm)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(intro2llm, m) {
  // ---- rms_norm (csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu) -------------------------------------------
  // y = x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps) per row (last dim); rstd is saved for backward.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight)");

  // ---- apply_rope / swiglu / geglu (csrc/cpu/{rope,swiglu}.cpp, csrc/cuda/{rope,swiglu}.cu) ------------------
  // RoPE (split-half): q (B,H,T,D), k (B,Hkv,T,D) any strides, cos/sin (1|B, T, D); outputs contiguous.
  // apply_rope_bwd applies the transposed rotation to the upstream gradients (RoPE with -sin).
  m.def("apply_rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  m.def("apply_rope_bwd(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor grad_q_in, Tensor grad_k_in)");
  // Gated units: out = act(gate) * up; the backward recomputes act(gate). approximate: "none" (erf) | "tanh".
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  m.def("geglu_fwd(Tensor gate, Tensor up, str approximate) -> Tensor");
  m.def("geglu_bwd(Tensor grad_out, Tensor gate, Tensor up, str approximate) -> (Tensor grad_gate, Tensor grad_up)");

  // ---- cross_entropy / fused_linear_cross_entropy (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu) ----
  // logits (N, V), targets (N,) int64. Per-row fp32 loss (0 for ignore_index rows) and lse = logsumexp(row);
  // the reduction is done by the caller. bwd: grad_logits = grad_loss[i] * dloss_i/dlogits (zero rows for
  // ignored targets). fwd_bwd_: the loss, with logits overwritten by grad_scale * dloss_i/dlogits.
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, float label_smoothing, float z_loss) "
        "-> (Tensor loss, Tensor lse)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index, "
        "float label_smoothing, float z_loss) -> Tensor");
  m.def("cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor targets, float grad_scale, int ignore_index, "
        "float label_smoothing, float z_loss) -> (Tensor loss, Tensor lse)");

  // ---- flash_attention (csrc/cpu/flash_attention.cpp, csrc/cuda/flash_attention.cu) ---------------------------
  // out = softmax(q kᵀ·scale + mask) v; q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0; window <= 0: none;
  // key_padding_mask (B, Tk) bool, True = keep. lse (B, H, Tq) fp32 = log-sum-exp of each score row (saved).
  m.def("flash_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, int window, float scale, "
        "Tensor? key_padding_mask) -> (Tensor out, Tensor lse)");
  m.def("flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "int window, float scale, Tensor? key_padding_mask) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- fused AdamW step (csrc/cpu/adamw.cpp) ------------------------------------------------------------------
  // In place over lists (one entry per parameter): p, exp_avg, exp_avg_sq updated from grads; step_sizes[i] =
  // -lr / (1 - beta1^t_i), bc2_sqrts[i] = sqrt(1 - beta2^t_i). See intro2llm/optimizer/adamw.py.
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "float[] step_sizes, float[] bc2_sqrts, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool maximize) -> ()");

  // ---- fused decode step (csrc/cpu/decode_step.cpp) --------------------------------------------------------
  // One greedy/sampling step of a Llama-style CausalLM (pre-norm RMSNorm, RoPE, GQA, SwiGLU), all layers in one
  // call, fp32, CPU: h (B, C) = embedded tokens; `layers`: per layer the 10 fields of fast_decode.DecodeLayer
  // (LayerWeights in decode_step.cpp): input-norm weight (C), W_qkv (C, H·D + 2·Hkv·D) and its bias or None, W_o
  // (H·D, C) and bias, post-norm weight (C), W_gate_up (C, 2F) and bias, W_down (F, C) and bias (weights stored
  // (in, out)); k_cache/v_cache (L, B, Hkv, Tmax, D) get this
  // step's keys/values at slot `pos`; cos/sin (1|B, D) this step's rotary rows; key_padding_mask (B, pos + 1)
  // bool or None; window <= 0: none. Returns the (B, V) logits of rms_norm(h)·head (head (C, V)).
  m.def("decode_step(Tensor h, Tensor?[] layers, Tensor norm_weight, Tensor head, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int pos, Tensor cos, Tensor sin, Tensor? key_padding_mask, int num_heads, float eps, "
        "int window) -> Tensor");

  // ---- NF4 (csrc/cpu/nf4.cpp, csrc/cuda/nf4.cu; intro2llm/ops/nf4.py) ---------------------------------------
  // bitsandbytes' NF4: packed uint8 (ceil(numel/2),) high nibble first, absmax fp32 per block of `blocksize`.
  // nf4_dequantize -> (numel,) in dtype. nf4_matmul_fwd: x (M, K) @ dequant(W (N, K))ᵀ + bias -> (M, N) in x's
  // dtype, without building the dequantized W. nf4_matmul_bwd: grad_x (M, K) = grad_y (M, N) @ dequant(W).
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int numel, int blocksize, ScalarType dtype) -> Tensor");
  m.def("nf4_matmul_fwd(Tensor x, Tensor packed, Tensor absmax, int N, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_bwd(Tensor grad_y, Tensor packed, Tensor absmax, int K, int blocksize) -> Tensor");

  // ---- tokenizer core (csrc/cpu/bpe_train.cpp, csrc/cpu/bpe_encode.cpp) ------------------------------------
  // BPE merge loop (csrc/cpu/bpe_train.cpp): words = int32 base-symbol ids, word i = words[offsets[i]:offsets[i+1]],
  // counts = int64 per word; returns int32 (M, 3) merges (left id, right id, new id). No autograd, no fake impl
  // (the output size depends on the data); called from intro2llm/tokenizer/_train.py only.
  m.def("bpe_train(Tensor words, Tensor offsets, Tensor counts, int num_base, int num_new_tokens, int min_frequency) -> Tensor");
  // Byte-level BPE encoder (csrc/cpu/bpe_encode.cpp): build once from the token bytes (rank order) and a Unicode class
  // table (0x110000 uint8: 1 letter, 2 number, 4 whitespace), pattern 0 = gpt2, 1 = cl100k; returns a handle.
  // bpe_encode: UTF-8 bytes (uint8) -> int32 ids; bpe_encoder_free releases the handle.
  m.def("bpe_encoder_new(Tensor token_bytes, Tensor token_offsets, Tensor classes, int pattern) -> int");
  m.def("bpe_encoder_free(int handle) -> ()");
  m.def("bpe_encode(int handle, Tensor text) -> Tensor");
}
