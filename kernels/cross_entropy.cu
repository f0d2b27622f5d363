// Fused cross-entropy on logits with class-index targets, along the last (contiguous) axis.
//
// One block per row (grid-stride over rows). The forward reads the row once, keeping an online
// max and sum of exponentials, and writes one loss per row; the backward makes the same pass for
// the row statistics, then writes (softmax - smoothed one-hot) * scale in a second pass over the
// row. Reductions are warp shuffles plus one shared-memory step: no atomics, so results are the
// same bits on every run.
//
// Semantics are those of xpsoftmax's generic path (xpsoftmax/_xent.py), for a row x of n classes,
// target t, label smoothing eps and lse = log(sum(exp(x))):
//   loss   = (1 - eps) * (lse - x[t]) + eps * (lse - mean(x))     (eps == 0: lse - x[t] only)
//   dx[c]  = (p[c] - q[c]) * scale,  p = softmax(x),  q[c] = eps / n + (c == t) * (1 - eps)
//   * a row with a NaN is NaN (loss and every gradient entry);
//   * a row with k > 0 entries of +inf takes the limit: p = 1/k at those entries and 0 elsewhere,
//     log p = -log(k) there and -inf elsewhere;
//   * a row of all -inf is NaN;
//   * an ignored row (has_ignore and t == ignore_index) has loss 0 and gradient exactly 0;
//   * a target outside [0, n) (the host validates, so this is only a guard) gives NaN.
// Accumulation is in float for __half and float, in double for double.
#include "softmax_common.cuh"

namespace xps_xent {

// Types, conversions and infinity are the softmax kernels' (softmax_common.cuh). exp and log are
// not: this file keeps the accurate expf / logf it was validated with on the GPU.
using xps::AccT;
using xps::from_acc;
using xps::inf;
using xps::to_acc;

__device__ __forceinline__ float xexp(float v) { return expf(v); }
__device__ __forceinline__ double xexp(double v) { return exp(v); }
__device__ __forceinline__ float xlog(float v) { return logf(v); }
__device__ __forceinline__ double xlog(double v) { return log(v); }

template <typename A> __device__ __forceinline__ A nan();
template <> __device__ __forceinline__ float nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// Running statistics of a row: m = max of the finite entries (-inf if none), s = sum of
// exp(x - m) over them, sum_x = sum of all entries, and the counts of +inf and NaN entries.
template <typename A> struct Stats {
  A m;
  A s;
  A sum_x;
  int n_inf;
  int n_nan;
};

template <typename A> __device__ __forceinline__ Stats<A> empty_stats() {
  return Stats<A>{-inf<A>(), A(0), A(0), 0, 0};
}

// Add one entry (the online softmax update).
template <typename A> __device__ __forceinline__ void push(Stats<A>& st, A x) {
  st.sum_x += x;
  if (x != x) {
    st.n_nan += 1;
  } else if (x == inf<A>()) {
    st.n_inf += 1;
  } else if (x > st.m) {
    st.s = st.s * xexp(st.m - x) + A(1);  // m == -inf: s == 0 and exp(-inf) == 0
    st.m = x;
  } else if (x > -inf<A>()) {
    st.s += xexp(x - st.m);  // finite x <= m, so m is finite
  }
}

// Combine the statistics of two disjoint parts of a row.
template <typename A> __device__ __forceinline__ Stats<A> merge(const Stats<A>& a, const Stats<A>& b) {
  Stats<A> r;
  r.m = a.m > b.m ? a.m : b.m;
  const A sa = a.m == -inf<A>() ? A(0) : a.s * xexp(a.m - r.m);
  const A sb = b.m == -inf<A>() ? A(0) : b.s * xexp(b.m - r.m);
  r.s = sa + sb;
  r.sum_x = a.sum_x + b.sum_x;
  r.n_inf = a.n_inf + b.n_inf;
  r.n_nan = a.n_nan + b.n_nan;
  return r;
}

template <typename A> __device__ __forceinline__ Stats<A> shfl_down(const Stats<A>& st, int d) {
  Stats<A> o;
  o.m = __shfl_down_sync(0xffffffffu, st.m, d);
  o.s = __shfl_down_sync(0xffffffffu, st.s, d);
  o.sum_x = __shfl_down_sync(0xffffffffu, st.sum_x, d);
  o.n_inf = __shfl_down_sync(0xffffffffu, st.n_inf, d);
  o.n_nan = __shfl_down_sync(0xffffffffu, st.n_nan, d);
  return o;
}

template <typename A> __device__ __forceinline__ Stats<A> warp_reduce(Stats<A> st) {
  for (int d = 16; d > 0; d >>= 1) st = merge(st, shfl_down(st, d));
  return st;  // complete in lane 0
}

// Statistics of the whole row, returned to every thread of the block. blockDim.x must be a
// multiple of 32 and at most 1024; `part` is shared scratch of 32 entries.
template <typename A> __device__ Stats<A> block_reduce(Stats<A> st, Stats<A>* part) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  st = warp_reduce(st);
  __syncthreads();  // the previous row's readers of part[0] are done
  if (lane == 0) part[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? part[lane] : empty_stats<A>();
    st = warp_reduce(st);
    if (lane == 0) part[0] = st;
  }
  __syncthreads();
  return part[0];
}

