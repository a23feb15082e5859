// The mask policies of src/common/mask.h against their definitions, by brute force: a policy's
// row ranges against the mask's rule written out here (numerics section 3), and every derived
// block range against the blocks the row ranges imply. The kernels, the reference and the
// other tests take their masks from this header, so its answers are checked on their own here.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "common/mask.h"

namespace attnqat {
namespace {

// The rule of numerics section 3: row i sees key j (0 <= j < Nk) always (no mask), iff
// j <= i + Nk - Nq (causal, bottom-right aligned), or, with d = i + Nk - Nq, iff
// d - left <= j (left >= 0) and j <= d + right (right >= 0) (sliding window (left, right)).
bool sees(MaskKind kind, int i, int j, SeqInfo s) {
  if (j < 0 || j >= s.len_k) return false;
  const int d = i + s.len_k - s.len_q;
  if (kind == MaskKind::kLocal)
    return (s.window_left < 0 || d - s.window_left <= j) && (s.window_right < 0 || j <= d + s.window_right);
  return kind == MaskKind::kNone || j <= d;
}

const SeqInfo kSeqs[] = {{1, 1},   {1, 300}, {300, 1},  {127, 129}, {128, 128}, {129, 127},
                         {200, 65}, {65, 200}, {0, 10},  {10, 0},    {257, 1000}};

template <class Mask>
void check_policy(MaskKind kind, int window_left = -1, int window_right = -1) {
  for (SeqInfo s : kSeqs) {
    s.window_left = window_left;
    s.window_right = window_right;
    SCOPED_TRACE(testing::Message() << Mask::kName << " Nq " << s.len_q << " Nk " << s.len_k << " window ("
                                    << window_left << ", " << window_right << ")");
    // Row ranges: exactly the visible keys, contiguous.
    for (int i = 0; i < s.len_q; ++i) {
      const IndexRange r = Mask::keys(i, s);
      for (int j = -2; j < s.len_k + 2; ++j)
        ASSERT_EQ(sees(kind, i, j, s), j >= r.begin && j < r.end) << "row " << i << " key " << j;
      const IndexRange rt = visible_keys(kind, i, s);
      ASSERT_EQ(rt.begin, r.begin);
      ASSERT_EQ(rt.end, r.end);
    }
    // first_row / last_row: the rows that see a key.
    for (int j = 0; j < s.len_k; ++j) {
      int first = -1, last = -1;
      for (int i = 0; i < s.len_q; ++i)
        if (sees(kind, i, j, s)) {
          if (first < 0) first = i;
          last = i;
        }
      if (first < 0) continue;
      ASSERT_EQ(Mask::first_row(j, s), first) << "key " << j;
      ASSERT_EQ(std::min(Mask::last_row(j, s), s.len_q - 1), last) << "key " << j;
    }
    for (const int bm : {1, 16, 64, 128}) {
      for (const int bn : {16, 64, 128}) {
        const int m_blocks = (s.len_q + bm - 1) / bm, n_blocks = (s.len_k + bn - 1) / bn;
        // key_blocks: from the first to the last block holding a key some row of the block sees;
        // keys_seen_by_all: the keys every row of the block sees.
        for (int m = 0; m < m_blocks; ++m) {
          int lo = -1, hi = -1;
          std::vector<bool> all(s.len_k, true);
          for (int i = m * bm; i < std::min((m + 1) * bm, s.len_q); ++i)
            for (int j = 0; j < s.len_k; ++j) {
              if (sees(kind, i, j, s)) {
                if (lo < 0 || j / bn < lo) lo = j / bn;
                hi = std::max(hi, j / bn + 1);
              } else {
                all[j] = false;
              }
            }
          const IndexRange kb = key_blocks<Mask>(m, bm, bn, s);
          if (lo < 0) {
            ASSERT_TRUE(kb.empty()) << "m " << m << " bm " << bm << " bn " << bn;
          } else {
            ASSERT_EQ(kb.begin, lo) << "m " << m << " bm " << bm << " bn " << bn;
            ASSERT_EQ(kb.end, hi) << "m " << m << " bm " << bm << " bn " << bn;
          }
          const IndexRange every = keys_seen_by_all<Mask>(m, bm, s);
          for (int j = 0; j < s.len_k; ++j)
            ASSERT_EQ(all[j], j >= every.begin && j < every.end) << "m " << m << " key " << j;
          // keys_need_mask: false exactly when every key of the block is seen by every row.
          for (int n = 0; n < n_blocks; ++n) {
            bool full = true;
            for (int j = n * bn; j < (n + 1) * bn; ++j) full = full && j < s.len_k && all[j];
            ASSERT_EQ(keys_need_mask(n * bn, bn, every), !full) << "m " << m << " n " << n;
          }
        }
        // query_blocks: the blocks of rows that see some key of key block n.
        for (int n = 0; n < n_blocks; ++n) {
          int lo = -1, hi = -1;
          for (int i = 0; i < s.len_q; ++i)
            for (int j = n * bn; j < std::min((n + 1) * bn, s.len_k); ++j)
              if (sees(kind, i, j, s)) {
                if (lo < 0) lo = i / bm;
                hi = i / bm + 1;
              }
          const IndexRange qb = query_blocks<Mask>(n, bn, bm, s);
          if (lo < 0) {
            ASSERT_TRUE(qb.empty()) << "n " << n;
          } else {
            ASSERT_EQ(qb.begin, lo) << "n " << n << " bm " << bm << " bn " << bn;
            ASSERT_EQ(qb.end, hi) << "n " << n << " bm " << bm << " bn " << bn;
          }
        }
      }
    }
  }
}

TEST(MaskPolicy, NoMaskMatchesItsDefinition) { check_policy<NoMask>(MaskKind::kNone); }
TEST(MaskPolicy, CausalMatchesItsDefinition) { check_policy<CausalMask>(MaskKind::kCausal); }

TEST(MaskPolicy, LocalMatchesItsDefinition) {
  const int windows[][2] = {{0, 0},  {1, 0},   {0, 1},   {3, 5},   {127, 0},
                            {128, 0}, {-1, 0}, {0, -1}, {16, 16}, {4096, 4096}};
  for (const auto& w : windows) check_policy<LocalMask>(MaskKind::kLocal, w[0], w[1]);
}

// (-1, 0) is causal and (-1, -1) no mask, answer for answer.
TEST(MaskPolicy, LocalWithUnboundedSidesIsCausalOrNoMask) {
  for (SeqInfo s : kSeqs) {
    SCOPED_TRACE(testing::Message() << "Nq " << s.len_q << " Nk " << s.len_k);
    SeqInfo causal = s, none = s;
    causal.window_left = -1, causal.window_right = 0;
    none.window_left = -1, none.window_right = -1;
    for (int i = 0; i < s.len_q; ++i) {
      const IndexRange c = LocalMask::keys(i, causal), rc = CausalMask::keys(i, s);
      const IndexRange n = LocalMask::keys(i, none), rn = NoMask::keys(i, s);
      ASSERT_EQ(c.begin, rc.begin);
      ASSERT_EQ(c.end, rc.end);
      ASSERT_EQ(n.begin, rn.begin);
      ASSERT_EQ(n.end, rn.end);
    }
    for (int j = 0; j < s.len_k; ++j) {
      ASSERT_EQ(LocalMask::first_row(j, causal), CausalMask::first_row(j, s));
      ASSERT_EQ(LocalMask::last_row(j, causal), CausalMask::last_row(j, s));
      ASSERT_EQ(LocalMask::first_row(j, none), NoMask::first_row(j, s));
      ASSERT_EQ(LocalMask::last_row(j, none), NoMask::last_row(j, s));
    }
    for (const int bm : {16, 64, 128})
      for (const int bn : {16, 128}) {
        for (int m = 0; m * bm < s.len_q; ++m) {
          const IndexRange a = key_blocks<LocalMask>(m, bm, bn, causal), b = key_blocks<CausalMask>(m, bm, bn, s);
          ASSERT_EQ(a.begin, b.begin);
          ASSERT_EQ(a.end, b.end);
        }
        for (int n = 0; n * bn < s.len_k; ++n) {
          const IndexRange a = query_blocks<LocalMask>(n, bn, bm, causal), b = query_blocks<CausalMask>(n, bn, bm, s);
          ASSERT_EQ(a.begin, b.begin);
          ASSERT_EQ(a.end, b.end);
        }
      }
  }
}

TEST(MaskPolicy, DispatchPicksThePolicyOfTheKind) {
  EXPECT_EQ(with_mask_policy(MaskKind::kNone, [](auto m) { return decltype(m)::kKind; }),
            MaskKind::kNone);
  EXPECT_EQ(with_mask_policy(MaskKind::kCausal, [](auto m) { return decltype(m)::kKind; }),
            MaskKind::kCausal);
  EXPECT_EQ(with_mask_policy(MaskKind::kLocal, [](auto m) { return decltype(m)::kKind; }),
            MaskKind::kLocal);
  EXPECT_STREQ(mask_kind_name(MaskKind::kCausal), "causal");
  EXPECT_STREQ(mask_kind_name(MaskKind::kLocal), "local");
}

}  // namespace
}  // namespace attnqat
