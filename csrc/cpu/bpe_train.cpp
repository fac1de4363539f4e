// BPE merge loop on CPU: the incremental trainer of intro2llm/tokenizer/_train.py (train_merges_incremental)
// in C++, giving the same merges as the Python reference (tests/test_tokenizer_train.py checks it).
//
// Input: deduplicated words as base-symbol ids (words[offsets[i]:offsets[i+1]], int32) and their counts
// (int64). Pair counts are exact at all times; `where` maps a pair to (a superset of) the words holding it, so
// a merge rescans only those words; a max-heap with lazy invalidation gives the next pair (an entry is valid
// only if its count equals the pair's current count; every count change pushes a fresh entry).
// Ties: highest count, then smallest (left id, right id). A merge whose expansion (its string of base
// symbols) already is a token reuses that token's id and does not count as a new token.
// Output: int32 (M, 3) rows (left id, right id, new id). Single-threaded: after word counting (done in Python,
// in parallel) the loop takes well under a second on 20 MB of source code (~70k distinct words).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

namespace intro2llm {
namespace {

inline uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct HashU64 {
  size_t operator()(uint64_t k) const noexcept {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<size_t>(k);
  }
};

struct Entry {
  int64_t count;
  int32_t a, b;
};

// std::priority_queue pops the "largest": highest count first, then the smallest (a, b).
struct EntryLess {
  bool operator()(const Entry& x, const Entry& y) const {
    if (x.count != y.count) return x.count < y.count;
    if (x.a != y.a) return x.a > y.a;
    return x.b > y.b;
  }
};

// Replace every (a, b) in `word` (left to right, no overlap) by `id`; returns false when the pair is absent.
bool merge_word(std::vector<int32_t>& word, int32_t a, int32_t b, int32_t id) {
  size_t out = 0;
  bool changed = false;
  for (size_t i = 0; i < word.size();) {
    if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) {
      word[out++] = id;
      i += 2;
      changed = true;
    } else {
      word[out++] = word[i++];
    }
  }
  word.resize(out);
  return changed;
}

std::string expansion_key(const std::vector<int32_t>& e) {
  return std::string(reinterpret_cast<const char*>(e.data()), e.size() * sizeof(int32_t));
}

at::Tensor bpe_train_cpu(const at::Tensor& words, const at::Tensor& offsets, const at::Tensor& counts,
                         int64_t num_base, int64_t num_new_tokens, int64_t min_frequency) {
  TORCH_CHECK(words.dim() == 1 && words.scalar_type() == at::kInt,
              "bpe_train: words must be a 1-D int32 tensor, got ", words.scalar_type(), " of shape ", words.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 1,
              "bpe_train: offsets must be a non-empty 1-D int64 tensor, got shape ", offsets.sizes());
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong && counts.numel() == offsets.numel() - 1,
              "bpe_train: counts must be int64 with one entry per word (", offsets.numel() - 1, "), got shape ",
              counts.sizes());
  TORCH_CHECK(num_base > 0 && num_base < (int64_t(1) << 30), "bpe_train: num_base must be in [1, 2^30), got ", num_base);
  TORCH_CHECK(num_new_tokens >= 0, "bpe_train: num_new_tokens must be >= 0, got ", num_new_tokens);
  const at::Tensor w_c = words.contiguous(), o_c = offsets.contiguous(), c_c = counts.contiguous();
  const int32_t* wp = w_c.data_ptr<int32_t>();
  const int64_t* op = o_c.data_ptr<int64_t>();
  const int64_t* cp = c_c.data_ptr<int64_t>();
  const int64_t n_words = counts.numel();
  TORCH_CHECK(op[0] == 0 && op[n_words] == words.numel(), "bpe_train: offsets must start at 0 and end at words.numel()");

  std::vector<std::vector<int32_t>> ws(n_words);
  std::vector<int64_t> wc(cp, cp + n_words);
  for (int64_t i = 0; i < n_words; ++i) {
    TORCH_CHECK(op[i] <= op[i + 1], "bpe_train: offsets must be non-decreasing (at word ", i, ")");
    ws[i].assign(wp + op[i], wp + op[i + 1]);
    for (int32_t s : ws[i]) {
      TORCH_CHECK(s >= 0 && s < num_base, "bpe_train: symbol ", s, " in word ", i, " is outside [0, ", num_base, ")");
    }
  }

