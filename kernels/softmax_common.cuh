// Shared device helpers for the softmax kernels: types, vector packs, the row semantics, reductions.
//
// Row semantics (identical to xpsoftmax/_generic.py):
//   * masked-out entries take no part in the row's max and sum and come out as 0 (log: -inf);
//   * M = max over the included entries, NaN-propagating, so a NaN poisons its row;
//   * M == +inf: the mass is split evenly over the +inf entries (e = 1 there, 0 elsewhere);
//   * M == -inf with included entries (all -inf): x - M is NaN, so the row is NaN;
//   * a fully masked row is all 0 (log: all -inf).
// Backward / JVP (S is a sum over the included entries only; masked entries give exactly 0):
//   OP_SOFTMAX     a = y * g,      out = y * (g - S)        (softmax VJP and JVP)
//   OP_LOG_VJP     a = g,          out = g - exp(y) * S
//   OP_LOG_JVP     a = exp(y) * g, out = g - S
#pragma once
#include <cuda_fp16.h>

namespace xps {

enum { OP_SOFTMAX = 0, OP_LOG_VJP = 1, OP_LOG_JVP = 2 };

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename AccT<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// exp for float: the hardware 2^t on t = x * log2(e) (MUFU.EX2, about 2 ulp near 0; the error grows
// as |x| * 2^-24 relative, which only touches entries many orders of magnitude below the row's
// largest, so row sums and norms keep float32 accuracy). It maps -inf to 0, +inf to inf, NaN to NaN
// and flushes results below 2^-126 to 0 (CuPy compiles with -ftz=true anyway). expf costs about
// ten times as many instructions and made the forward kernels compute-bound.
__device__ __forceinline__ float xexp(float x) {
  float p;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(p) : "f"(x * 1.4426950408889634f));
  return p;
}
__device__ __forceinline__ double xexp(double v) { return exp(v); }
__device__ __forceinline__ float xlog(float v) { return logf(v); }
// Reciprocal of a row sum (S >= 1 whenever it is used: the max entry contributes exp(0) = 1): the
// hardware approximation refined by one Newton step, within 1 ulp. IEEE division and __frcp_rn carry
// an out-of-line slow path whose call frame made the register-resident tiers spill.
__device__ __forceinline__ float xrcp(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return fmaf(r, fmaf(-v, r, 1.0f), r);
}
__device__ __forceinline__ double xrcp(double v) { return __drcp_rn(v); }
__device__ __forceinline__ double xlog(double v) { return log(v); }

template <typename A> __device__ __forceinline__ A inf();
template <> __device__ __forceinline__ float inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// max that propagates NaN from either side (fmax would drop it).
template <typename A> __device__ __forceinline__ A nmax(A a, A b) { return (a != a || a > b) ? a : b; }

// 16-byte vector of T.
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
};
template <typename T> struct alignas(16) Pack {
  T v[Vec<T>::N];
};

// Boolean mask addressed as mask[row * rs + col * cs]; p == nullptr means "no mask".
struct Mask {
  const unsigned char* p;
  long long rs;
  long long cs;
  __device__ __forceinline__ bool at(long long r, long long c) const {
    return p == nullptr || p[r * rs + c * cs] != 0;
  }
};

// Contribution of one included entry to the row sum, given the row max M.
template <typename A> __device__ __forceinline__ A expw(A x, A M) {
  if (M == inf<A>()) return x == inf<A>() ? A(1) : A(0);
  return xexp(x - M);
}

// Forward output of one entry. inv = 1/S, logS = log(S).
template <typename A>
__device__ __forceinline__ A fwd_out(A x, A M, A inv, A logS, bool log, bool inc) {
  if (!inc) return log ? -inf<A>() : A(0);
  if (M == inf<A>()) {
    const bool hit = x == inf<A>();
    return log ? (hit ? -logS : -inf<A>()) : (hit ? inv : A(0));
  }
  return log ? (x - M) - logS : xexp(x - M) * inv;
}

