// Row-wise AbsTopK as a reusable piece (csrc/select.cpp): sc_abstopk runs it over a tensor's
// rows, and the product kernels run it on each tile's output rows while they are in cache.
#pragma once
#include <cstdint>

class AbsTopKRows {
 public:
  explicit AbsTopKRows(int64_t n);  // rows of n entries
  ~AbsTopKRows();
  AbsTopKRows(const AbsTopKRows&) = delete;
  AbsTopKRows& operator=(const AbsTopKRows&) = delete;

  // y[i] = x[i] where |x[i]| is among the k largest of the row (0 < k < n; ties to the
  // lowest index), else 0; mask[i] = 1 there (mask may be null; y may be x). The previous
  // row's threshold guides this one (see select.cpp): exact whatever the row order.
  void row(const float* x, int64_t k, float* y, uint8_t* mask);

 private:
  struct Impl;
  Impl* impl_;
};
