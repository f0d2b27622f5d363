// Fused softmax / log-softmax forward, backward (VJP) and JVP kernels: one read of each input and one
// write of the output per element.
//
// Tiers (chosen in xpsoftmax/_cupy.py by row length and dtype):
//   xps_fwd_warp / xps_bwd_warp     LANES threads per row (LANES <= 32; several rows per warp when
//                                   LANES < 32), the row held in registers: PACKS 16-byte packs a lane.
//   xps_fwd_block / xps_bwd_block   one block per row, the row cached in dynamic shared memory.
//   *_plain                         the same tiers for rows without a mask, float16/float32: no
//                                   per-element tests (see fwd_warp_plain); on an H200 they moved
//                                   float16 rows of 32-1024 from 50-66 % to 82-95 % of the copy
//                                   bandwidth (benchmarks/results/2026-11-27-nvidia-h200-ab.md).
//                                   The unmasked forward also holds rows of 2048 in registers.
//   xps_fwd_strided / xps_bwd_strided
//                                   softmax over the middle axis of a C-contiguous (outer, n, inner)
//                                   array: coalesced across `inner` in 32-byte column tiles, cached in
//                                   shared memory (CACHED) or read twice (columns too long to cache).
// Rows longer than one block can cache go to softmax_split.cu.
//
// Layouts: last-axis kernels see rows of n contiguous elements, row r starting at ptr + r * ld.
// `vec` is 1 when every pointer is 16-byte aligned and every ld a multiple of the pack size, so
// whole packs move with 16-byte loads and stores; the rest of a row moves element by element.
// Grids are sized from the occupancy API on the host; every kernel loops over rows (grid-stride).
#include "softmax_common.cuh"

using namespace xps;

// ------------------------------------------------------------------------------------------------
// Pack helpers for the register tier.

// A pack of V = 16 / sizeof(T) elements starting at column c0 (a multiple of V): one 16-byte access
// when the pack is whole and aligned, element by element otherwise (columns >= n read as 0).
template <typename T>
__device__ __forceinline__ Pack<T> ld_pack(const T* __restrict__ row, int c0, int n, bool vec,
                                           T fill = from_acc<T>(0)) {
  constexpr int V = Vec<T>::N;
  if (vec && c0 + V <= n) return *reinterpret_cast<const Pack<T>*>(row + c0);
  Pack<T> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = c0 + e < n ? row[c0 + e] : fill;
  return pk;
}

// A pack of T from V accumulator values (float16: two per conversion instruction).
template <typename T, typename A> __device__ __forceinline__ Pack<T> to_pack(const A* a) {
  Pack<T> o;
#pragma unroll
  for (int e = 0; e < Vec<T>::N; ++e) o.v[e] = from_acc<T>(a[e]);
  return o;
}
template <> __device__ __forceinline__ Pack<__half> to_pack<__half, float>(const float* a) {
  Pack<__half> o;
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const __half2 h = __floats2half2_rn(a[e], a[e + 1]);
    o.v[e] = __low2half(h);
    o.v[e + 1] = __high2half(h);
  }
  return o;
}

template <typename T>
__device__ __forceinline__ void st_pack(T* __restrict__ row, int c0, int n, bool vec, const Pack<T>& pk) {
  constexpr int V = Vec<T>::N;
  if (vec && c0 + V <= n) {
    *reinterpret_cast<Pack<T>*>(row + c0) = pk;
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (c0 + e < n) row[c0 + e] = pk.v[e];
  }
}

// ------------------------------------------------------------------------------------------------
// Warp tier. Block of 128 threads; each group of LANES lanes owns one row at a time. The row loop
// bound is uniform across a warp (r0), so every lane reaches every shuffle.

// This thread's place in the warp tier: its lane within its row's group, its group (sub) within the
// warp, and the warp's first row and row stride (grid-stride over groups of 32 / LANES rows).
template <int LANES> struct WarpRows {
  static constexpr int RPW = 32 / LANES;
  int lane = threadIdx.x % LANES;
  int sub = (threadIdx.x % 32) / LANES;
  long long first = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32 * RPW;
  long long step = gridDim.x * (long long)blockDim.x / 32 * RPW;
};

