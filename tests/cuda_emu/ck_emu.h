// Software emulation of the CUDA primitives used by csrc/cuda/*.cuh, for
// checking kernel index math on a machine without a GPU. One OS thread per
// CUDA thread; std::barrier for __syncthreads, warp shuffles, cluster and grid
// barriers; distributed shared memory = pointers into peer CTAs' buffers.
#pragma once
#include <pthread.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <map>
#include <mutex>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CK_HAS_CLUSTERS 1

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };

namespace emu {
using Bar = std::barrier<>;
// An mbarrier with one expected arrival per phase and a transaction count.
struct Mbar {
  std::mutex mu;
  std::condition_variable cv;
  int64_t phase = 0;  // phases completed
  int pending = 1;
  int64_t tx = 0;
  void maybe_complete() {
    if (pending == 0 && tx == 0) {
      ++phase;
      pending = 1;
      cv.notify_all();
    }
  }
};
struct Block {
  int nt = 0;
  std::mutex mbar_mu;
  std::map<ptrdiff_t, std::unique_ptr<Mbar>> mbars;  // by shared-memory offset
  std::unique_ptr<Bar> bar;
  std::vector<std::unique_ptr<Bar>> wbar;
  std::vector<float> xbuf;
  std::atomic<int> orv{0};
  std::vector<unsigned char> smem_store;
  unsigned char* smem = nullptr;
};
struct Cluster {
  int cs = 1;
  std::unique_ptr<Bar> bar;
  std::vector<Block*> blocks;
};
struct Grid {
  std::unique_ptr<Bar> bar;
};
struct Ctx {
  int tid = 0;
  int64_t bid = 0, nblocks = 1;
  int rank = 0;
  Block* blk = nullptr;
  Cluster* cl = nullptr;
  Grid* grid = nullptr;
  std::optional<Bar::arrival_token> token;
};
inline thread_local Ctx ctx;

inline void init_block(Block& b, int nt, size_t smem) {
  b.nt = nt;
  b.bar = std::make_unique<Bar>(nt);
  b.wbar.clear();
  for (int w = 0; w < nt / 32; ++w) b.wbar.push_back(std::make_unique<Bar>(32));
  b.xbuf.assign(nt, 0.f);
  b.smem_store.assign(smem + 64, 0xCD);  // garbage, like real shared memory
  uintptr_t a = reinterpret_cast<uintptr_t>(b.smem_store.data());
  b.smem = reinterpret_cast<unsigned char*>((a + 15) & ~uintptr_t(15));
}

// Run fn on n threads with small stacks; join.
inline void run_threads(int n, const std::function<void(int)>& fn) {
  struct Arg { const std::function<void(int)>* fn; int i; };
  std::vector<pthread_t> th(n);
  std::vector<Arg> args(n);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  for (int i = 0; i < n; ++i) {
    args[i] = {&fn, i};
    int rc = pthread_create(&th[i], &attr, [](void* p) -> void* {
      Arg* a = static_cast<Arg*>(p);
      (*a->fn)(a->i);
      return nullptr;
    }, &args[i]);
    if (rc != 0) { std::fprintf(stderr, "pthread_create failed (%d threads)\n", n); std::abort(); }
  }
  for (int i = 0; i < n; ++i) pthread_join(th[i], nullptr);
  pthread_attr_destroy(&attr);
}

// Launch: blocks are grouped in clusters of cs; `concurrent` blocks run at
// once (a multiple of cs; all of them for grid-synchronizing kernels).
inline void launch(int64_t nblocks, int nt, size_t smem, int cs, int64_t concurrent,
                   const std::function<void()>& body) {
  for (int64_t b0 = 0; b0 < nblocks; b0 += concurrent) {
    const int64_t nb = std::min<int64_t>(concurrent, nblocks - b0);
    std::vector<Block> blocks(nb);
    for (auto& b : blocks) init_block(b, nt, smem);
    const int64_t ncl = (nb + cs - 1) / cs;
    std::vector<Cluster> cls(ncl);
    for (int64_t c = 0; c < ncl; ++c) {
      cls[c].cs = cs;
      cls[c].bar = std::make_unique<Bar>(cs * nt);
      for (int r = 0; r < cs; ++r) cls[c].blocks.push_back(&blocks[c * cs + r]);
    }
    Grid grid;
    grid.bar = std::make_unique<Bar>(nb * nt);
    run_threads(static_cast<int>(nb * nt), [&](int i) {
      const int64_t lb = i / nt;
      ctx.tid = i % nt;
      ctx.bid = b0 + lb;
      ctx.nblocks = nblocks;
      ctx.blk = &blocks[lb];
      ctx.cl = &cls[lb / cs];
      ctx.rank = static_cast<int>(lb % cs);
      ctx.grid = &grid;
      body();
    });
  }
}
}  // namespace emu

