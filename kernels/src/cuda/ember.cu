// Ember's CUDA kernels. Each one has a CPU reference in Rust (kernels/src/*.rs) that defines
// what it must compute; the Rust tests run both on every device present.
//
// Built to PTX by kernels/build.rs (nvcc --ptx, arch from CUDA_COMPUTE_CAP) and loaded at run
// time through candle's cudarc, so no CUDA runtime library is linked for them.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK 1024

// ---------------------------------------------------------------------------------------------
// Block-wide reductions (blockDim.x == BLOCK, a multiple of 32).

__device__ float block_sum_f32(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

__device__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0ull;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

__device__ unsigned long long block_max_u64(unsigned long long v, unsigned long long* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffff, v, o);
        v = other > v ? other : v;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0ull;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            unsigned long long other = __shfl_xor_sync(0xffffffff, v, o);
            v = other > v ? other : v;
        }
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

// ---------------------------------------------------------------------------------------------
// Fused residual add + RMSNorm (reference: kernels/src/norm.rs). One block per row; writes
// sum = x + residual and normed = sum / rms(sum) * weight. Math in f32 whatever the storage.

template <typename T> __device__ float to_f32(T v);
template <> __device__ float to_f32<float>(float v) { return v; }
template <> __device__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ T from_f32(float v);
template <> __device__ float from_f32<float>(float v) { return v; }
template <> __device__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// `out` holds rows x hidden sums, then rows x hidden normed values (one allocation, so candle
// sees one output tensor of shape (2, rows, hidden)).
template <typename T>
__device__ void add_rms_norm(const T* x, const T* residual, const T* weight, T* out, int hidden, float eps) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const size_t n = (size_t)gridDim.x * hidden;
    const T* xr = x + row * hidden;
    const T* rr = residual + row * hidden;
    T* sr = out + row * hidden;
    T* nr = out + n + row * hidden;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // Round the sum to the storage type first, as candle's separate add would.
        T s = from_f32<T>(to_f32(xr[i]) + to_f32(rr[i]));
        sr[i] = s;
        float f = to_f32(s);
        sq += f * f;
    }
    float total = block_sum_f32(sq, shared);
    float scale = rsqrtf(total / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        nr[i] = from_f32<T>(to_f32(sr[i]) * scale * to_f32(weight[i]));
    }
}

extern "C" __global__ void add_rms_norm_f32(const float* x, const float* r, const float* w, float* out, int hidden,
                                           float eps) {
    add_rms_norm<float>(x, r, w, out, hidden, eps);
}
extern "C" __global__ void add_rms_norm_f16(const __half* x, const __half* r, const __half* w, __half* out,
                                           int hidden, float eps) {
    add_rms_norm<__half>(x, r, w, out, hidden, eps);
}
extern "C" __global__ void add_rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* r,
                                            const __nv_bfloat16* w, __nv_bfloat16* out, int hidden, float eps) {
    add_rms_norm<__nv_bfloat16>(x, r, w, out, hidden, eps);
}

// ---------------------------------------------------------------------------------------------
// Fused batch sampling (reference: kernels/src/sampling.rs, `sample_batch`; the same algorithm
// on the CPU: `sample_batch_by_keys`). One block per row. Tokens are ordered by a 64-bit key,
// the value's order-preserving bits above the inverted token id, so a larger key comes first
// in the reference's sort (larger value, then lower id). Top-k, top-p and the draw are each a
// bisection over keys of a count or a probability mass: no sort, no copy to the host.

struct RowParams {
    float temperature;
    int top_k;
    float top_p;
    float repetition_penalty;
    unsigned long long seed;
};

