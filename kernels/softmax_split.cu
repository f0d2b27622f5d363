// Split-row softmax for rows too long for one block's shared memory (vocabularies of 128K-1M and
// beyond): a deterministic two-phase reduction in two launches, no atomics.
//
// A row is cut into C chunks of `chunk` elements (a multiple of the pack size, so 16-byte accesses
// stay aligned); an item is one (row, chunk) pair, item = row * C + c.
//   phase 1 (xps_*_part):  each block reduces an item to a partial, written to part[item]:
//                          forward (max, sum of exp(x - max)), backward the sum of the terms.
//   phase 2 (xps_*_apply): each block combines the C partials of its item's row in one fixed
//                          order (so every block of a row gets the same bits, run after run) and
//                          writes its chunk of the output, reading the input again.
// Phase 2 walks the items in reverse: the chunks phase 1 read last are the likeliest still to be in
// L2, so part of the second read is served from cache.
#include "softmax_common.cuh"

using namespace xps;

#define XPS_SPLIT_BLOCK 512

// Item `it` = (row r, chunk): the chunk's first column c0, its length, and how many whole
// 16-byte packs it moves (0 when the layout is not vectorizable).
struct Item {
  long long r;
  int c0;
  int len;
  int npk;
};
template <int V>
__device__ __forceinline__ Item split_item(long long it, int C, int chunk, int n, int vec) {
  const long long r = it / C;
  const int c0 = static_cast<int>(it % C) * chunk;
  const int len = min(n, c0 + chunk) - c0;
  return {r, c0, len, vec ? len / V : 0};
}

// Partials of one row combined in a fixed order: thread t takes partials t, t + B, ... in turn,
// then a fixed-shape block reduction. `red` as in block_ms.
template <typename A>
__device__ __forceinline__ MS<A> row_total_ms(const A* __restrict__ part, long long row, int C,
                                              A* red) {
  MS<A> tot = ms_empty<A>();
  for (int q = threadIdx.x; q < C; q += XPS_SPLIT_BLOCK) {
    const long long i = (row * C + q) * 2;
    tot = ms_combine(tot, MS<A>{part[i], part[i + 1]});
  }
  return block_ms<XPS_SPLIT_BLOCK>(tot, red);
}

template <typename T>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_fwd_part(const T* __restrict__ x, long long ldx, const unsigned char* mp, long long mrs,
                 long long mcs, long long rows, int n, int vec, int C, int chunk,
                 typename AccT<T>::type* __restrict__ part) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const Mask mask{mp, mrs, mcs};
  __shared__ A red[64];
  const long long items = rows * C;
  for (long long it = blockIdx.x; it < items; it += gridDim.x) {
    const auto [r, c0, len, npk] = split_item<V>(it, C, chunk, n, vec);
    const T* xr = x + r * ldx + c0;
    MS<A> st = ms_empty<A>();
#pragma unroll 4
    for (int p = threadIdx.x; p < npk; p += XPS_SPLIT_BLOCK) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (mask.at(r, c0 + p * V + e)) st = ms_push(st, to_acc(pk.v[e]));
    }
    for (int q = npk * V + threadIdx.x; q < len; q += XPS_SPLIT_BLOCK)
      if (mask.at(r, c0 + q)) st = ms_push(st, to_acc(xr[q]));
    st = block_ms<XPS_SPLIT_BLOCK>(st, red);
    if (threadIdx.x == 0) {
      part[2 * it] = st.m;
      part[2 * it + 1] = st.s;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_fwd_apply(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                  const unsigned char* mp, long long mrs, long long mcs, long long rows, int n,
                  int log, int vec, int C, int chunk,
                  const typename AccT<T>::type* __restrict__ part) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const Mask mask{mp, mrs, mcs};
  __shared__ A red[64];
  const long long items = rows * C;
  for (long long k = blockIdx.x; k < items; k += gridDim.x) {
    const long long it = items - 1 - k;
    const auto [r, c0, len, npk] = split_item<V>(it, C, chunk, n, vec);
    const MS<A> tot = row_total_ms(part, r, C, red);
    const A M = tot.m;
    const A inv = tot.s > A(0) ? xrcp(tot.s) : A(0);
    const A logS = xlog(tot.s);
    const T* xr = x + r * ldx + c0;
    T* yr = y + r * ldy + c0;
#pragma unroll 4
    for (int p = threadIdx.x; p < npk; p += XPS_SPLIT_BLOCK) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(fwd_out(to_acc(pk.v[e]), M, inv, logS, log != 0, in));
      }
      reinterpret_cast<Pack<T>*>(yr)[p] = o;
    }
    for (int q = npk * V + threadIdx.x; q < len; q += XPS_SPLIT_BLOCK)
      yr[q] = from_acc<T>(fwd_out(to_acc(xr[q]), M, inv, logS, log != 0, mask.at(r, c0 + q)));
  }
}

template <typename T>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_bwd_part(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                 const unsigned char* mp, long long mrs, long long mcs, long long rows, int n,
                 int op, int vec, int C, int chunk, typename AccT<T>::type* __restrict__ part) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const Mask mask{mp, mrs, mcs};
  __shared__ A red[64];
  const long long items = rows * C;
  for (long long it = blockIdx.x; it < items; it += gridDim.x) {
    const auto [r, c0, len, npk] = split_item<V>(it, C, chunk, n, vec);
    const T* yr = y + r * ldy + c0;
    const T* gr = g + r * ldg + c0;
    A S = A(0);
#pragma unroll 4
    for (int p = threadIdx.x; p < npk; p += XPS_SPLIT_BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (mask.at(r, c0 + p * V + e)) S += bwd_term(to_acc(py.v[e]), to_acc(pg.v[e]), op);
    }
    for (int q = npk * V + threadIdx.x; q < len; q += XPS_SPLIT_BLOCK)
      if (mask.at(r, c0 + q)) S += bwd_term(to_acc(yr[q]), to_acc(gr[q]), op);
    S = block_sum<XPS_SPLIT_BLOCK>(S, red);
    if (threadIdx.x == 0) part[it] = S;
  }
}

template <typename T>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_bwd_apply(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                  T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs,
                  long long mcs, long long rows, int n, int op, int vec, int C, int chunk,
                  const typename AccT<T>::type* __restrict__ part) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const Mask mask{mp, mrs, mcs};
  __shared__ A red[64];
  const long long items = rows * C;
  for (long long k = blockIdx.x; k < items; k += gridDim.x) {
    const long long it = items - 1 - k;
    const auto [r, c0, len, npk] = split_item<V>(it, C, chunk, n, vec);
    A tot = A(0);
    for (int q = threadIdx.x; q < C; q += XPS_SPLIT_BLOCK) tot += part[r * C + q];
    tot = block_sum<XPS_SPLIT_BLOCK>(tot, red);
    const T* yr = y + r * ldy + c0;
    const T* gr = g + r * ldg + c0;
    T* dr = dx + r * ldd + c0;
#pragma unroll 4
    for (int p = threadIdx.x; p < npk; p += XPS_SPLIT_BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(bwd_out(to_acc(py.v[e]), to_acc(pg.v[e]), tot, op, in));
      }
      reinterpret_cast<Pack<T>*>(dr)[p] = o;
    }
    for (int q = npk * V + threadIdx.x; q < len; q += XPS_SPLIT_BLOCK)
      dr[q] = from_acc<T>(bwd_out(to_acc(yr[q]), to_acc(gr[q]), tot, op, mask.at(r, c0 + q)));
  }
}