// The masked kernels (xps_*_warp: rows with a mask, and every float64 row) use two bodies,
// chosen per dtype from measurements on an H200 (2026-11-27; unmasked float16/32 rows take
// the *_plain bodies further down):
//   *_packed    issues all of a row's loads first and keeps the row as loaded; float32 rows of
//               512-1024 went from 81 % / 69 % to 93 % / 82 % of copy bandwidth (forward) and the
//               backward to 99 %, because loads no longer wait one latency each.
//   *_converted converts each pack to float as it arrives and keeps the converted row (and, for
//               softmax, exp(x - M)); for float16 it was 15-20 % faster than *_packed, which
//               must convert every element again in each pass and becomes compute-bound.
template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void fwd_warp_packed(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int log, int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    unsigned inc[PACKS];
    // All loads first, then the arithmetic: with a use between two loads the compiler keeps
    // them in order, and a row of PACKS packs would wait PACKS memory latencies. The row stays
    // in registers as loaded (no converted copy, which would double the registers).
    Pack<T> pk[PACKS];
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) pk[k] = ld_pack<T>(x + r * ldx, c0, n, vec);
    }
    A M = -inf<A>();
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      inc[k] = 0u;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (valid && c0 + e < n && mask.at(r, c0 + e)) {
          inc[k] |= 1u << e;
          M = nmax(M, to_acc(pk[k].v[e]));
        }
      }
    }
    M = warp_max<LANES>(M);
    A S = A(0);
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e)
        if ((inc[k] >> e) & 1u) S += expw(to_acc(pk[k].v[e]), M);
    S = warp_sum<LANES>(S);
    const A inv = xrcp(S);
    const A logS = xlog(S);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e)
          o.v[e] = from_acc<T>(
              fwd_out(to_acc(pk[k].v[e]), M, inv, logS, log != 0, (inc[k] >> e) & 1u));
        st_pack<T>(y + r * ldy, c0, n, vec, o);
      }
    }
  }
}

template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void fwd_warp_converted(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int log, int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    A v[PACKS * V];
    unsigned inc[PACKS];
    A M = -inf<A>();
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      inc[k] = 0u;
      if (valid && c0 < n) {
        const Pack<T> pk = ld_pack<T>(x + r * ldx, c0, n, vec);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          v[k * V + e] = to_acc(pk.v[e]);
          if (c0 + e < n && mask.at(r, c0 + e)) {
            inc[k] |= 1u << e;
            M = nmax(M, v[k * V + e]);
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[k * V + e] = A(0);
      }
    }
    M = warp_max<LANES>(M);
    // Softmax keeps exp(x - M) in v for the output pass (one exp per element); log-softmax
    // keeps x, since its output x - M - log(S) needs no exp.
    A S = A(0);
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e)
        if ((inc[k] >> e) & 1u) {
          const A ew = expw(v[k * V + e], M);
          S += ew;
          if (!log) v[k * V + e] = ew;
        }
    S = warp_sum<LANES>(S);
    const A inv = xrcp(S);
    const A logS = xlog(S);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const bool in = (inc[k] >> e) & 1u;
          const A val = log ? fwd_out(v[k * V + e], M, inv, logS, true, in)
                            : (in ? v[k * V + e] * inv : A(0));
          o.v[e] = from_acc<T>(val);
        }
        st_pack<T>(y + r * ldy, c0, n, vec, o);
      }
    }
  }
}