__device__ unsigned long long splitmix64(unsigned long long seed, unsigned long long counter) {
    unsigned long long z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ unsigned long long key_of(float v, unsigned int id) {
    unsigned int bits = __float_as_uint(v);
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((unsigned long long)bits << 32) | (unsigned long long)(0xFFFFFFFFu - id);
}

// Status per row: -1 ok, otherwise the index of the first non-finite logit.
extern "C" __global__ void sample_rows(float* work, int vocab, const RowParams* params, const int* seen_offsets,
                                       const unsigned int* seen_ids, unsigned long long step,
                                       unsigned int* out_tokens, int* out_status) {
    __shared__ float fshared[32];
    __shared__ unsigned long long ushared[32];
    __shared__ int first_bad;
    const int row = blockIdx.x;
    float* l = work + (size_t)row * vocab;
    const RowParams p = params[row];
    if (threadIdx.x == 0) first_bad = vocab;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (!isfinite(l[i])) atomicMin(&first_bad, i);
    }
    __syncthreads();
    if (first_bad < vocab) {
        if (threadIdx.x == 0) { out_status[row] = first_bad; out_tokens[row] = 0; }
        return;
    }
    // Repetition penalty: the host passes each row's distinct seen tokens.
    if (p.repetition_penalty != 1.0f) {
        for (int j = seen_offsets[row] + threadIdx.x; j < seen_offsets[row + 1]; j += blockDim.x) {
            unsigned int t = seen_ids[j];
            if (t < (unsigned int)vocab) {
                float v = l[t];
                l[t] = v > 0.0f ? v / p.repetition_penalty : v * p.repetition_penalty;
            }
        }
        __syncthreads();
    }
    if (p.temperature == 0.0f || p.top_k == 1) {
        unsigned long long best = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned long long k = key_of(l[i], i);
            best = k > best ? k : best;
        }
        best = block_max_u64(best, ushared);
        if (threadIdx.x == 0) { out_tokens[row] = 0xFFFFFFFFu - (unsigned int)(best & 0xFFFFFFFFull); out_status[row] = -1; }
        return;
    }
    float max_s = -INFINITY;
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float s = l[i] / p.temperature;
        l[i] = s;
        unsigned long long k = key_of(s, i);
        best = k > best ? k : best;
    }
    best = block_max_u64(best, ushared);
    {
        unsigned int bits = (unsigned int)(best >> 32);
        bits = (bits & 0x80000000u) ? (bits & 0x7FFFFFFFu) : ~bits;
        max_s = __uint_as_float(bits);
    }
    // Top-k: the largest key with at least k keys at or above it.
    unsigned long long kth = 0;
    if (p.top_k > 0 && p.top_k < vocab) {
        unsigned long long lo = 0, hi = best;
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo) / 2 + 1;
            unsigned long long c = 0;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += key_of(l[i], i) >= mid;
            c = block_sum_u64(c, ushared);
            if (c >= (unsigned long long)p.top_k) lo = mid; else hi = mid - 1;
        }
        kth = lo;
    }
    // Mass (unnormalized probability) of the keys at or above a bound.
#define MASS_GE(bound, out)                                                            \
    {                                                                                  \
        float m_ = 0.0f;                                                               \
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {                        \
            float s_ = l[i];                                                           \
            if (key_of(s_, i) >= (bound)) m_ += expf(s_ - max_s);                      \
        }                                                                              \
        out = block_sum_f32(m_, fshared);                                              \
    }
    float kept_k;
    MASS_GE(kth, kept_k);
    unsigned long long cut = kth;
    if (p.top_p < 1.0f) {
        float want = p.top_p * kept_k;
        unsigned long long lo = kth, hi = best;
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo) / 2 + 1;
            float m;
            MASS_GE(mid, m);
            if (m >= want) lo = mid; else hi = mid - 1;
        }
        cut = lo;
    }
    float total;
    MASS_GE(cut, total);
    float u = (float)(splitmix64(p.seed, step) >> 40) / (float)(1u << 24);
    float target = u * total;
    // The draw: the largest key whose mass at or above it exceeds the target.
    unsigned long long lo = cut, hi = best;
    while (lo < hi) {
        unsigned long long mid = lo + (hi - lo) / 2 + 1;
        float m;
        MASS_GE(mid, m);
        if (m > target) lo = mid; else hi = mid - 1;
    }
#undef MASS_GE
    if (threadIdx.x == 0) {
        // `lo` is a bound, not necessarily a key: the chosen token is the smallest key >= lo.
        out_status[row] = -1;
        out_tokens[row] = 0xFFFFFFFFu;
    }
    __syncthreads();
    unsigned long long chosen = ~0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        unsigned long long k = key_of(l[i], i);
        if (k >= lo && k < chosen) chosen = k;
    }
    // Smallest key >= lo: a max over the complement.
    unsigned long long inv = block_max_u64(~chosen, ushared);
    chosen = ~inv;
    if (threadIdx.x == 0) out_tokens[row] = 0xFFFFFFFFu - (unsigned int)(chosen & 0xFFFFFFFFull);
}
