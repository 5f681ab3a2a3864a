// Ember's CUDA kernels. Each one has a CPU reference in Rust (kernels/src/*.rs) that defines
// what it must compute; the Rust tests run both on every device present.
//
// Built to PTX by kernels/build.rs (nvcc --ptx, arch from CUDA_COMPUTE_CAP) and loaded at run
// time through candle's cudarc, so no CUDA runtime library is linked for them.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

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

extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_f32(const float* x, const float* r, const float* w, float* out, int hidden,
                                           float eps) {
    add_rms_norm<float>(x, r, w, out, hidden, eps);
}
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_f16(const __half* x, const __half* r, const __half* w, __half* out,
                                           int hidden, float eps) {
    add_rms_norm<__half>(x, r, w, out, hidden, eps);
}
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* r,
                                            const __nv_bfloat16* w, __nv_bfloat16* out, int hidden, float eps) {
    add_rms_norm<__nv_bfloat16>(x, r, w, out, hidden, eps);
}

// ---------------------------------------------------------------------------------------------
// Fused batch sampling (reference: kernels/src/sampling.rs, `sample_batch`; the same algorithm
// on the CPU: `sample_batch_by_keys`). One block of 1,024 threads per row. Tokens are ordered
// by a key, the value's order-preserving bits above the inverted token id (id_bits wide), so a
// larger key comes first in the reference's sort (larger value, then lower id; -0.0 is keyed
// as +0.0). Each token's mass is exp(s - max) in 32.32 fixed point, so block sums are integer
// and do not depend on the order atomics land in. Top-k, top-p and the draw are each a radix
// select over the keys, one pass over the row per 10-bit digit: a histogram of counts and
// masses per bucket, then a block-wide scan over the 1,024 buckets (one per thread) finds the
// bucket where the running count or mass meets the rule. At vocab 128,256 (49-bit keys) that
// is 5 passes per select and at most 16 per row, with the first pass that finds the max.

#define RADIX_BITS 10
#define BUCKETS (1 << RADIX_BITS)

struct RowParams {
    float temperature;
    int top_k;
    float top_p;
    float repetition_penalty;
    unsigned long long seed;
};

// Below this temperature a row is greedy (the reference's GREEDY_BELOW).
#define GREEDY_BELOW 1e-5f