// Unmasked rows (the common case) take these bodies: no per-element tests at all. Columns past
// the row's end are read as -inf (forward) or 0 (backward), which add nothing to a max or a sum,
// and are never stored. The max is the plain hardware max (it skips NaN): a NaN in the row then
// makes S NaN and with it every output, as the row rule asks; a row of -inf has M = -inf, so
// x - M is NaN, as the rule asks too. A warp holding a row whose max is +inf or NaN takes the
// general rule (expw / fwd_out), on values already in registers.
// The rest of an unmasked row once its values v (columns past the end at -inf) and their plain
// max M (over the row's LANES lanes) are known: v becomes the output.
template <int LANES, int NV, bool LOG, typename A>
__device__ __forceinline__ void fwd_plain_finish(A (&v)[NV], A M) {
  A S = A(0);
  // The test is warp-wide: with LANES < 32 the warp holds several rows, and both branches shuffle
  // over the whole warp. The general branch is right for every row, only slower.
  if (__all_sync(0xffffffffu, M < inf<A>())) {
    // Softmax keeps exp(x - M) for the output (one exp an element); log-softmax keeps x.
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const A ew = xexp(v[i] - M);
      S += ew;
      if (!LOG) v[i] = ew;
    }
    S = warp_sum<LANES>(S);
    if (LOG) {
      const A logS = xlog(S);
#pragma unroll
      for (int i = 0; i < NV; ++i) v[i] = (v[i] - M) - logS;
    } else {
      const A inv = xrcp(S);
#pragma unroll
      for (int i = 0; i < NV; ++i) v[i] *= inv;
    }
  } else {
    // +inf or NaN max (rare): the general rule, with the NaN-propagating max.
    M = -inf<A>();
#pragma unroll
    for (int i = 0; i < NV; ++i) M = nmax(M, v[i]);
    M = warp_max<LANES>(M);
#pragma unroll
    for (int i = 0; i < NV; ++i) S += expw(v[i], M);
    S = warp_sum<LANES>(S);
    const A inv = xrcp(S);
    const A logS = xlog(S);
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = fwd_out(v[i], M, inv, logS, LOG, true);
  }
}

// Unmasked rows (the common case) take these bodies: no per-element tests at all. Columns past
// the row's end are read as -inf (forward) or 0 (backward), which add nothing to a max or a sum,
// and are never stored. The max is the plain hardware max (it skips NaN): a NaN in the row then
// makes S NaN and with it every output, as the row rule asks; a row of -inf has M = -inf, so
// x - M is NaN, as the rule asks too. A warp holding a row whose max is +inf or NaN takes the
// general rule (expw / fwd_out), on values already in registers.
template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void fwd_warp_plain(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy, long long rows, int n, int log, int vec) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  const T ninf = from_acc<T>(-inf<A>());
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    Pack<T> pk[PACKS];
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {  // all loads first (see fwd_warp_packed)
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        pk[k] = ld_pack<T>(x + r * ldx, c0, n, vec, ninf);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) pk[k].v[e] = ninf;
      }
    }
    A v[PACKS * V];
    A M = -inf<A>();
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        v[k * V + e] = to_acc(pk[k].v[e]);
        M = fmax(M, v[k * V + e]);
      }
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) M = fmax(M, __shfl_xor_sync(0xffffffffu, M, o, LANES));
    if (log)
      fwd_plain_finish<LANES, PACKS * V, true>(v, M);
    else
      fwd_plain_finish<LANES, PACKS * V, false>(v, M);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) st_pack<T>(y + r * ldy, c0, n, vec, to_pack<T>(v + k * V));
    }
  }
}

template <typename T, int LANES, int PACKS>
__global__ void __launch_bounds__(128, 4)
    xps_fwd_warp(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                 const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int log, int vec) {
  if constexpr (sizeof(T) == 2)
    fwd_warp_converted<T, LANES, PACKS>(x, ldx, y, ldy, mp, mrs, mcs, rows, n, log, vec);
  else
    fwd_warp_packed<T, LANES, PACKS>(x, ldx, y, ldy, mp, mrs, mcs, rows, n, log, vec);
}

// Rows without a mask (the host passes mp == nullptr only here): fwd_warp_plain.
template <typename T, int LANES, int PACKS>
__global__ void __launch_bounds__(128, 4)
    xps_fwd_warp_plain(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                       const unsigned char*, long long, long long, long long rows, int n, int log, int vec) {
  fwd_warp_plain<T, LANES, PACKS>(x, ldx, y, ldy, rows, n, log, vec);
}

