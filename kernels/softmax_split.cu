// Split-row softmax for rows too long for one block (vocabularies of 128K-1M and beyond).
//
// Launched cooperatively (all blocks resident at once), as R groups of C blocks: group g handles
// rows g, g + R, g + 2R, ...; block c of the group owns the columns [c * chunk, (c + 1) * chunk).
// For each row every block reduces its chunk to a partial ((max, sum) forward, a sum backward),
// writes it to `part`, and waits at a barrier of its group (a counter in `cnt`, zeroed before the
// launch, that only grows: row k of the group is complete at C * (k + 1) arrivals). Every block
// then combines the C partials in the same fixed order, so the result is bitwise reproducible; no
// atomics touch the values. Partials are double-buffered by row parity: a group cannot reach row
// k + 2 before all its blocks have passed the barrier of row k + 1, after reading row k's partials.
//
// CACHED keeps the chunk (and its mask) in dynamic shared memory between the two phases, so each
// element is read once; without it the second phase reads the input again (rows so long that the
// resident blocks cannot hold them).
#include "softmax_common.cuh"

using namespace xps;

#define XPS_SPLIT_BLOCK 512

__device__ __forceinline__ void group_barrier(int* cnt, int target) {
  // Thread 0 publishes this block's partial and waits for the group; the caller syncs the block.
  __threadfence();
  atomicAdd(cnt, 1);
  while (*reinterpret_cast<volatile int*>(cnt) < target) __nanosleep(64);
  __threadfence();
}

template <typename T, bool CACHED>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_fwd_split(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy, const unsigned char* mp, long long mrs, long long mcs,
                  long long rows, int n, int log, int vec, int C, int chunk,
                  typename AccT<T>::type* part, int* cnt) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  constexpr int B = XPS_SPLIT_BLOCK;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  T* xs = reinterpret_cast<T*>(smem);
  unsigned char* ms = smem + ((chunk * (long long)sizeof(T) + 15) & ~15LL);
  const bool has_mask = mask.p != nullptr;
  const int tid = threadIdx.x;
  const int R = gridDim.x / C;
  const int grp = blockIdx.x / C;
  const int c = blockIdx.x % C;
  if (grp >= R) return;  // never: the host launches exactly R * C blocks
  const int c0 = c * chunk;
  const int len = max(0, min(n, c0 + chunk) - c0);
  const int npk = vec ? len / V : 0;  // c0 is a multiple of V, so packs stay aligned
  int k = 0;
  for (long long r = grp; r < rows; r += R, ++k) {
    const T* xr = x + r * ldx + c0;
    MS<A> st = ms_empty<A>();
    for (int p = tid; p < npk; p += B) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
      if (CACHED) reinterpret_cast<Pack<T>*>(xs)[p] = pk;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, c0 + p * V + e);
        if (CACHED && has_mask) ms[p * V + e] = in;
        if (in) st = ms_push(st, to_acc(pk.v[e]));
      }
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const T t = xr[q];
      if (CACHED) xs[q] = t;
      const bool in = mask.at(r, c0 + q);
      if (CACHED && has_mask) ms[q] = in;
      if (in) st = ms_push(st, to_acc(t));
    }
    st = block_ms<B>(st, red);
    A* slot = part + (((long long)grp * 2 + (k & 1)) * C) * 2;
    if (tid == 0) {
      slot[2 * c] = st.m;
      slot[2 * c + 1] = st.s;
      group_barrier(cnt + grp, C * (k + 1));
    }
    __syncthreads();
    MS<A> tot = ms_empty<A>();
    for (int q = tid; q < C; q += B) tot = ms_combine(tot, MS<A>{__ldcg(slot + 2 * q), __ldcg(slot + 2 * q + 1)});
    tot = block_ms<B>(tot, red);
    const A M = tot.m;
    const A inv = xrcp(tot.s);
    const A logS = xlog(tot.s);
    T* yr = y + r * ldy + c0;
    for (int p = tid; p < npk; p += B) {
      const Pack<T> pk = CACHED ? reinterpret_cast<const Pack<T>*>(xs)[p] : reinterpret_cast<const Pack<T>*>(xr)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = CACHED ? (!has_mask || ms[p * V + e]) : mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(fwd_out(to_acc(pk.v[e]), M, inv, logS, log != 0, in));
      }
      reinterpret_cast<Pack<T>*>(yr)[p] = o;
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const A v = to_acc(CACHED ? xs[q] : xr[q]);
      const bool in = CACHED ? (!has_mask || ms[q]) : mask.at(r, c0 + q);
      yr[q] = from_acc<T>(fwd_out(v, M, inv, logS, log != 0, in));
    }
    __syncthreads();
  }
}

