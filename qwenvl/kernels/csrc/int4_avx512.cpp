// int4_kernel.hpp compiled for AVX-512 VNNI (Ice Lake / Sapphire Rapids / Zen 4 and later).
// The standard headers come first, under the default target; everything after the pragma is AVX-512 code
// in its own namespace, called only after bindings.cpp has checked the CPU.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx512
#include "cpu_types_avx512.hpp"
#include "int4_kernel.hpp"