template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void bwd_warp_packed(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg, T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int op, int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    unsigned inc[PACKS];
    Pack<T> py[PACKS];
    Pack<T> pg[PACKS];
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {  // all loads first, as in xps_fwd_warp
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        py[k] = ld_pack<T>(y + r * ldy, c0, n, vec);
        pg[k] = ld_pack<T>(g + r * ldg, c0, n, vec);
      }
    }
    A S = A(0);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      inc[k] = 0u;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (valid && c0 + e < n && mask.at(r, c0 + e)) {
          inc[k] |= 1u << e;
          S += bwd_term(to_acc(py[k].v[e]), to_acc(pg[k].v[e]), op);
        }
      }
    }
    S = warp_sum<LANES>(S);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e)
          o.v[e] = from_acc<T>(
              bwd_out(to_acc(py[k].v[e]), to_acc(pg[k].v[e]), S, op, (inc[k] >> e) & 1u));
        st_pack<T>(dx + r * ldd, c0, n, vec, o);
      }
    }
  }
}

template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void bwd_warp_converted(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg, T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int op, int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    A vy[PACKS * V];
    A vg[PACKS * V];
    unsigned inc[PACKS];
    A S = A(0);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      inc[k] = 0u;
      if (valid && c0 < n) {
        const Pack<T> py = ld_pack<T>(y + r * ldy, c0, n, vec);
        const Pack<T> pg = ld_pack<T>(g + r * ldg, c0, n, vec);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          vy[k * V + e] = to_acc(py.v[e]);
          vg[k * V + e] = to_acc(pg.v[e]);
          if (c0 + e < n && mask.at(r, c0 + e)) {
            inc[k] |= 1u << e;
            S += bwd_term(vy[k * V + e], vg[k * V + e], op);
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) vy[k * V + e] = vg[k * V + e] = A(0);
      }
    }
    S = warp_sum<LANES>(S);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e)
          o.v[e] = from_acc<T>(bwd_out(vy[k * V + e], vg[k * V + e], S, op, (inc[k] >> e) & 1u));
        st_pack<T>(dx + r * ldd, c0, n, vec, o);
      }
    }
  }
}


// Unmasked backward / JVP rows: no per-element tests (columns past the end read as 0 and add 0 to
// S for every op), the row kept as loaded and converted again in the output pass.
template <typename T, int LANES, int PACKS, int OP>
__device__ __forceinline__ void bwd_warp_plain(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg, T* __restrict__ dx, long long ldd, long long rows, int n, int vec) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  const WarpRows<LANES> wr;
  const int lane = wr.lane;
  for (long long r0 = wr.first; r0 < rows; r0 += wr.step) {
    const long long r = r0 + wr.sub;
    const bool valid = r < rows;
    Pack<T> py[PACKS];
    Pack<T> pg[PACKS];
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        py[k] = ld_pack<T>(y + r * ldy, c0, n, vec);
        pg[k] = ld_pack<T>(g + r * ldg, c0, n, vec);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) py[k].v[e] = pg[k].v[e] = from_acc<T>(0);
      }
    }
    A S = A(0);
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) S += bwd_term(to_acc(py[k].v[e]), to_acc(pg[k].v[e]), OP);
    S = warp_sum<LANES>(S);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      const int c0 = (k * LANES + lane) * V;
      if (valid && c0 < n) {
        A o[V];
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = bwd_out(to_acc(py[k].v[e]), to_acc(pg[k].v[e]), S, OP, true);
        st_pack<T>(dx + r * ldd, c0, n, vec, to_pack<T>(o));
      }
    }
  }
}

template <typename T, int LANES, int PACKS>
__global__ void __launch_bounds__(128, 4)
    xps_bwd_warp(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                 T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int op,
                 int vec) {
  if constexpr (sizeof(T) == 2)
    bwd_warp_converted<T, LANES, PACKS>(y, ldy, g, ldg, dx, ldd, mp, mrs, mcs, rows, n, op, vec);
  else
    bwd_warp_packed<T, LANES, PACKS>(y, ldy, g, ldg, dx, ldd, mp, mrs, mcs, rows, n, op, vec);
}

// Rows without a mask: bwd_warp_plain.
template <typename T, int LANES, int PACKS>
__global__ void __launch_bounds__(128, 4)
    xps_bwd_warp_plain(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                       T* __restrict__ dx, long long ldd, const unsigned char*, long long, long long, long long rows, int n, int op,
                       int vec) {
  if (op == OP_SOFTMAX)
    bwd_warp_plain<T, LANES, PACKS, OP_SOFTMAX>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
  else if (op == OP_LOG_VJP)
    bwd_warp_plain<T, LANES, PACKS, OP_LOG_VJP>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
  else
    bwd_warp_plain<T, LANES, PACKS, OP_LOG_JVP>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
}

