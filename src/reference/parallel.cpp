// parallel_for of the reference: a fixed number of std::threads pulling work items from an
// atomic counter. Items are independent, so the results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "reference/reference.h"

namespace attnqat::reference {
namespace {

int thread_count() {
  static const int n = [] {
    if (const char* env = std::getenv("ATTNQAT_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t)>& f) {
  const int64_t workers = std::min<int64_t>(thread_count(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

}  // namespace attnqat::reference
