// src/common/mask.h — the attention masks as block-range policies, shared by the CPU reference,
// the CUDA kernels (forward, backward, decode) and the tests (numerics section 3).
//
// A mask is a policy type that answers one question: which keys does query row `row` of one
// sequence see? Its answer is a half-open range [begin, end) of key indices (`keys`), and, for the
// backward, the inverse: the first and last rows that see key `key` (`first_row`, `last_row`).
// Everything else — which key blocks a query block visits, which of them need element masking,
// which query blocks a key block meets — is derived here once, from those three functions, for
// any tile sizes. A policy's ranges must be monotone: begin, end, first_row and last_row never
// decrease as the row (or key) grows. That holds for no mask, causal and sliding windows, and is
// what makes "first row of a block, last row of a block" enough to bound the whole block.
//
// Per-sequence information is a SeqInfo: the query and key lengths of the sequence (one batch
// entry today; packed sequences add fields here, not new code paths) and the sliding window.
//
// Causal is bottom-right aligned: row i sees keys j <= i + len_k - len_q, so rows
// i < len_q - len_k see no key (an empty row: O = 0, LSE = -inf). A sliding window (LocalMask)
// is aligned the same way: with d = i + len_k - len_q (row i's "diagonal" key) it sees
// d - window_left <= j <= d + window_right, a side of -1 being unbounded, so (-1, 0) is causal
// and (-1, -1) no mask. Every policy also hides keys < 0 and >= len_k: the kernels read whole
// tiles, and keys past the end must never count.
//
// Adding a policy: a struct with kKind, kName, keys(), first_row(), last_row(); a MaskKind value;
// one case in with_mask() of the CUDA dispatch; its kernel instantiations (docs/design.md).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ATTNQAT_HD __host__ __device__ __forceinline__
#else
#define ATTNQAT_HD inline
#endif

namespace attnqat {

enum class MaskKind : uint8_t { kNone, kCausal, kLocal };

inline const char* mask_kind_name(MaskKind kind) {
  switch (kind) {
    case MaskKind::kCausal:
      return "causal";
    case MaskKind::kLocal:
      return "local";
    default:
      return "none";
  }
}

// One sequence's lengths and its sliding window (LocalMask only; -1: unbounded on that side).
// SeqInfo{len_q, len_k} has no window.
struct SeqInfo {
  int len_q;
  int len_k;
  int window_left = -1;
  int window_right = -1;
};

// A half-open range of indices [begin, end); empty when end <= begin.
struct IndexRange {
  int begin;
  int end;
  ATTNQAT_HD bool empty() const { return end <= begin; }
};

namespace mask_detail {
ATTNQAT_HD int clamp64(int64_t x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : static_cast<int>(x));
}
ATTNQAT_HD int min_int(int a, int b) { return a < b ? a : b; }
}  // namespace mask_detail

struct NoMask {
  static constexpr MaskKind kKind = MaskKind::kNone;
  static constexpr const char* kName = "none";
  ATTNQAT_HD static IndexRange keys(int /*row*/, SeqInfo s) { return IndexRange{0, s.len_k}; }
  ATTNQAT_HD static int first_row(int /*key*/, SeqInfo /*s*/) { return 0; }
  ATTNQAT_HD static int last_row(int /*key*/, SeqInfo s) { return s.len_q - 1; }
};

struct CausalMask {
  static constexpr MaskKind kKind = MaskKind::kCausal;
  static constexpr const char* kName = "causal";
  ATTNQAT_HD static IndexRange keys(int row, SeqInfo s) {
    const int64_t end = static_cast<int64_t>(row) + s.len_k - s.len_q + 1;
    return IndexRange{0, mask_detail::clamp64(end, 0, s.len_k)};
  }
  // Row i sees key j iff j <= i + len_k - len_q, i.e. i >= j - (len_k - len_q).
  ATTNQAT_HD static int first_row(int key, SeqInfo s) {
    const int64_t row = static_cast<int64_t>(key) - (static_cast<int64_t>(s.len_k) - s.len_q);
    return row <= 0 ? 0 : static_cast<int>(row);
  }
  ATTNQAT_HD static int last_row(int /*key*/, SeqInfo s) { return s.len_q - 1; }
};

