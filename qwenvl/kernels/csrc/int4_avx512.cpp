// int4_kernel.hpp compiled for AVX-512 VNNI (Ice Lake / Sapphire Rapids / Zen 4 and later), with AMX for
// products of many rows where the compiler can emit it and the CPU and the OS allow it (int4_amx.hpp checks
// at run time, once).
// The standard headers come first, under the default target; everything after the pragma is AVX-512 code
// in its own namespace, called only after bindings.cpp has checked the CPU.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8")
#define QWENVL_WITH_AMX 1
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#endif
#define QWENVL_ISA_NS qwenvl_avx512
#include "cpu_types_avx512.hpp"
#include "int4_kernel.hpp"