// ------------------------------------------------------------------------------------------------
// Block tier: one block per row, the row (and its mask) cached in dynamic shared memory:
// [ARRS arrays of n T, each padded to 16 bytes][n mask bytes, only with a mask].

__device__ __forceinline__ long long pad16(long long b) { return (b + 15) & ~15LL; }

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1)
    xps_fwd_block(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                  const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int log, int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  T* xs = reinterpret_cast<T*>(smem);
  unsigned char* ms = smem + pad16((long long)n * sizeof(T));
  const bool has_mask = mask.p != nullptr;
  const int tid = threadIdx.x;
  const int npk = vec ? n / V : 0;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * ldx;
    A M = -inf<A>();
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
      reinterpret_cast<Pack<T>*>(xs)[p] = pk;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, p * V + e);
        if (has_mask) ms[p * V + e] = in;
        if (in) M = nmax(M, to_acc(pk.v[e]));
      }
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const T t = xr[c];
      xs[c] = t;
      const bool in = mask.at(r, c);
      if (has_mask) ms[c] = in;
      if (in) M = nmax(M, to_acc(t));
    }
    M = block_max<BLOCK>(M, red);
    A S = A(0);
    for (int c = tid; c < n; c += BLOCK)
      if (!has_mask || ms[c]) S += expw(to_acc(xs[c]), M);
    S = block_sum<BLOCK>(S, red);
    const A inv = xrcp(S);
    const A logS = xlog(S);
    T* yr = y + r * ldy;
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xs)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = !has_mask || ms[p * V + e];
        o.v[e] = from_acc<T>(fwd_out(to_acc(pk.v[e]), M, inv, logS, log != 0, in));
      }
      reinterpret_cast<Pack<T>*>(yr)[p] = o;
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const bool in = !has_mask || ms[c];
      yr[c] = from_acc<T>(fwd_out(to_acc(xs[c]), M, inv, logS, log != 0, in));
    }
    __syncthreads();
  }
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1)
    xps_bwd_block(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                  T* __restrict__ dx, long long ldd, const unsigned char* mp, long long mrs, long long mcs, long long rows, int n, int op,
                  int vec) {
  const Mask mask{mp, mrs, mcs};
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  const long long arr = pad16((long long)n * sizeof(T));
  T* ys = reinterpret_cast<T*>(smem);
  T* gs = reinterpret_cast<T*>(smem + arr);
  unsigned char* ms = smem + 2 * arr;
  const bool has_mask = mask.p != nullptr;
  const int tid = threadIdx.x;
  const int npk = vec ? n / V : 0;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * ldy;
    const T* gr = g + r * ldg;
    A S = A(0);
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
      reinterpret_cast<Pack<T>*>(ys)[p] = py;
      reinterpret_cast<Pack<T>*>(gs)[p] = pg;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = mask.at(r, p * V + e);
        if (has_mask) ms[p * V + e] = in;
        if (in) S += bwd_term(to_acc(py.v[e]), to_acc(pg.v[e]), op);
      }
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const T ty = yr[c];
      const T tg = gr[c];
      ys[c] = ty;
      gs[c] = tg;
      const bool in = mask.at(r, c);
      if (has_mask) ms[c] = in;
      if (in) S += bwd_term(to_acc(ty), to_acc(tg), op);
    }
    S = block_sum<BLOCK>(S, red);
    T* dr = dx + r * ldd;
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(ys)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gs)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = !has_mask || ms[p * V + e];
        o.v[e] = from_acc<T>(bwd_out(to_acc(py.v[e]), to_acc(pg.v[e]), S, op, in));
      }
      reinterpret_cast<Pack<T>*>(dr)[p] = o;
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const bool in = !has_mask || ms[c];
      dr[c] = from_acc<T>(bwd_out(to_acc(ys[c]), to_acc(gs[c]), S, op, in));
    }
    __syncthreads();
  }
}


