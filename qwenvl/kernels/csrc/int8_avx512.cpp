// int8_kernel.hpp compiled for AVX-512 VNNI: see int4_avx512.cpp for the pattern.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx512
#include "cpu_types_avx512.hpp"
#include "int8_kernel.hpp"