  // Token expansions (strings of base symbols): recognise a merge that recreates an existing token.
  std::vector<std::vector<int32_t>> expansion(num_base);
  std::unordered_map<std::string, int32_t> token_of;
  for (int32_t i = 0; i < num_base; ++i) {
    expansion[i] = {i};
    token_of.emplace(expansion_key(expansion[i]), i);
  }

  std::unordered_map<uint64_t, int64_t, HashU64> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>, HashU64> where;
  pair_count.reserve(1 << 20);
  where.reserve(1 << 20);
  for (int64_t w = 0; w < n_words; ++w) {
    const auto& s = ws[w];
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t k = pair_key(s[i], s[i + 1]);
      pair_count[k] += wc[w];
      auto& holders = where[k];
      if (holders.empty() || holders.back() != w) holders.push_back(static_cast<int32_t>(w));
    }
  }
  std::vector<Entry> init;
  init.reserve(pair_count.size());
  for (const auto& [k, c] : pair_count) init.push_back({c, static_cast<int32_t>(k >> 32), static_cast<int32_t>(k & 0xffffffffu)});
  std::priority_queue<Entry, std::vector<Entry>, EntryLess> heap(EntryLess{}, std::move(init));

  std::vector<int32_t> merges;  // flat (a, b, id) triples
  std::unordered_map<uint64_t, int64_t, HashU64> delta;
  std::vector<int32_t> old_word;
  int64_t added = 0;
  while (added < num_new_tokens && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    const uint64_t key = pair_key(top.a, top.b);
    auto it = pair_count.find(key);
    if (it == pair_count.end() || it->second != top.count) continue;  // stale entry
    if (top.count < min_frequency) break;

    std::vector<int32_t> merged_exp = expansion[top.a];
    merged_exp.insert(merged_exp.end(), expansion[top.b].begin(), expansion[top.b].end());
    std::string ek = expansion_key(merged_exp);
    int32_t id;
    auto found = token_of.find(ek);
    if (found != token_of.end()) {
      id = found->second;
    } else {
      id = static_cast<int32_t>(expansion.size());
      token_of.emplace(std::move(ek), id);
      expansion.push_back(std::move(merged_exp));
      ++added;
    }
    merges.insert(merges.end(), {top.a, top.b, id});

    std::vector<int32_t> holders;
    if (auto h = where.find(key); h != where.end()) {
      holders = std::move(h->second);
      where.erase(h);
    }
    std::sort(holders.begin(), holders.end());
    holders.erase(std::unique(holders.begin(), holders.end()), holders.end());
    delta.clear();
    for (int32_t w : holders) {
      auto& word = ws[w];
      old_word = word;
      if (!merge_word(word, top.a, top.b, id)) continue;  // stale: the pair left this word earlier
      const int64_t c = wc[w];
      for (size_t i = 0; i + 1 < old_word.size(); ++i) delta[pair_key(old_word[i], old_word[i + 1])] -= c;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const uint64_t k = pair_key(word[i], word[i + 1]);
        delta[k] += c;
        if (word[i] == id || word[i + 1] == id) {
          auto& hs = where[k];
          if (hs.empty() || hs.back() != w) hs.push_back(w);
        }
      }
    }
    // Apply the changes in a fixed order (sorted keys) so that heap contents never depend on hash order.
    std::vector<std::pair<uint64_t, int64_t>> changes(delta.begin(), delta.end());
    std::sort(changes.begin(), changes.end());
    for (const auto& [k, d] : changes) {
      if (d == 0) continue;
      auto pc = pair_count.find(k);
      const int64_t c = (pc == pair_count.end() ? 0 : pc->second) + d;
      TORCH_INTERNAL_ASSERT(c >= 0, "bpe_train: negative pair count");
      if (c > 0) {
        pair_count[k] = c;
        heap.push({c, static_cast<int32_t>(k >> 32), static_cast<int32_t>(k & 0xffffffffu)});
      } else if (pc != pair_count.end()) {
        pair_count.erase(pc);
      }
    }
  }

  const int64_t m = static_cast<int64_t>(merges.size() / 3);
  at::Tensor out = at::empty({m, 3}, at::kInt);
  if (m > 0) std::memcpy(out.data_ptr<int32_t>(), merges.data(), merges.size() * sizeof(int32_t));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { m.impl("bpe_train", &bpe_train_cpu); }

}  // namespace intro2llm