// Block tier without a mask: the same row rule with no per-element tests, and shared memory read in
// 16-byte packs in every pass (the shared copy is 16-byte aligned whatever the global layout).
// As in the plain warp bodies, the hardware max skips NaN (S then carries it); a row whose max is
// +inf or NaN takes the general rule. The row is one block's, so every test here is block-uniform.
// At most 64 registers a thread (the launch bound), so that two rows' blocks share a multiprocessor.
template <typename T, int BLOCK, bool LOG>
__device__ __forceinline__ void fwd_block_plain(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy, long long rows, int n, int vec) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  T* xs = reinterpret_cast<T*>(smem);
  const Pack<T>* xsp = reinterpret_cast<const Pack<T>*>(xs);
  const int tid = threadIdx.x;
  const int npk = vec ? n / V : 0;  // packs moved to and from global memory
  const int nsp = n / V;            // packs read from shared memory
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * ldx;
    A M = -inf<A>();
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(xr)[p];
      reinterpret_cast<Pack<T>*>(xs)[p] = pk;
#pragma unroll
      for (int e = 0; e < V; ++e) M = fmax(M, to_acc(pk.v[e]));
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const T t = xr[c];
      xs[c] = t;
      M = fmax(M, to_acc(t));
    }
    M = block_max<BLOCK>(M, red);  // also the barrier that publishes xs
    T* yr = y + r * ldy;
    if (M < inf<A>()) {
      A S = A(0);
      for (int p = tid; p < nsp; p += BLOCK) {
        const Pack<T> pk = xsp[p];
#pragma unroll
        for (int e = 0; e < V; ++e) S += xexp(to_acc(pk.v[e]) - M);
      }
      for (int c = nsp * V + tid; c < n; c += BLOCK) S += xexp(to_acc(xs[c]) - M);
      S = block_sum<BLOCK>(S, red);
      const A inv = xrcp(S);
      const A logS = xlog(S);
      for (int p = tid; p < npk; p += BLOCK) {
        const Pack<T> pk = xsp[p];
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A d = to_acc(pk.v[e]) - M;
          o.v[e] = from_acc<T>(LOG ? d - logS : xexp(d) * inv);
        }
        reinterpret_cast<Pack<T>*>(yr)[p] = o;
      }
      for (int c = npk * V + tid; c < n; c += BLOCK) {
        const A d = to_acc(xs[c]) - M;
        yr[c] = from_acc<T>(LOG ? d - logS : xexp(d) * inv);
      }
    } else {
      // +inf or NaN max (rare): the general rule, with the NaN-propagating max.
      A M2 = -inf<A>();
      for (int c = tid; c < n; c += BLOCK) M2 = nmax(M2, to_acc(xs[c]));
      M2 = block_max<BLOCK>(M2, red);
      A S = A(0);
      for (int c = tid; c < n; c += BLOCK) S += expw(to_acc(xs[c]), M2);
      S = block_sum<BLOCK>(S, red);
      const A inv = xrcp(S);
      const A logS = xlog(S);
      for (int c = tid; c < n; c += BLOCK) yr[c] = from_acc<T>(fwd_out(to_acc(xs[c]), M2, inv, logS, LOG, true));
    }
    __syncthreads();
  }
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1024 / BLOCK)
    xps_fwd_block_plain(const T* __restrict__ x, long long ldx, T* __restrict__ y, long long ldy,
                        const unsigned char*, long long, long long, long long rows, int n, int log, int vec) {
  if (log)
    fwd_block_plain<T, BLOCK, true>(x, ldx, y, ldy, rows, n, vec);
  else
    fwd_block_plain<T, BLOCK, false>(x, ldx, y, ldy, rows, n, vec);
}

template <typename T, int BLOCK, int OP>
__device__ __forceinline__ void bwd_block_plain(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg, T* __restrict__ dx, long long ldd, long long rows, int n, int vec) {
  using A = typename AccT<T>::type;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[64];
  const long long arr = pad16((long long)n * sizeof(T));
  T* ys = reinterpret_cast<T*>(smem);
  T* gs = reinterpret_cast<T*>(smem + arr);
  const int tid = threadIdx.x;
  const int npk = vec ? n / V : 0;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * ldy;
    const T* gr = g + r * ldg;
    A S = A(0);
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(yr)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gr)[p];
      reinterpret_cast<Pack<T>*>(ys)[p] = py;
      reinterpret_cast<Pack<T>*>(gs)[p] = pg;
