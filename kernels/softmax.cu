// Placeholder while the fused kernels are written: y = a * x.
#include <cuda_fp16.h>

template <typename T>
__global__ void xps_scale(const T* __restrict__ x, T* __restrict__ y, float a, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    y[i] = (T)(a * (float)x[i]);
  }
}