// Sliding window, bottom-right aligned: with d = row + len_k - len_q, row `row` sees keys
// [d - window_left, d + window_right] ∩ [0, len_k); a side of -1 is unbounded.
struct LocalMask {
  static constexpr MaskKind kKind = MaskKind::kLocal;
  static constexpr const char* kName = "local";
  ATTNQAT_HD static IndexRange keys(int row, SeqInfo s) {
    const int64_t diag = static_cast<int64_t>(row) + s.len_k - s.len_q;
    const int begin = s.window_left < 0 ? 0 : mask_detail::clamp64(diag - s.window_left, 0, s.len_k);
    const int end = s.window_right < 0 ? s.len_k : mask_detail::clamp64(diag + s.window_right + 1, 0, s.len_k);
    return IndexRange{begin, end};
  }
  // Row i sees key j iff j - window_right <= d_i <= j + window_left, i.e.
  // j - window_right - (len_k - len_q) <= i <= j + window_left - (len_k - len_q).
  ATTNQAT_HD static int first_row(int key, SeqInfo s) {
    if (s.window_right < 0) return 0;
    const int64_t row = static_cast<int64_t>(key) - s.window_right - (static_cast<int64_t>(s.len_k) - s.len_q);
    return mask_detail::clamp64(row, 0, s.len_q);
  }
  ATTNQAT_HD static int last_row(int key, SeqInfo s) {
    if (s.window_left < 0) return s.len_q - 1;
    const int64_t row = static_cast<int64_t>(key) + s.window_left - (static_cast<int64_t>(s.len_k) - s.len_q);
    return mask_detail::clamp64(row, -1, s.len_q - 1);
  }
};

// The policy of a MaskKind, as a value: with_mask_policy(kind, [&](auto mask) { ... decltype(mask) ... }).
template <class F>
decltype(auto) with_mask_policy(MaskKind kind, F&& f) {
  if (kind == MaskKind::kCausal) return f(CausalMask{});
  if (kind == MaskKind::kLocal) return f(LocalMask{});
  return f(NoMask{});
}

// The keys row `row` sees under a mask chosen at run time (the reference and the tests).
ATTNQAT_HD IndexRange visible_keys(MaskKind kind, int row, SeqInfo s) {
  if (kind == MaskKind::kCausal) return CausalMask::keys(row, s);
  if (kind == MaskKind::kLocal) return LocalMask::keys(row, s);
  return NoMask::keys(row, s);
}

// ---- Block ranges, derived from a policy ---------------------------------------------------------
// Query blocks hold block_m rows (block m: rows [m * block_m, (m + 1) * block_m) ∩ [0, len_q)),
// key blocks block_n keys.

// The key blocks query block m_block must visit: those holding a key some row of the block sees.
// Empty when no row of the block sees a key.
template <class Mask>
ATTNQAT_HD IndexRange key_blocks(int m_block, int block_m, int block_n, SeqInfo s) {
  const int first = m_block * block_m;
  const int last = mask_detail::min_int(first + block_m, s.len_q) - 1;
  const IndexRange lo = Mask::keys(first, s), hi = Mask::keys(last, s);
  if (hi.end <= lo.begin) return IndexRange{0, 0};
  return IndexRange{lo.begin / block_n, (hi.end + block_n - 1) / block_n};
}

// The key range [begin, end) that every row of [first, last] sees (the intersection of the
// rows' ranges): keys inside it need no element masking for these rows; any other visited key does.
template <class Mask>
ATTNQAT_HD IndexRange keys_seen_by_rows(int first, int last, SeqInfo s) {
  return IndexRange{Mask::keys(last, s).begin, Mask::keys(first, s).end};
}

// The same for query block m_block.
template <class Mask>
ATTNQAT_HD IndexRange keys_seen_by_all(int m_block, int block_m, SeqInfo s) {
  const int first = m_block * block_m;
  return keys_seen_by_rows<Mask>(first, mask_detail::min_int(first + block_m, s.len_q) - 1, s);
}

// True when keys [key0, key0 + n) need element masking for rows whose common range is `all`.
ATTNQAT_HD bool keys_need_mask(int key0, int n, IndexRange all) {
  return key0 < all.begin || static_cast<int64_t>(key0) + n > all.end;
}

// The query blocks that meet key block n_block (some row of them sees one of its keys): the
// backward's loop over query blocks for one key block. Empty when no row sees any of its keys.
template <class Mask>
ATTNQAT_HD IndexRange query_blocks(int n_block, int block_n, int block_m, SeqInfo s) {
  const int key0 = n_block * block_n;
  const int key1 = mask_detail::min_int(key0 + block_n, s.len_k) - 1;
  if (key1 < key0 || s.len_q <= 0) return IndexRange{0, 0};
  const int first = Mask::first_row(key0, s);
  const int last = mask_detail::min_int(Mask::last_row(key1, s), s.len_q - 1);
  if (last < first) return IndexRange{0, 0};
  return IndexRange{first / block_m, last / block_m + 1};
}

}  // namespace attnqat