#pragma unroll
      for (int e = 0; e < V; ++e) S += bwd_term(to_acc(py.v[e]), to_acc(pg.v[e]), OP);
    }
    for (int c = npk * V + tid; c < n; c += BLOCK) {
      const T ty = yr[c];
      const T tg = gr[c];
      ys[c] = ty;
      gs[c] = tg;
      S += bwd_term(to_acc(ty), to_acc(tg), OP);
    }
    S = block_sum<BLOCK>(S, red);  // also the barrier that publishes ys, gs
    T* dr = dx + r * ldd;
    for (int p = tid; p < npk; p += BLOCK) {
      const Pack<T> py = reinterpret_cast<const Pack<T>*>(ys)[p];
      const Pack<T> pg = reinterpret_cast<const Pack<T>*>(gs)[p];
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < V; ++e) o.v[e] = from_acc<T>(bwd_out(to_acc(py.v[e]), to_acc(pg.v[e]), S, OP, true));
      reinterpret_cast<Pack<T>*>(dr)[p] = o;
    }
    for (int c = npk * V + tid; c < n; c += BLOCK)
      dr[c] = from_acc<T>(bwd_out(to_acc(ys[c]), to_acc(gs[c]), S, OP, true));
    __syncthreads();
  }
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1024 / BLOCK)
    xps_bwd_block_plain(const T* __restrict__ y, long long ldy, const T* __restrict__ g, long long ldg,
                        T* __restrict__ dx, long long ldd, const unsigned char*, long long, long long, long long rows, int n, int op,
                        int vec) {
  if (op == OP_SOFTMAX)
    bwd_block_plain<T, BLOCK, OP_SOFTMAX>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
  else if (op == OP_LOG_VJP)
    bwd_block_plain<T, BLOCK, OP_LOG_VJP>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
  else
    bwd_block_plain<T, BLOCK, OP_LOG_JVP>(y, ldy, g, ldg, dx, ldd, rows, n, vec);
}

// ------------------------------------------------------------------------------------------------
// Strided tier: softmax over axis 1 of a C-contiguous (outer, n, inner) array. A tile is W = 32 bytes
// of consecutive `inner` positions of one `outer` index; a block is W lanes across
// the tile times TJ lanes along n (512 threads). Each column is reduced by its TJ threads, then their partials
// are combined in a fixed order (deterministic).

struct Mask3 {
  const unsigned char* p;
  long long so;
  long long sj;
  long long si;
  __device__ __forceinline__ bool at(long long o, long long j, long long i) const {
    return p == nullptr || p[o * so + j * sj + i * si] != 0;
  }
};

