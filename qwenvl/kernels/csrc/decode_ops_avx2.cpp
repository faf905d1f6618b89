// decode_ops_kernel.hpp compiled for AVX2 + FMA: see int4_avx2.cpp.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx2
#include "cpu_types_avx2.hpp"
#include "cpu_math_avx2.hpp"
#include "decode_ops_kernel.hpp"
