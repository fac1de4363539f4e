// Byte-level BPE encoder on CPU: the pre-tokenization regex (GPT-2 or cl100k) hand-written as a scanner over
// UTF-8, then tiktoken's byte-pair merge per pre-token. Same ids as ByteLevelBPETokenizer's Python path and as
// tiktoken (tests/test_tokenizer_encode.py compares them on real text and arbitrary Unicode).
//
// Unicode classes (\p{L}, \p{N}, \s) come from a 0x110000-entry table that Python builds with the `regex` package
// itself, so the scanner and the Python path agree on every code point. An encoder is built once per tokenizer
// (bpe_encoder_new -> integer handle, kept in a registry here) because rebuilding the rank table per call would
// cost more than encoding a short text; bpe_encoder_free releases it.
//
// Pre-token rules (first alternative that matches wins, as in the regexes of bpe_tokenizer.py):
//   gpt2:   '(?:[sdmt]|ll|ve|re) | ' '?L+ | ' '?N+ | ' '?O+ | \s+(?!\S) | \s+        (O = not L, N or \s)
//   cl100k: (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\nLN]?L+ | N{1,3} | ' '?O+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
// Merge rule (tiktoken): a pre-token that is a token is one id; otherwise repeatedly merge the adjacent pair whose
// concatenation has the lowest rank (leftmost on ties) until none is a token.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace intro2llm {
namespace {

constexpr uint8_t kLetter = 1, kNumber = 2, kSpace = 4;
constexpr int64_t kGpt2 = 0, kCl100k = 1;

struct Encoder {
  std::string bytes;                                   // all token bytes, back to back
  std::unordered_map<std::string_view, int32_t> rank;  // views into `bytes`
  std::vector<uint8_t> cls;                            // code point -> class bits
  int64_t pattern;
};

std::mutex registry_mutex;
std::unordered_map<int64_t, std::shared_ptr<Encoder>> registry;
int64_t next_handle = 1;

// Decode the code point at s[i] (valid UTF-8 from Python); sets its byte length.
inline uint32_t decode(const uint8_t* s, int64_t i, int64_t n, int& len) {
  const uint8_t c = s[i];
  if (c < 0x80) { len = 1; return c; }
  if ((c >> 5) == 0x6 && i + 1 < n) { len = 2; return ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu); }
  if ((c >> 4) == 0xE && i + 2 < n) {
    len = 3;
    return ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
  }
  if ((c >> 3) == 0x1E && i + 3 < n) {
    len = 4;
    return ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
  }
  len = 1;  // not reachable for text that came from Python's str.encode("utf-8")
  return 0xFFFD;
}

// A view of the text as code points with their classes, scanned once up front.
struct Scan {
  std::vector<uint32_t> cp;
  std::vector<uint8_t> cls;
  std::vector<int64_t> off;  // byte offset of each code point; off[n] = total bytes
};

Scan scan_text(const uint8_t* s, int64_t n, const std::vector<uint8_t>& table) {
  Scan sc;
  sc.cp.reserve(n);
  sc.cls.reserve(n);
  sc.off.reserve(n + 1);
  for (int64_t i = 0; i < n;) {
    int len;
    const uint32_t c = decode(s, i, n, len);
    sc.cp.push_back(c);
    sc.cls.push_back(c < table.size() ? table[c] : 0);
    sc.off.push_back(i);
    i += len;
  }
  sc.off.push_back(n);
  return sc;
}

inline bool is_other(uint8_t k) { return (k & (kLetter | kNumber | kSpace)) == 0; }
inline bool is_nl(uint32_t c) { return c == '\r' || c == '\n'; }
inline uint32_t lower(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c == 0x17F) return 's';   // LATIN SMALL LETTER LONG S folds to 's' under (?i)
  if (c == 0x212A) return 'k';  // KELVIN SIGN folds to 'k' (no contraction uses it; kept for completeness)
  return c;
}

// Length (in code points) of the pre-token starting at i; always >= 1.
int64_t next_gpt2(const Scan& t, int64_t i) {
  const int64_t n = static_cast<int64_t>(t.cp.size());
  const auto& cp = t.cp;
  const auto& k = t.cls;
  if (cp[i] == '\'' && i + 1 < n) {
    const uint32_t a = cp[i + 1];
    if (a == 's' || a == 'd' || a == 'm' || a == 't') return 2;
    if (i + 2 < n) {
      const uint32_t b = cp[i + 2];
      if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return 3;
    }
  }
  const int64_t j0 = (cp[i] == ' ' && i + 1 < n) ? i + 1 : i;  // the optional leading space
  for (uint8_t want : {kLetter, kNumber}) {
    if (k[j0] & want) {
      int64_t j = j0;
      while (j < n && (k[j] & want)) ++j;
      return j - i;
    }
  }
  if (is_other(k[j0])) {
    int64_t j = j0;
    while (j < n && is_other(k[j])) ++j;
    return j - i;
  }
  // whitespace: \s+(?!\S) leaves the last space of a run to the word after it; else \s+
  int64_t j = i;
  while (j < n && (k[j] & kSpace)) ++j;
  if (j == n || j - i == 1) return j - i;
  return j - 1 - i;
}