__device__ unsigned long long splitmix64(unsigned long long seed, unsigned long long counter) {
    unsigned long long z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ unsigned long long key_of(float v, unsigned int id, int id_bits) {
    if (v == 0.0f) v = 0.0f;  // -0.0 is +0.0
    unsigned int bits = __float_as_uint(v);
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    unsigned long long id_mask = (1ull << id_bits) - 1ull;
    return ((unsigned long long)bits << id_bits) | (id_mask - (unsigned long long)id);
}

__device__ float value_of(unsigned long long key, int id_bits) {
    unsigned int bits = (unsigned int)(key >> id_bits);
    return __uint_as_float((bits & 0x80000000u) ? (bits & 0x7FFFFFFFu) : ~bits);
}

__device__ unsigned int id_of(unsigned long long key, int id_bits) {
    unsigned long long id_mask = (1ull << id_bits) - 1ull;
    return (unsigned int)(id_mask - (key & id_mask));
}

// The reference's `penalized`: saturates at +-FLT_MAX. NaN cannot reach it (checked first).
__device__ float penalized(float v, float penalty) {
    float r = v > 0.0f ? v / penalty : v * penalty;
    return fminf(fmaxf(r, -FLT_MAX), FLT_MAX);
}

// floor(r * total / 2^24), r < 2^24: the 88-bit product shifted right by 24.
__device__ unsigned long long draw_target(unsigned long long r, unsigned long long total) {
    unsigned long long lo = r * total, hi = __umul64hi(r, total);
    return (hi << 40) | (lo >> 24);
}

#define RULE_COUNT 0    // the running count reaches `k`
#define RULE_REACHES 1  // the running mass reaches top_p of the kept mass
#define RULE_EXCEEDS 2  // the running mass exceeds the draw's target over the kept mass

struct Select {
    unsigned int count[BUCKETS];
    unsigned long long mass[BUCKETS];
    unsigned long long warp_count[32];
    unsigned long long warp_mass[32];
    unsigned long long prefix, above_count, above_mass, own, total, threshold;
    double want;
};

// The first key in order at which the rule holds; sets s.above_mass + s.own to the mass of the
// keys down to it. `kept` is the kept mass, or 0 for the row's whole mass (known after the
// first digit's pass). With `fill`, the first pass also computes and stores the masses.
__device__ unsigned long long radix_select(Select& s, const float* scaled, float* mass_of, int vocab, int id_bits,
                                           float max_s, bool fill, int rule, unsigned long long k, float top_p,
                                           unsigned long long r, unsigned long long kept) {
    const int digits = (32 + id_bits + RADIX_BITS - 1) / RADIX_BITS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // every thread has read the previous select's results
    if (threadIdx.x == 0) { s.prefix = 0; s.above_count = 0; s.above_mass = 0; s.own = 0; }
    for (int level = 0; level < digits; level++) {
        const int shift = RADIX_BITS * (digits - 1 - level);
        s.count[threadIdx.x] = 0;
        s.mass[threadIdx.x] = 0;
        __syncthreads();
        const unsigned long long prefix = s.prefix;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned long long key = key_of(scaled[i], i, id_bits);
            if (level == 0 || (key >> (shift + RADIX_BITS)) == prefix) {
                float e;
                if (fill && level == 0) {
                    e = expf(scaled[i] - max_s);
                    mass_of[i] = e;
                } else {
                    e = mass_of[i];
                }
                int d = (int)((key >> shift) & (BUCKETS - 1));
                atomicAdd(&s.count[d], 1u);
                atomicAdd(&s.mass[d], (unsigned long long)(e * 4294967296.0f));
            }
        }
        __syncthreads();
        // Thread t owns bucket BUCKETS-1-t, so an inclusive scan in thread order runs from the
        // largest bucket down.
        const int d = BUCKETS - 1 - threadIdx.x;
        unsigned long long c = s.count[d], m = s.mass[d];
        for (int o = 1; o < 32; o <<= 1) {
            unsigned long long oc = __shfl_up_sync(0xffffffff, c, o), om = __shfl_up_sync(0xffffffff, m, o);
            if (lane >= o) { c += oc; m += om; }
        }
        if (lane == 31) { s.warp_count[warp] = c; s.warp_mass[warp] = m; }
        __syncthreads();
        if (warp == 0) {
            unsigned long long wc = s.warp_count[lane], wm = s.warp_mass[lane];
            for (int o = 1; o < 32; o <<= 1) {
                unsigned long long oc = __shfl_up_sync(0xffffffff, wc, o), om = __shfl_up_sync(0xffffffff, wm, o);
                if (lane >= o) { wc += oc; wm += om; }
            }
            s.warp_count[lane] = wc;  // inclusive totals of warps 0..=lane
            s.warp_mass[lane] = wm;
        }
        __syncthreads();
        if (warp > 0) { c += s.warp_count[warp - 1]; m += s.warp_mass[warp - 1]; }
        if (level == 0 && threadIdx.x == 0) {
            s.total = s.warp_mass[31];
            const unsigned long long kept_mass = kept ? kept : s.total;
            s.want = (double)top_p * (double)kept_mass;
            s.threshold = draw_target(r, kept_mass);
        }
        __syncthreads();
        const unsigned long long ac = s.above_count, am = s.above_mass;
        const unsigned long long own_c = s.count[d], own_m = s.mass[d];
        bool incl, excl;
        if (rule == RULE_COUNT) {
            incl = ac + c >= k;
            excl = ac + c - own_c >= k;
        } else if (rule == RULE_REACHES) {
            incl = (double)(am + m) >= s.want;
            excl = (double)(am + m - own_m) >= s.want;
        } else {
            incl = am + m > s.threshold;
            excl = am + m - own_m > s.threshold;
        }
        __syncthreads();
        // Exactly one bucket has the rule failing before it and holding with it.
        if (incl && !excl) {
            s.prefix = (prefix << RADIX_BITS) | (unsigned long long)d;
            s.above_count = ac + c - own_c;
            s.above_mass = am + m - own_m;
            s.own = own_m;
        }
        __syncthreads();
    }
    return s.prefix;
}