inline int ck_tid() { return emu::ctx.tid; }
inline int ck_nthreads() { return emu::ctx.blk->nt; }
inline int64_t ck_bid() { return emu::ctx.bid; }
inline int64_t ck_nblocks() { return emu::ctx.nblocks; }
inline void ck_sync() { emu::ctx.blk->bar->arrive_and_wait(); }
inline int ck_sync_or(int p) {
  auto* b = emu::ctx.blk;
  if (p) b->orv.fetch_or(1);
  b->bar->arrive_and_wait();
  const int r = b->orv.load();
  b->bar->arrive_and_wait();
  if (emu::ctx.tid == 0) b->orv.store(0);
  b->bar->arrive_and_wait();
  return r;
}
inline float ck_shfl_xor(float v, int off) {
  auto* b = emu::ctx.blk;
  const int t = emu::ctx.tid, w = t / 32, lane = t % 32;
  b->xbuf[t] = v;
  b->wbar[w]->arrive_and_wait();
  const float r = b->xbuf[w * 32 + (lane ^ off)];
  b->wbar[w]->arrive_and_wait();
  return r;
}
inline unsigned char* ck_dyn_smem() { return emu::ctx.blk->smem; }
float ck_half_bits(uint32_t h);  // defined by the test (common.h's half_to_float)
template <int VB>
inline void ck_cp_async(void* dst, const void* src, int bytes) {
  std::memcpy(dst, src, bytes);
  std::memset(static_cast<char*>(dst) + bytes, 0, VB - bytes);
}
inline void ck_cp_commit() {}
inline void ck_cp_wait(int) {}
inline void ck_grid_sync() { emu::ctx.grid->bar->arrive_and_wait(); }
inline int ck_cluster_rank() { return emu::ctx.rank; }
inline void ck_cluster_arrive_relaxed() { emu::ctx.token.emplace(emu::ctx.cl->bar->arrive()); }
inline void ck_cluster_wait() {
  emu::ctx.cl->bar->wait(std::move(*emu::ctx.token));
  emu::ctx.token.reset();
}
// ---- mbarriers and st.async
namespace emu {
inline ptrdiff_t smem_off(const void* p) {
  const ptrdiff_t off = static_cast<const unsigned char*>(p) - ctx.blk->smem;
  if (off < 0 || off >= static_cast<ptrdiff_t>(ctx.blk->smem_store.size())) {
    std::fprintf(stderr, "emu: %p is not in this block's shared memory\n", p);
    std::abort();
  }
  return off;
}
inline Mbar& mbar_of(Block* b, ptrdiff_t off) {
  std::lock_guard<std::mutex> lock(b->mbar_mu);
  auto it = b->mbars.find(off);
  if (it == b->mbars.end()) {
    std::fprintf(stderr, "emu: mbarrier at offset %ld used before its init\n", static_cast<long>(off));
    std::abort();
  }
  return *it->second;
}
// Complete `bytes` on the mbarrier at `off` of CTA `rank` after writing the
// data; `phase` is the phase the sender means: any other is a protocol bug.
inline void complete_tx(int rank, ptrdiff_t off, int64_t bytes, int phase) {
  Mbar& m = mbar_of(ctx.cl->blocks[rank], off);
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.phase != phase) {
    std::fprintf(stderr, "emu: st.async for phase %d reached an mbarrier in phase %ld\n", phase, static_cast<long>(m.phase));
    std::abort();
  }
  m.tx -= bytes;
  m.maybe_complete();
}
}  // namespace emu
inline void ck_mbar_init(uint64_t* bar) {
  auto* b = emu::ctx.blk;
  const ptrdiff_t off = emu::smem_off(bar);
  std::lock_guard<std::mutex> lock(b->mbar_mu);
  b->mbars[off] = std::make_unique<emu::Mbar>();
}
inline void ck_fence_mbar_init() {}
inline void ck_mbar_expect(uint64_t* bar, unsigned bytes) {
  emu::Mbar& m = emu::mbar_of(emu::ctx.blk, emu::smem_off(bar));
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.pending != 1) {
    std::fprintf(stderr, "emu: a second arrival in one phase\n");
    std::abort();
  }
  m.pending = 0;
  m.tx += bytes;
  m.maybe_complete();
}
inline void ck_mbar_wait(uint64_t* bar, int parity) {
  emu::Mbar& m = emu::mbar_of(emu::ctx.blk, emu::smem_off(bar));
  std::unique_lock<std::mutex> lock(m.mu);
  m.cv.wait(lock, [&] { return (m.phase & 1) != parity; });
}
inline void ck_st_async(float* dst, int rank, float v, uint64_t* bar, int phase) {
  const ptrdiff_t off = emu::smem_off(dst);
  std::memcpy(emu::ctx.cl->blocks[rank]->smem + off, &v, 4);
  emu::complete_tx(rank, emu::smem_off(bar), 4, phase);
}
inline void ck_st_async2(float* dst, int rank, float a, float b, uint64_t* bar, int phase) {
  if (reinterpret_cast<uintptr_t>(dst) % 8 != 0) {
    std::fprintf(stderr, "emu: st.async.v2 to an address that is not 8-byte aligned\n");
    std::abort();
  }
  const ptrdiff_t off = emu::smem_off(dst);
  std::memcpy(emu::ctx.cl->blocks[rank]->smem + off, &a, 4);
  std::memcpy(emu::ctx.cl->blocks[rank]->smem + off + 4, &b, 4);
  emu::complete_tx(rank, emu::smem_off(bar), 8, phase);
}