int64_t next_cl100k(const Scan& t, int64_t i) {
  const int64_t n = static_cast<int64_t>(t.cp.size());
  const auto& cp = t.cp;
  const auto& k = t.cls;
  if (cp[i] == '\'' && i + 1 < n) {
    const uint32_t a = lower(cp[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const uint32_t b = lower(cp[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  {
    int64_t j = i;
    if (!(k[j] & kLetter) && !(k[j] & kNumber) && !is_nl(cp[j]) && j + 1 < n && (k[j + 1] & kLetter)) ++j;
    if (k[j] & kLetter) {
      while (j < n && (k[j] & kLetter)) ++j;
      return j - i;
    }
  }
  if (k[i] & kNumber) {
    int64_t j = i;
    while (j < n && j - i < 3 && (k[j] & kNumber)) ++j;
    return j - i;
  }
  // ' '?[^\s\p{L}\p{N}]+[\r\n]*
  {
    const int64_t j0 = (cp[i] == ' ' && i + 1 < n) ? i + 1 : i;
    if (is_other(k[j0])) {
      int64_t j = j0;
      while (j < n && is_other(k[j])) ++j;
      while (j < n && is_nl(cp[j])) ++j;
      return j - i;
    }
  }
  // whitespace run [i, j)
  int64_t j = i;
  while (j < n && (k[j] & kSpace)) ++j;
  for (int64_t l = j - 1; l >= i; --l) {  // \s*[\r\n]+ : up to the last newline of the run
    if (is_nl(cp[l])) return l + 1 - i;
  }
  if (j == n || j - i == 1) return j - i;
  return j - 1 - i;
}

// tiktoken's byte-pair merge of one pre-token `piece`; appends ids to `out`.
void bpe_piece(const Encoder& enc, std::string_view piece, std::vector<int32_t>& out,
               std::vector<int64_t>& starts, std::vector<int32_t>& ranks) {
  if (auto it = enc.rank.find(piece); it != enc.rank.end()) {
    out.push_back(it->second);
    return;
  }
  const int64_t n = static_cast<int64_t>(piece.size());
  constexpr int32_t kNone = INT32_MAX;
  // parts are [starts[p], starts[p+1]); ranks[p] = rank of parts p and p+1 joined (kNone if not a token)
  starts.resize(n + 1);
  for (int64_t p = 0; p <= n; ++p) starts[p] = p;
  auto pair_rank = [&](int64_t p) -> int32_t {
    if (p + 2 >= static_cast<int64_t>(starts.size())) return kNone;
    auto it = enc.rank.find(piece.substr(starts[p], starts[p + 2] - starts[p]));
    return it == enc.rank.end() ? kNone : it->second;
  };
  ranks.resize(n);
  for (int64_t p = 0; p < n; ++p) ranks[p] = pair_rank(p);
  while (starts.size() > 2) {
    int32_t best = kNone;
    int64_t at = -1;
    const int64_t parts = static_cast<int64_t>(starts.size()) - 1;
    for (int64_t p = 0; p + 1 < parts; ++p) {
      if (ranks[p] < best) {
        best = ranks[p];
        at = p;
      }
    }
    if (at < 0) break;
    starts.erase(starts.begin() + at + 1);
    ranks.erase(ranks.begin() + at + 1);
    ranks[at] = pair_rank(at);
    if (at > 0) ranks[at - 1] = pair_rank(at - 1);
  }
  for (size_t p = 0; p + 1 < starts.size(); ++p) {
    auto it = enc.rank.find(piece.substr(starts[p], starts[p + 1] - starts[p]));
    TORCH_INTERNAL_ASSERT(it != enc.rank.end(), "bpe_encode: a byte is missing from the vocabulary");
    out.push_back(it->second);
  }
}

int64_t bpe_encoder_new(const at::Tensor& token_bytes, const at::Tensor& token_offsets, const at::Tensor& classes,
                        int64_t pattern) {
  TORCH_CHECK(token_bytes.dim() == 1 && token_bytes.scalar_type() == at::kByte,
              "bpe_encoder_new: token_bytes must be a 1-D uint8 tensor");
  TORCH_CHECK(token_offsets.dim() == 1 && token_offsets.scalar_type() == at::kLong && token_offsets.numel() >= 2,
              "bpe_encoder_new: token_offsets must be a 1-D int64 tensor with at least 2 entries");
  TORCH_CHECK(classes.dim() == 1 && classes.scalar_type() == at::kByte && classes.numel() == 0x110000,
              "bpe_encoder_new: classes must be a uint8 tensor of 0x110000 entries, got ", classes.sizes());
  TORCH_CHECK(pattern == kGpt2 || pattern == kCl100k, "bpe_encoder_new: pattern must be 0 (gpt2) or 1 (cl100k)");
  auto enc = std::make_shared<Encoder>();
  const at::Tensor b = token_bytes.contiguous(), o = token_offsets.contiguous(), c = classes.contiguous();
  enc->bytes.assign(reinterpret_cast<const char*>(b.data_ptr<uint8_t>()), b.numel());
  enc->cls.assign(c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
  enc->pattern = pattern;
  const int64_t* op = o.data_ptr<int64_t>();
  const int64_t n_tokens = o.numel() - 1;
  TORCH_CHECK(op[0] == 0 && op[n_tokens] == b.numel(), "bpe_encoder_new: offsets must span token_bytes");
  enc->rank.reserve(n_tokens * 2);
  const std::string_view all(enc->bytes);
  for (int64_t t = 0; t < n_tokens; ++t) {
    TORCH_CHECK(op[t] < op[t + 1], "bpe_encoder_new: token ", t, " is empty or offsets decrease");
    const bool fresh = enc->rank.emplace(all.substr(op[t], op[t + 1] - op[t]), static_cast<int32_t>(t)).second;
    TORCH_CHECK(fresh, "bpe_encoder_new: token ", t, " repeats the bytes of an earlier token (ranks must be unique)");
  }
  for (int v = 0; v < 256; ++v) {
    const char ch = static_cast<char>(v);
    TORCH_CHECK(enc->rank.find(std::string_view(&ch, 1)) != enc->rank.end(), "bpe_encoder_new: byte ", v,
                " has no token (a byte-level vocabulary holds all 256)");
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  const int64_t handle = next_handle++;
  registry.emplace(handle, std::move(enc));
  return handle;
}

void bpe_encoder_free(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(handle);
}

at::Tensor bpe_encode(int64_t handle, const at::Tensor& text) {
  TORCH_CHECK(text.dim() == 1 && text.scalar_type() == at::kByte, "bpe_encode: text must be 1-D uint8 (UTF-8 bytes)");
  std::shared_ptr<Encoder> enc;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry.find(handle);
    TORCH_CHECK(it != registry.end(), "bpe_encode: unknown encoder handle ", handle, " (freed?)");
    enc = it->second;
  }
  const at::Tensor t = text.contiguous();
  const uint8_t* s = t.data_ptr<uint8_t>();
  const int64_t n = t.numel();
  const Scan sc = scan_text(s, n, enc->cls);
  const int64_t m = static_cast<int64_t>(sc.cp.size());
  std::vector<int32_t> out;
  out.reserve(n / 3 + 16);
  std::vector<int64_t> starts;
  std::vector<int32_t> ranks;
  const std::string_view view(reinterpret_cast<const char*>(s), n);
  for (int64_t i = 0; i < m;) {
    const int64_t len = enc->pattern == kGpt2 ? next_gpt2(sc, i) : next_cl100k(sc, i);
    TORCH_INTERNAL_ASSERT(len >= 1, "bpe_encode: empty pre-token");
    bpe_piece(*enc, view.substr(sc.off[i], sc.off[i + len] - sc.off[i]), out, starts, ranks);
    i += len;
  }
  at::Tensor result = at::empty({static_cast<int64_t>(out.size())}, at::kInt);
  if (!out.empty()) std::memcpy(result.data_ptr<int32_t>(), out.data(), out.size() * sizeof(int32_t));
  return result;
}

}  // namespace

// The handle ops take no tensor (free) or only plain CPU data: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(intro2llm, CompositeImplicitAutograd, m) {
  m.impl("bpe_encoder_new", &bpe_encoder_new);
  m.impl("bpe_encoder_free", &bpe_encoder_free);
}

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { m.impl("bpe_encode", &bpe_encode); }

}  // namespace intro2llm
