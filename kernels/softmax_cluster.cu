// Cluster-row softmax (Hopper, sm_90+): a row too long for one block's shared memory is spread over
// the XPS_CLUSTER blocks of a thread-block cluster. Each block caches its chunk of the row in its own
// shared memory, reduces it, and publishes the partial in a shared-memory slot; after one cluster
// barrier every block reads the XPS_CLUSTER partials through distributed shared memory, combines them
// in rank order (so every block, and every run, gets the same bits) and writes its chunk from its
// cache. The input is read once, against twice for the two-launch split-row path (softmax_split.cu),
// which remains for rows that do not fit a cluster and for devices without clusters.
//
// Layout as in softmax.cu: rows of n elements, row r at ptr + r * ld; `vec` says 16-byte packs are
// safe. Block `rank` of a cluster owns columns [rank * chunk, rank * chunk + chunk) (chunk a multiple
// of the pack size); clusters loop over rows (grid-stride over clusters).
//
// Slots are double-buffered by row parity: a block may write its slot for row r + 1 while a slower
// block of its cluster still reads the slots of row r, but cannot reach row r + 2 before that block
// has passed the barrier of row r + 1. A last barrier keeps every block's shared memory alive until
// the others are done reading it.
#include <cooperative_groups.h>

#include "softmax_common.cuh"

using namespace xps;
namespace cg = cooperative_groups;

#define XPS_CLUSTER 8
#define XPS_CLUSTER_BLOCK 512

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define XPS_CLUSTER_DIMS __cluster_dims__(XPS_CLUSTER, 1, 1)
#else
#define XPS_CLUSTER_DIMS
#endif

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// After the row's barrier: threads 0..XPS_CLUSTER-1 each fetch one block's slot (one remote
// latency for all), then every thread combines them in rank order from the local copy.
template <int K, typename A>
__device__ __forceinline__ void gather_slots(cg::cluster_group& cluster, A (*slot)[2], int parity,
                                             A (*got)[2]) {
  const int t = threadIdx.x;
  if (t < XPS_CLUSTER) {
    const A* rs = cluster.map_shared_rank(&slot[parity][0], t);
#pragma unroll
    for (int k = 0; k < K; ++k) got[t][k] = rs[k];
  }
  __syncthreads();
}

template <typename T, bool MASKED>
__device__ __forceinline__ void fwd_cluster(const T* __restrict__ x, long long ldx, T* __restrict__ y,
                                            long long ldy, Mask mask, long long rows, int n, int log,
                                            int vec, int chunk) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  constexpr int B = XPS_CLUSTER_BLOCK;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  __shared__ A slot[2][2];
  __shared__ A got[XPS_CLUSTER][2];
  T* xs = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x;
  const int c0 = static_cast<int>(cluster.block_rank()) * chunk;
  const int len = max(0, min(n - c0, chunk));
  const int npk = vec ? len / V : 0;
  const long long ncl = gridDim.x / XPS_CLUSTER;
  int parity = 0;
  for (long long r = blockIdx.x / XPS_CLUSTER; r < rows; r += ncl, parity ^= 1) {
    const T* xr = x + r * ldx + c0;
    MS<A> st = ms_empty<A>();
    for (int p = tid; p < npk; p += B) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
      reinterpret_cast<Pack<T>*>(xs)[p] = pk;
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (!MASKED || mask.at(r, c0 + p * V + e)) st = ms_push(st, to_acc(pk.v[e]));
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const T t = xr[q];
      xs[q] = t;
      if (!MASKED || mask.at(r, c0 + q)) st = ms_push(st, to_acc(t));
    }
    st = block_ms<B>(st, red);
    if (tid == 0) {
      slot[parity][0] = st.m;
      slot[parity][1] = st.s;
    }
    cluster.sync();
    gather_slots<2>(cluster, slot, parity, got);
    MS<A> tot = ms_empty<A>();
#pragma unroll
    for (int q = 0; q < XPS_CLUSTER; ++q) tot = ms_combine(tot, MS<A>{got[q][0], got[q][1]});
    const A M = tot.m;
    const A inv = xrcp(tot.s);
    const A logS = xlog(tot.s);
    T* yr = y + r * ldy + c0;
    for (int p = tid; p < npk; p += B) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xs)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = !MASKED || mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(fwd_out(to_acc(pk.v[e]), M, inv, logS, log != 0, in));
      }
      reinterpret_cast<Pack<T>*>(yr)[p] = o;
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const bool in = !MASKED || mask.at(r, c0 + q);
      yr[q] = from_acc<T>(fwd_out(to_acc(xs[q]), M, inv, logS, log != 0, in));
    }
    __syncthreads();  // xs and got are rewritten for the next row
  }
  cluster.sync();
}