// `work` holds rows x vocab penalty-free copies of the logits (scaled in place), then rows x
// vocab masses. out[row] is the token id, or -(index + 1) for the first non-finite logit.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(float* work, int vocab, int id_bits,
                                                               const RowParams* params, const int* seen_offsets,
                                                               const unsigned int* seen_ids, unsigned long long step,
                                                               long long* out) {
    __shared__ Select s;
    __shared__ unsigned long long ushared[32];
    __shared__ int first_bad;
    const int row = blockIdx.x;
    float* l = work + (size_t)row * vocab;
    float* mass = work + (size_t)gridDim.x * vocab + (size_t)row * vocab;
    const RowParams p = params[row];
    if (threadIdx.x == 0) first_bad = vocab;
    __syncthreads();
    // Repetition penalty on each row's distinct seen tokens (from the host). A non-finite one
    // is left as it is, for the pass below to report.
    if (p.repetition_penalty != 1.0f) {
        for (int j = seen_offsets[row] + threadIdx.x; j < seen_offsets[row + 1]; j += blockDim.x) {
            unsigned int t = seen_ids[j];
            if (t < (unsigned int)vocab && isfinite(l[t])) l[t] = penalized(l[t], p.repetition_penalty);
        }
        __syncthreads();
    }
    // Pass 1: any non-finite logit; the largest key of the penalized values and, unless the row
    // is greedy, of the values over the temperature (written back).
    const bool greedy = p.temperature < GREEDY_BELOW || p.top_k == 1;
    unsigned long long best_v = 0, best_s = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (!isfinite(v)) atomicMin(&first_bad, i);
        unsigned long long kv = key_of(v, i, id_bits);
        best_v = kv > best_v ? kv : best_v;
        if (!greedy) {
            float sv = v / p.temperature;
            l[i] = sv;
            unsigned long long ks = key_of(sv, i, id_bits);
            best_s = ks > best_s ? ks : best_s;
        }
    }
    best_v = block_max_u64(best_v, ushared);
    if (first_bad < vocab) {
        if (threadIdx.x == 0) out[row] = -(long long)first_bad - 1;
        return;
    }
    float max_s = 0.0f;
    if (!greedy) {
        best_s = block_max_u64(best_s, ushared);
        max_s = value_of(best_s, id_bits);
    }
    // Greedy by the settings, or because the temperature made the largest value overflow.
    if (greedy || !isfinite(max_s)) {
        if (threadIdx.x == 0) out[row] = id_of(best_v, id_bits);
        return;
    }
    bool fill = true;
    unsigned long long kept = 0;  // 0: the row's whole mass
    if (p.top_k > 0 && p.top_k < vocab) {
        radix_select(s, l, mass, vocab, id_bits, max_s, fill, RULE_COUNT, (unsigned long long)p.top_k, 1.0f, 0, 0);
        kept = s.above_mass + s.own;
        fill = false;
    }
    if (p.top_p < 1.0f) {
        radix_select(s, l, mass, vocab, id_bits, max_s, fill, RULE_REACHES, 0, p.top_p, 0, kept);
        kept = s.above_mass + s.own;
        fill = false;
    }
    const unsigned long long r = splitmix64(p.seed, step) >> 40;
    unsigned long long chosen = radix_select(s, l, mass, vocab, id_bits, max_s, fill, RULE_EXCEEDS, 0, 1.0f, r, kept);
    if (threadIdx.x == 0) out[row] = id_of(chosen, id_bits);
}