template <typename T, bool CACHED>
__global__ void __launch_bounds__(512, 1)
    xps_fwd_strided(const T* __restrict__ x, T* __restrict__ y, const unsigned char* mp, long long mso, long long msj,
                    long long msi, long long outer, int n,
                    long long inner, int log) {
  const Mask3 mask{mp, mso, msj, msi};
  using A = typename AccT<T>::type;
  constexpr int W = 32 / sizeof(T);
  constexpr int TJ = 512 / W;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red_m[TJ * W];
  __shared__ A red_s[TJ * W];
  __shared__ A fin[2 * W];
  T* xs = reinterpret_cast<T*>(smem);
  unsigned char* ms = smem + pad16((long long)n * W * sizeof(T));
  const bool has_mask = mask.p != nullptr;
  const int tx = threadIdx.x % W;
  const int ty = threadIdx.x / W;
  const long long tiles_i = (inner + W - 1) / W;
  const long long tiles = outer * tiles_i;
  for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
    const long long o = t / tiles_i;
    const long long i = (t % tiles_i) * W + tx;
    const bool ok = i < inner;
    const T* xc = x + o * (long long)n * inner + i;
    T* yc = y + o * (long long)n * inner + i;
    MS<A> st = ms_empty<A>();
    if (ok) {
#pragma unroll 8
      for (int j = ty; j < n; j += TJ) {
        const T v = xc[(long long)j * inner];
        const bool in = mask.at(o, j, i);
        if (CACHED) {
          xs[j * W + tx] = v;
          if (has_mask) ms[j * W + tx] = in;
        }
        if (in) st = ms_push(st, to_acc(v));
      }
    }
    red_m[ty * W + tx] = st.m;
    red_s[ty * W + tx] = st.s;
    __syncthreads();
    if (ty == 0) {
      MS<A> acc = ms_empty<A>();
      for (int q = 0; q < TJ; ++q) acc = ms_combine(acc, MS<A>{red_m[q * W + tx], red_s[q * W + tx]});
      fin[tx] = acc.m;
      fin[W + tx] = acc.s;
    }
    __syncthreads();
    const A M = fin[tx];
    const A S = fin[W + tx];
    const A inv = xrcp(S);
    const A logS = xlog(S);
    if (ok) {
#pragma unroll 8
      for (int j = ty; j < n; j += TJ) {
        A v;
        bool in;
        if (CACHED) {
          v = to_acc(xs[j * W + tx]);
          in = !has_mask || ms[j * W + tx];
        } else {
          v = to_acc(xc[(long long)j * inner]);
          in = mask.at(o, j, i);
        }
        yc[(long long)j * inner] = from_acc<T>(fwd_out(v, M, inv, logS, log != 0, in));
      }
    }
    __syncthreads();
  }
}

template <typename T, bool CACHED>
__global__ void __launch_bounds__(512, 1)
    xps_bwd_strided(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, const unsigned char* mp, long long mso, long long msj,
                    long long msi,
                    long long outer, int n, long long inner, int op) {
  const Mask3 mask{mp, mso, msj, msi};
  using A = typename AccT<T>::type;
  constexpr int W = 32 / sizeof(T);
  constexpr int TJ = 512 / W;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red_s[TJ * W];
  __shared__ A fin[W];
  const long long arr = pad16((long long)n * W * sizeof(T));
  T* ys = reinterpret_cast<T*>(smem);
  T* gs = reinterpret_cast<T*>(smem + arr);
  unsigned char* ms = smem + 2 * arr;
  const bool has_mask = mask.p != nullptr;
  const int tx = threadIdx.x % W;
  const int ty = threadIdx.x / W;
  const long long tiles_i = (inner + W - 1) / W;
  const long long tiles = outer * tiles_i;
  for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
    const long long o = t / tiles_i;
    const long long i = (t % tiles_i) * W + tx;
    const bool ok = i < inner;
    const long long base = o * (long long)n * inner + i;
    A S = A(0);
    if (ok) {
#pragma unroll 8
      for (int j = ty; j < n; j += TJ) {
        const T vy = y[base + (long long)j * inner];
        const T vg = g[base + (long long)j * inner];
        const bool in = mask.at(o, j, i);
        if (CACHED) {
          ys[j * W + tx] = vy;
          gs[j * W + tx] = vg;
          if (has_mask) ms[j * W + tx] = in;
        }
        if (in) S += bwd_term(to_acc(vy), to_acc(vg), op);
      }
    }
    red_s[ty * W + tx] = S;
    __syncthreads();
    if (ty == 0) {
      A acc = A(0);
      for (int q = 0; q < TJ; ++q) acc += red_s[q * W + tx];
      fin[tx] = acc;
    }
    __syncthreads();
    S = fin[tx];
    if (ok) {
#pragma unroll 8
      for (int j = ty; j < n; j += TJ) {
        A vy, vg;
        bool in;
        if (CACHED) {
          vy = to_acc(ys[j * W + tx]);
          vg = to_acc(gs[j * W + tx]);
          in = !has_mask || ms[j * W + tx];
        } else {
          vy = to_acc(y[base + (long long)j * inner]);
          vg = to_acc(g[base + (long long)j * inner]);
          in = mask.at(o, j, i);
        }
        dx[base + (long long)j * inner] = from_acc<T>(bwd_out(vy, vg, S, op, in));
      }
    }
    __syncthreads();
  }
}
