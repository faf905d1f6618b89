// int4_kernel.hpp compiled for AVX2 + FMA (Haswell and later, Zen 1-3): see int4_avx512.cpp.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx2
#include "cpu_types_avx2.hpp"
#include "int4_kernel.hpp"