template <typename T, bool MASKED>
__device__ __forceinline__ void bwd_cluster(const T* __restrict__ y, long long ldy,
                                            const T* __restrict__ g, long long ldg,
                                            T* __restrict__ dx, long long ldd, Mask mask,
                                            long long rows, int n, int op, int vec, int chunk) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  constexpr int B = XPS_CLUSTER_BLOCK;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  __shared__ A slot[2][2];
  __shared__ A got[XPS_CLUSTER][2];
  const int tid = threadIdx.x;
  const int c0 = static_cast<int>(cluster.block_rank()) * chunk;
  const int len = max(0, min(n - c0, chunk));
  const int npk = vec ? len / V : 0;
  T* ys = reinterpret_cast<T*>(smem);
  T* gs = reinterpret_cast<T*>(smem + ((chunk * sizeof(T) + 15) & ~static_cast<size_t>(15)));
  const long long ncl = gridDim.x / XPS_CLUSTER;
  int parity = 0;
  for (long long r = blockIdx.x / XPS_CLUSTER; r < rows; r += ncl, parity ^= 1) {
    const T* yr = y + r * ldy + c0;
    const T* gr = g + r * ldg + c0;
    A S = A(0);
    for (int p = tid; p < npk; p += B) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
      reinterpret_cast<Pack<T>*>(ys)[p] = py;
      reinterpret_cast<Pack<T>*>(gs)[p] = pg;
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (!MASKED || mask.at(r, c0 + p * V + e)) S += bwd_term(to_acc(py.v[e]), to_acc(pg.v[e]), op);
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const T ty = yr[q];
      const T tg = gr[q];
      ys[q] = ty;
      gs[q] = tg;
      if (!MASKED || mask.at(r, c0 + q)) S += bwd_term(to_acc(ty), to_acc(tg), op);
    }
    S = block_sum<B>(S, red);
    if (tid == 0) slot[parity][0] = S;
    cluster.sync();
    gather_slots<1>(cluster, slot, parity, got);
    S = A(0);
#pragma unroll
    for (int q = 0; q < XPS_CLUSTER; ++q) S += got[q][0];
    T* dr = dx + r * ldd + c0;
    for (int p = tid; p < npk; p += B) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(ys)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gs)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = !MASKED || mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(bwd_out(to_acc(py.v[e]), to_acc(pg.v[e]), S, op, in));
      }
      reinterpret_cast<Pack<T>*>(dr)[p] = o;
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const bool in = !MASKED || mask.at(r, c0 + q);
      dr[q] = from_acc<T>(bwd_out(to_acc(ys[q]), to_acc(gs[q]), S, op, in));
    }
    __syncthreads();
  }
  cluster.sync();
}

#endif  // sm_90+

// `chunk`: columns per block, a multiple of the pack size, with XPS_CLUSTER * chunk >= n. Dynamic
// shared memory: the chunk (forward) or the two chunks, each padded to 16 bytes (backward).
template <typename T>
__global__ void XPS_CLUSTER_DIMS __launch_bounds__(XPS_CLUSTER_BLOCK, 1)
    xps_fwd_cluster(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                    const unsigned char* mp, long long mrs, long long mcs, long long rows, int n,
                    int log, int vec, int chunk) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  const Mask mask{mp, mrs, mcs};
  if (mp == nullptr)
    fwd_cluster<T, false>(x, ldx, y, ldy, mask, rows, n, log, vec, chunk);
  else
    fwd_cluster<T, true>(x, ldx, y, ldy, mask, rows, n, log, vec, chunk);
#else
  __trap();  // the host launches cluster kernels only on sm_90+
#endif
}

template <typename T>
__global__ void XPS_CLUSTER_DIMS __launch_bounds__(XPS_CLUSTER_BLOCK, 1)
    xps_bwd_cluster(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                    T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs,
                    long long mcs, long long rows, int n, int op, int vec, int chunk) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  const Mask mask{mp, mrs, mcs};
  if (mp == nullptr)
    bwd_cluster<T, false>(y, ldy, g, ldg, dx, ldd, mask, rows, n, op, vec, chunk);
  else
    bwd_cluster<T, true>(y, ldy, g, ldg, dx, ldd, mask, rows, n, op, vec, chunk);
#else
  __trap();
#endif
}
