// The thin device layer under the CUDA kernels: element conversion, vector
// loads, block reductions, and the few hardware features the kernels use
// (warp shuffles, cp.async, thread-block clusters, grid sync), each behind a
// small ck_* wrapper.
//
// The wrappers exist for one reason besides readability: with CK_EMULATE
// defined, the same kernel bodies compile as plain C++ against a software
// emulation of these primitives (threads, barriers, cluster shared memory),
// so their index math can be checked against the CPU kernels on a machine
// without a GPU. The emulation header is not part of the package.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(CK_EMULATE)
#include "ck_emu.h"
#else
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "../common.h"
#include "../kernels.h"

namespace cream {
namespace cuda {

constexpr int kWarp = 32;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ----------------------------------------------------------------- primitives
#if !defined(CK_EMULATE)
__device__ __forceinline__ int ck_tid() { return static_cast<int>(threadIdx.x); }
__device__ __forceinline__ int ck_nthreads() { return static_cast<int>(blockDim.x); }
__device__ __forceinline__ int64_t ck_bid() { return static_cast<int64_t>(blockIdx.x); }
__device__ __forceinline__ int64_t ck_nblocks() { return static_cast<int64_t>(gridDim.x); }
__device__ __forceinline__ void ck_sync() { __syncthreads(); }
__device__ __forceinline__ int ck_sync_or(int pred) { return __syncthreads_or(pred); }
__device__ __forceinline__ float ck_shfl_xor(float v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }

// Dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ unsigned char* ck_dyn_smem() {
  extern __shared__ __align__(16) unsigned char ck_smem_raw[];
  return ck_smem_raw;
}

// IEEE half bits -> float: the hardware conversion, which is exact and therefore
// bit-identical to common.h's half_to_float (used by the CPU kernels).
__device__ __forceinline__ float ck_half_bits(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

// ---- cp.async (sm_80+): global -> shared copies that need no registers, so a
// CTA can have its whole slice of the feature map in flight at once.
// `bytes` <= VB valid source bytes; the rest of the VB destination bytes is zero-filled.
template <int VB>
__device__ __forceinline__ void ck_cp_async(void* smem_dst, const void* gsrc, int bytes) {
  static_assert(VB == 4 || VB == 8 || VB == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  if constexpr (VB == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gsrc), "r"(bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gsrc), "n"(VB), "r"(bytes)
                 : "memory");
  }
}
__device__ __forceinline__ void ck_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most n of this thread's committed groups are pending (n in 0..7).
__device__ __forceinline__ void ck_cp_wait(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
  }
}

// ---- grid-wide barrier of a cooperative launch (cooperative_groups; the driver
// provides its barrier state, so nothing has to be zeroed by us).
__device__ __forceinline__ void ck_grid_sync() { cooperative_groups::this_grid().sync(); }

// ---- thread-block clusters (sm_90). Only the cluster kernel calls these, and
// its body is compiled for sm_90 only.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CK_HAS_CLUSTERS 1
__device__ __forceinline__ int ck_cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
}
// Split cluster barrier, used twice per kernel: the relaxed arrive at kernel
// start announces that this CTA runs and its mbarriers are initialised (so
// peers may write its shared memory after their wait); the one at the end keeps
// every CTA alive until its peers' stores into it have landed. No data is
// ordered by them (barrier.cluster.arrive.release would compile to
// MEMBAR.ALL.GPU); barrier.cluster.wait carries an L1 invalidate (CCTL.IVALL).
__device__ __forceinline__ void ck_cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void ck_cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

// ---- mbarrier-based exchange within a cluster (sm_90). A CTA pushes values
// into a peer's shared memory with st.async, each completing its bytes on the
// peer's mbarrier; the peer waits for the phase. Nothing here is a GPU-wide
// fence: barrier.cluster.arrive.release compiles to MEMBAR.ALL.GPU and
// barrier.cluster.wait to CCTL.IVALL (an L1 invalidate), while this path
// compiles to SYNCS instructions only (see em_kernels.cuh for the counts).
__device__ __forceinline__ unsigned ck_smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ unsigned ck_mapa(unsigned addr, int rank) {
  unsigned out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
// One thread: an mbarrier expecting one arrival per phase.
__device__ __forceinline__ void ck_mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(ck_smem_u32(bar)) : "memory");
}
// After the inits, before the cluster barrier that publishes them to the peers.
__device__ __forceinline__ void ck_fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One thread per phase: this CTA's arrival, announcing `bytes` from the peers.
// (Peers' bytes may land before it: the transaction count may go negative
// within a phase, which cannot complete before this arrival.)
__device__ __forceinline__ void ck_mbar_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(ck_smem_u32(bar)), "r"(bytes)
               : "memory");
}
// Every thread: wait until the phase of parity `parity` completed. The wait is
// relaxed at cluster scope, followed by an acquire fence restricted to shared
// memory (the st.async data), so no L1 invalidate is needed.
__device__ __forceinline__ void ck_mbar_wait(uint64_t* bar, int parity) {
  const unsigned a = ck_smem_u32(bar);
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.relaxed.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
  } while (!done);
  asm volatile("fence.acquire.sync_restrict::shared::cluster.cluster;\n" ::: "memory");
}
// dst (an address in this CTA's shared memory) in CTA `rank` <- v, completing
// 4 bytes on `bar` (likewise mapped) of that CTA. `phase` is for the emulation.
__device__ __forceinline__ void ck_st_async(float* dst, int rank, float v, uint64_t* bar, int phase) {
  (void)phase;
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(
                   ck_mapa(ck_smem_u32(dst), rank)),
               "r"(__float_as_uint(v)), "r"(ck_mapa(ck_smem_u32(bar), rank))
               : "memory");
}
// Two consecutive floats (dst 8-byte aligned), 8 bytes on `bar`.
__device__ __forceinline__ void ck_st_async2(float* dst, int rank, float a, float b, uint64_t* bar, int phase) {
  (void)phase;
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];\n" ::"r"(
                   ck_mapa(ck_smem_u32(dst), rank)),
               "r"(__float_as_uint(a)), "r"(__float_as_uint(b)), "r"(ck_mapa(ck_smem_u32(bar), rank))
               : "memory");
}
#endif
#endif  // !CK_EMULATE

