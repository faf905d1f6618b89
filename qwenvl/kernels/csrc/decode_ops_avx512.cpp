// decode_ops_kernel.hpp compiled for AVX-512 (the same target as int4_avx512.cpp; see there).
#include <cstdint>
#include <cstring>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx512
#include "cpu_types_avx512.hpp"
#include "cpu_math_avx512.hpp"
#include "decode_ops_kernel.hpp"