// Backward / JVP: the summand of one included entry, and the output.
template <typename A> __device__ __forceinline__ A bwd_term(A y, A g, int op) {
  if (op == OP_SOFTMAX) return y * g;
  if (op == OP_LOG_VJP) return g;
  return xexp(y) * g;
}
template <typename A> __device__ __forceinline__ A bwd_out(A y, A g, A S, int op, bool inc) {
  if (!inc) return A(0);
  if (op == OP_SOFTMAX) return y * (g - S);
  if (op == OP_LOG_VJP) return g - xexp(y) * S;
  return g - S;
}

// Online (max, sum) state: s = sum of expw(x, m) over the entries seen. Entries at -inf add nothing;
// a NaN makes the state NaN.
template <typename A> struct MS {
  A m;
  A s;
};
template <typename A> __device__ __forceinline__ MS<A> ms_empty() { return {-inf<A>(), A(0)}; }
template <typename A> __device__ __forceinline__ MS<A> ms_combine(MS<A> a, MS<A> b) {
  const A M = nmax(a.m, b.m);
  if (M != M) return {M, M};
  if (M == -inf<A>()) return {M, A(0)};
  if (M == inf<A>()) return {M, (a.m == M ? a.s : A(0)) + (b.m == M ? b.s : A(0))};
  return {M, a.s * xexp(a.m - M) + b.s * xexp(b.m - M)};
}
template <typename A> __device__ __forceinline__ MS<A> ms_push(MS<A> st, A x) {
  if (x == -inf<A>()) return st;
  if (x != x || st.m != st.m || x == inf<A>() || st.m == inf<A>())
    return ms_combine(st, MS<A>{x, A(1)});  // NaN and +inf: rare, take the general rule
  // Finite x, st.m finite or -inf (then st.s == 0 and the rescale gives 0): one exp.
  if (x > st.m) return {x, st.s * xexp(st.m - x) + A(1)};
  return {st.m, st.s + xexp(x - st.m)};
}

// ---- reductions. Butterfly shuffles give every lane the same bits (a + b == b + a exactly).
template <int W, typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = nmax(v, __shfl_xor_sync(0xffffffffu, v, o, W));
  return v;
}
template <int W, typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, W);
  return v;
}
template <int W, typename A> __device__ __forceinline__ MS<A> warp_ms(MS<A> v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    MS<A> u{__shfl_xor_sync(0xffffffffu, v.m, o, W), __shfl_xor_sync(0xffffffffu, v.s, o, W)};
    // Combine in lane order so both partners compute the same bits.
    v = (threadIdx.x & o) ? ms_combine(u, v) : ms_combine(v, u);
  }
  return v;
}

// Block-wide reductions over BLOCK threads (a multiple of 32). `red` holds 32 values of A;
// every thread gets the result. Ends with a barrier, so `red` may be reused right after.
// `warp_op` reduces over a warp; `identity` fills the lanes past the block's warp count.
template <int BLOCK, typename A, typename WarpOp>
__device__ __forceinline__ A block_reduce(A v, A* red, A identity, WarpOp warp_op) {
  v = warp_op(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  if (l == 0) red[w] = v;
  __syncthreads();
  v = l < BLOCK / 32 ? red[l] : identity;
  v = warp_op(v);
  __syncthreads();
  return v;
}
template <int BLOCK, typename A> __device__ __forceinline__ A block_max(A v, A* red) {
  return block_reduce<BLOCK>(v, red, -inf<A>(), [](A u) { return warp_max<32>(u); });
}
template <int BLOCK, typename A> __device__ __forceinline__ A block_sum(A v, A* red) {
  return block_reduce<BLOCK>(v, red, A(0), [](A u) { return warp_sum<32>(u); });
}
template <int BLOCK, typename A> __device__ __forceinline__ MS<A> block_ms(MS<A> v, A* red) {
  v = warp_ms<32>(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  if (l == 0) {
    red[w] = v.m;
    red[32 + w] = v.s;
  }
  __syncthreads();
  v = l < BLOCK / 32 ? MS<A>{red[l], red[32 + l]} : ms_empty<A>();
  v = warp_ms<32>(v);
  __syncthreads();
  return v;
}

}  // namespace xps