// ----------------------------------------------------------------- conversion
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static __forceinline__ float from_bits(uint32_t b) { return bits_to_float(b); }
};
template <>
struct Elem<bf16_t> {
  __device__ static __forceinline__ float from_bits(uint32_t b) { return bf16_to_float(static_cast<uint16_t>(b)); }
};
template <>
struct Elem<half_t> {
  __device__ static __forceinline__ float from_bits(uint32_t b) { return ck_half_bits(b & 0xffffu); }
};

// One element, through common.h's Load (the same conversion the CPU kernels use).
template <typename T>
__device__ __forceinline__ float load_one(const T* p) {
  return load<float>(p);
}

// Raw storage of a VB-byte access.
template <int VB>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};

// The raw bits of a full VB-byte vector at p (VB-aligned).
template <typename T, int VB>
__device__ __forceinline__ typename RawVec<VB>::type load_raw(const T* p) {
  return *reinterpret_cast<const typename RawVec<VB>::type*>(p);
}

// Raw bits of V = VB / sizeof(T) elements -> V floats.
template <typename T, int VB>
__device__ __forceinline__ void unpack(const typename RawVec<VB>::type& raw, float (&x)[VB / sizeof(T)]) {
  constexpr int V = VB / static_cast<int>(sizeof(T));
  if constexpr (VB == 2) {
    x[0] = Elem<T>::from_bits(static_cast<uint32_t>(raw));
  } else {
    uint32_t w[VB / 4];
    memcpy(w, &raw, VB);
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int j = 0; j < V; ++j) x[j] = Elem<T>::from_bits(w[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V / 2; ++j) {
        x[2 * j] = Elem<T>::from_bits(w[j] & 0xffffu);
        x[2 * j + 1] = Elem<T>::from_bits(w[j] >> 16);
      }
    }
  }
}

// A full VB-byte vector at p (VB-aligned) -> V floats.
template <typename T, int VB>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[VB / sizeof(T)]) {
  unpack<T, VB>(load_raw<T, VB>(p), x);
}

// The first n (< V) elements at p, zeros after: the ragged end of a row.
template <typename T, int V>
__device__ __forceinline__ void load_part(const T* p, int n, float (&x)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = j < n ? load_one(p + j) : 0.f;
}

// V consecutive floats (16/8/4-byte aligned as V allows).
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&c)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 v = reinterpret_cast<const float4*>(p)[q];
      c[4 * q] = v.x;
      c[4 * q + 1] = v.y;
      c[4 * q + 2] = v.z;
      c[4 * q + 3] = v.w;
    }
  } else if constexpr (V == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    c[0] = v.x;
    c[1] = v.y;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) c[j] = p[j];
  }
}

// ----------------------------------------------------------------- block reductions
// All deterministic: a fixed xor-butterfly inside each warp (every lane ends
// with the same bits, since each step adds the same two values in either
// order), then warp 0 combines the per-warp values the same way. `red` is a
// shared scratch of at least 33 floats; every thread gets the result. They
// contain __syncthreads, so every thread of the block must call them.
struct OpSum {
  __device__ static __forceinline__ float apply(float a, float b) { return a + b; }
};
struct OpMin {
  __device__ static __forceinline__ float apply(float a, float b) { return b < a ? b : a; }
};
struct OpMax {
  __device__ static __forceinline__ float apply(float a, float b) { return b > a ? b : a; }
};

template <typename Op>
__device__ __forceinline__ float warp_all(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = Op::apply(v, ck_shfl_xor(v, off));
  return v;
}

template <typename Op>
__device__ __forceinline__ float block_all(float v, float identity, float* red) {
  const int t = ck_tid(), lane = t & (kWarp - 1), warp = t / kWarp, nwarps = ck_nthreads() / kWarp;
  v = warp_all<Op>(v);
  if (lane == 0) red[warp] = v;
  ck_sync();
  if (warp == 0) {
    float x = lane < nwarps ? red[lane] : identity;
    x = warp_all<Op>(x);
    if (lane == 0) red[32] = x;
  }
  ck_sync();
  const float r = red[32];
  ck_sync();  // red may be reused right away
  return r;
}

__device__ __forceinline__ float block_sum(float v, float* red) { return block_all<OpSum>(v, 0.f, red); }
__device__ __forceinline__ float block_min(float v, float* red) { return block_all<OpMin>(v, kInf, red); }
__device__ __forceinline__ float block_max(float v, float* red) { return block_all<OpMax>(v, -kInf, red); }

// lo = min(cam), hi = max(cam) over one image's N CAM values (SPEC.md's lo, hi).
__device__ __forceinline__ void cam_range(const float* cam, int N, float* red, float& lo, float& hi) {
  float mn = kInf, mx = -kInf;
  for (int i = ck_tid(); i < N; i += ck_nthreads()) {
    const float v = cam[i];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  lo = block_min(mn, red);
  hi = block_max(mx, red);
}

}  // namespace cuda
}  // namespace cream