// Loss of one row from its statistics and the target logit xt.
template <typename A>
__device__ __forceinline__ A row_loss(const Stats<A>& st, A xt, long long n, A eps) {
  if (st.n_nan > 0) return nan<A>();
  A nll;     // -log p[t]
  A smooth;  // -mean(log p)
  if (st.n_inf > 0) {
    const A log_k = xlog(A(st.n_inf));
    nll = xt == inf<A>() ? log_k : inf<A>();
    smooth = st.n_inf == n ? log_k : inf<A>();
  } else {
    const A log_s = xlog(st.s);  // all -inf: m - m is NaN below, as in the generic path
    nll = (st.m - xt) + log_s;
    smooth = (st.m - st.sum_x / A(n)) + log_s;
  }
  return eps == A(0) ? nll : (A(1) - eps) * nll + eps * smooth;
}

}  // namespace xps_xent

// loss[r] for rows r of x (rows x n, row-major), targets in target[r].
template <typename T>
__global__ void xps_xent_fwd(const T* __restrict__ x, const long long* __restrict__ target,
                             typename xps_xent::AccT<T>::type* __restrict__ loss, long long rows,
                             long long n, long long ignore_index, int has_ignore,
                             double smoothing) {
  using A = typename xps_xent::AccT<T>::type;
  __shared__ xps_xent::Stats<A> part[32];
  const A eps = A(smoothing);
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long t = target[row];
    if (has_ignore && t == ignore_index) {  // the same for the whole block
      if (threadIdx.x == 0) loss[row] = A(0);
      continue;
    }
    const T* xr = x + row * n;
    xps_xent::Stats<A> st = xps_xent::empty_stats<A>();
    for (long long c = threadIdx.x; c < n; c += blockDim.x) xps_xent::push(st, xps_xent::to_acc(xr[c]));
    st = xps_xent::block_reduce(st, part);
    if (threadIdx.x == 0) {
      loss[row] = (t < 0 || t >= n) ? xps_xent::nan<A>()
                                    : xps_xent::row_loss(st, xps_xent::to_acc(xr[t]), n, eps);
    }
  }
}

// dx[r, c] = (softmax(x[r])[c] - q[c]) * scale[r * scale_stride]; scale_stride is 0 for one scale
// shared by every row (reductions "mean" and "sum") and 1 for one per row ("none").
template <typename T>
__global__ void xps_xent_bwd(const T* __restrict__ x, const long long* __restrict__ target,
                             const typename xps_xent::AccT<T>::type* __restrict__ scale,
                             long long scale_stride, T* __restrict__ dx, long long rows,
                             long long n, long long ignore_index, int has_ignore,
                             double smoothing) {
  using A = typename xps_xent::AccT<T>::type;
  __shared__ xps_xent::Stats<A> part[32];
  const A eps = A(smoothing);
  const A off = eps / A(n);          // q at the other classes
  const A on = (A(1) - eps) + off;  // q at the target class
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long t = target[row];
    const T* xr = x + row * n;
    T* dr = dx + row * n;
    if (has_ignore && t == ignore_index) {  // the same for the whole block
      for (long long c = threadIdx.x; c < n; c += blockDim.x) dr[c] = xps_xent::from_acc<T>(A(0));
      continue;
    }
    xps_xent::Stats<A> st = xps_xent::empty_stats<A>();
    for (long long c = threadIdx.x; c < n; c += blockDim.x) xps_xent::push(st, xps_xent::to_acc(xr[c]));
    st = xps_xent::block_reduce(st, part);
    const A w = scale[row * scale_stride];
    const bool bad = st.n_nan > 0 || t < 0 || t >= n;
    const A inv_s = A(1) / st.s;
    const A inv_k = A(1) / A(st.n_inf);
    for (long long c = threadIdx.x; c < n; c += blockDim.x) {
      const A xc = xps_xent::to_acc(xr[c]);
      A p;
      if (bad) {
        p = xps_xent::nan<A>();
      } else if (st.n_inf > 0) {
        p = xc == xps_xent::inf<A>() ? inv_k : A(0);
      } else {
        p = xps_xent::xexp(xc - st.m) * inv_s;  // all -inf: exp(NaN) is NaN, as in the generic path
      }
      const A q = c == t ? on : off;
      dr[c] = xps_xent::from_acc<T>((p - q) * w);
    }
  }
}
