// bf16_kernel.hpp compiled for AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later), in its own
// namespace: a CPU with AVX-512 VNNI but no BF16 (Ice Lake, Cascade Lake) runs the AVX2 build instead.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
#define QWENVL_ISA_NS qwenvl_avx512bf16
#define QWENVL_WITH_AVX512_BF16 1
#include "cpu_types_avx512.hpp"
#include "bf16_kernel.hpp"
