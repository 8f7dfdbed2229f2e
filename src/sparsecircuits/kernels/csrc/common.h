// Shared definitions of the sparsecircuits CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

#define SC_EXPORT extern "C" __attribute__((visibility("default")))

// Eight floats in one vector register where the target has one (AVX), two SSE/NEON registers
// otherwise: GCC/Clang vector extensions keep the kernels portable without intrinsics.
typedef float v8f __attribute__((vector_size(32)));

typedef uint32_t v8u __attribute__((vector_size(32)));

static inline bool any8(v8u m) {
  const v8u a = m | __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  return (a[0] | a[1] | a[2] | a[3]) != 0;
}

static inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

static inline float hsum8(v8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

#ifdef _OPENMP
#include <omp.h>
static inline int omp_get_num_threads_safe() { return omp_get_num_threads(); }
static inline int omp_get_thread_num_safe() { return omp_get_thread_num(); }
#else
static inline int omp_get_num_threads_safe() { return 1; }
static inline int omp_get_thread_num_safe() { return 0; }
#endif

// Which instruction set the library was compiled for; the loader refuses a library whose
// ISA the running CPU lacks (see kernels/_lib.py).
SC_EXPORT const char* sc_isa();
