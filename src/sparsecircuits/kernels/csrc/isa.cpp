#include "common.h"

SC_EXPORT const char* sc_isa() {
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}