template <typename T, bool CACHED>
__global__ void __launch_bounds__(XPS_SPLIT_BLOCK, 1)
    xps_bwd_split(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                  T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int op, int vec,
                  int C, int chunk, typename AccT<T>::type* part, int* cnt) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  constexpr int B = XPS_SPLIT_BLOCK;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  const long long arr = (chunk * (long long)sizeof(T) + 15) & ~15LL;
  T* ys = reinterpret_cast<T*>(smem);
  T* gs = reinterpret_cast<T*>(smem + arr);
  unsigned char* ms = smem + 2 * arr;
  const bool has_mask = mask.p != nullptr;
  const int tid = threadIdx.x;
  const int R = gridDim.x / C;
  const int grp = blockIdx.x / C;
  const int c = blockIdx.x % C;
  if (grp >= R) return;
  const int c0 = c * chunk;
  const int len = max(0, min(n, c0 + chunk) - c0);
  const int npk = vec ? len / V : 0;
  int k = 0;
  for (long long r = grp; r < rows; r += R, ++k) {
    const T* yr = y + r * ldy + c0;
    const T* gr = g + r * ldg + c0;
    A S = A(0);
    for (int p = tid; p < npk; p += B) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
      if (CACHED) {
        reinterpret_cast<Pack<T>*>(ys)[p] = py;
        reinterpret_cast<Pack<T>*>(gs)[p] = pg;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, c0 + p * V + e);
        if (CACHED && has_mask) ms[p * V + e] = in;
        if (in) S += bwd_term(to_acc(py.v[e]), to_acc(pg.v[e]), op);
      }
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const T ty = yr[q];
      const T tg = gr[q];
      if (CACHED) {
        ys[q] = ty;
        gs[q] = tg;
      }
      const bool in = mask.at(r, c0 + q);
      if (CACHED && has_mask) ms[q] = in;
      if (in) S += bwd_term(to_acc(ty), to_acc(tg), op);
    }
    S = block_sum<B>(S, red);
    A* slot = part + ((long long)grp * 2 + (k & 1)) * C;
    if (tid == 0) {
      slot[c] = S;
      group_barrier(cnt + grp, C * (k + 1));
    }
    __syncthreads();
    A tot = A(0);
    for (int q = tid; q < C; q += B) tot += __ldcg(slot + q);
    tot = block_sum<B>(tot, red);
    T* dr = dx + r * ldd + c0;
    for (int p = tid; p < npk; p += B) {
      const Pack<T> py = CACHED ? reinterpret_cast<const Pack<T>*>(ys)[p] : reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = CACHED ? reinterpret_cast<const Pack<T>*>(gs)[p] : reinterpret_cast<const Pack<T>*>(gr)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = CACHED ? (!has_mask || ms[p * V + e]) : mask.at(r, c0 + p * V + e);
        o.v[e] = from_acc<T>(bwd_out(to_acc(py.v[e]), to_acc(pg.v[e]), tot, op, in));
      }
      reinterpret_cast<Pack<T>*>(dr)[p] = o;
    }
    for (int q = npk * V + tid; q < len; q += B) {
      const A vy = to_acc(CACHED ? ys[q] : yr[q]);
      const A vg = to_acc(CACHED ? gs[q] : gr[q]);
      const bool in = CACHED ? (!has_mask || ms[q]) : mask.at(r, c0 + q);
      dr[q] = from_acc<T>(bwd_out(vy, vg, tot, op, in));
    }
    __syncthreads();
  }
}
