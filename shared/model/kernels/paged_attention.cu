// CUDA side of the paged KV cache (shared/model/src/paged/): writing new keys/values into the block pool, and causal
// attention of packed query rows over each sequence's blocks. Compiled to PTX by shared/model/build.rs and launched
// from shared/model/src/paged/cuda.rs; the layouts are the ops' contract (paged/cuda.rs has it in full):
//
//   pool    (num_blocks, 2, heads, block_size, head_dim)   index 0 of dim 1 = keys, 1 = values
//   new_kv  (tokens, 2, heads, head_dim)
//   slots   (tokens,) u32: token t goes to block slots[t] / block_size, offset slots[t] % block_size
//   q, out  (tokens, heads, head_dim), q already scaled by head_dim^-0.5
//   meta    u32: [q_start, q_len, context_len, table_offset] per sequence, then the block tables
//
// Batch invariance: one thread block computes one (query row, head) pair, and nothing in its arithmetic depends on
// the other rows of the batch or on the grid: the order of every sum is fixed by the row's own sequence (its key
// count) and by compile-time constants. The same sequence therefore gives bitwise the same output alone or in any
// batch. A decode step launches exactly one attention kernel per layer, whatever the number of sequences.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Threads per attention block: one key per thread when scoring a tile of keys.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Head dims up to kThreads * kMaxDimsPerThread are supported (checked on the host).
constexpr int kMaxDimsPerThread = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// q . k over head_dim in f32, summed in order d = 0, 1, ... whichever load path runs (so both give the same bits):
// 16-byte loads when the row is aligned and head_dim a multiple of their width, else one element at a time.
template <typename T> __device__ __forceinline__ float dot_row(const float *q_s, const T *k, uint32_t head_dim) {
    constexpr uint32_t kWidth = 16 / sizeof(T);
    float dot = 0.f;
    if (head_dim % kWidth == 0 && (reinterpret_cast<uintptr_t>(k) & 15) == 0) {
        for (uint32_t d = 0; d < head_dim; d += kWidth) {
            const uint4 raw = *reinterpret_cast<const uint4 *>(k + d);
            const T *elements = reinterpret_cast<const T *>(&raw);
#pragma unroll
            for (uint32_t j = 0; j < kWidth; ++j) dot = fmaf(q_s[d + j], to_float(elements[j]), dot);
        }
    } else {
        for (uint32_t d = 0; d < head_dim; ++d) dot = fmaf(q_s[d], to_float(k[d]), dot);
    }
    return dot;
}

// Block-wide reductions in a fixed order (butterfly within each warp, then warp 0 over the warp results): the result
// is bitwise the same on every call with the same inputs, and every thread receives it.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <bool kMax> __device__ __forceinline__ float block_reduce(float v, float *scratch) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
    // Everyone has read the scratch before it is reused.
    __syncthreads();
    return r;
}

// One thread block per (query row, head); grid = (tokens, heads), block = kThreads.
//
// Online softmax over tiles of kThreads keys: each thread scores one key of the tile (q . k in f32), the tile's max
// and sum update the running max m and denominator l, and the running output (f32, one or more dims per thread) is
// rescaled and accumulates p * v. Keys of position p live in block table[p / block_size] at offset p % block_size.
//
// Metadata the CPU op rejects (context_len < q_len, a block id outside the pool, a table past the end of meta) gives
// a row of NaN instead of reading out of bounds: checking it on the host would need a device-to-host copy per layer,
// and NaN logits make the error visible. A row no sequence claims is zeros, as on the CPU.
template <typename T>
__device__ void paged_attention(T *__restrict__ out, const T *__restrict__ q, const T *__restrict__ pool,
                                const uint32_t *__restrict__ meta, uint32_t meta_len, uint32_t num_seqs,
                                uint32_t heads, uint32_t head_dim, uint32_t block_size, uint32_t num_blocks) {
    extern __shared__ float shared[];
    float *q_s = shared;                       // head_dim
    float *p_s = q_s + head_dim;               // kThreads: the tile's probabilities
    float *scratch = p_s + kThreads;           // kWarps: reductions
    __shared__ size_t key_base_s[kThreads];    // the tile's key rows: element offset of each key in the pool
    __shared__ int seq_s;
    __shared__ int bad_block_s;

    const uint32_t row = blockIdx.x;
    const uint32_t head = blockIdx.y;
    const int tid = threadIdx.x;
    const size_t row_offset = ((size_t)row * heads + head) * head_dim;

    // The row's sequence: q_start <= row < q_start + q_len (rows of one sequence are contiguous).
    if (tid == 0) {
        seq_s = -1;
        bad_block_s = 0;
    }
    __syncthreads();
    for (uint32_t s = tid; s < num_seqs; s += kThreads) {
        const uint32_t q_start = meta[4 * s], q_len = meta[4 * s + 1];
        if (row >= q_start && row - q_start < q_len) seq_s = (int)s;
    }
    __syncthreads();
    const int seq = seq_s;

    if (seq < 0) {
        // A row no sequence claims (padding): zeros, as on the CPU.
        for (uint32_t d = tid; d < head_dim; d += kThreads) out[row_offset + d] = from_float<T>(0.f);
        return;
    }
    bool valid;
    uint32_t n_keys = 0, table = 0;
    {
        const uint32_t q_start = meta[4 * seq], q_len = meta[4 * seq + 1];
        const uint32_t context_len = meta[4 * seq + 2];
        table = meta[4 * seq + 3];
        const uint32_t table_len = (context_len + block_size - 1) / block_size;
        valid = context_len >= q_len && (size_t)table + table_len <= meta_len;
        // Causal: query i of the sequence sees positions 0 ..= context_len - q_len + i.
        n_keys = context_len - q_len + (row - q_start) + 1;
    }
    if (!valid) {
        for (uint32_t d = tid; d < head_dim; d += kThreads) out[row_offset + d] = from_float<T>(__int_as_float(0x7fc00000));
        return;
    }

    for (uint32_t d = tid; d < head_dim; d += kThreads) q_s[d] = to_float(q[row_offset + d]);

    // Accumulation: when head_dim divides kThreads, kThreads / head_dim groups of threads each take every
    // groups-th key of the tile for one dim; otherwise one group takes dims tid, tid + kThreads, ...
    const int groups = (head_dim <= kThreads && kThreads % head_dim == 0) ? kThreads / (int)head_dim : 1;
    const int group = groups > 1 ? tid / (int)head_dim : 0;
    const size_t kv_stride = (size_t)heads * block_size * head_dim;  // keys -> values of the same block
    float acc[kMaxDimsPerThread];
#pragma unroll
    for (int k = 0; k < kMaxDimsPerThread; ++k) acc[k] = 0.f;
    float m = -INFINITY, l = 0.f;

    for (uint32_t tile = 0; tile < n_keys; tile += kThreads) {
        const uint32_t tile_len = min((uint32_t)kThreads, n_keys - tile);
        __syncthreads();  // q_s written / the previous tile's p_s and key_base_s consumed
        float score = -INFINITY;
        if ((uint32_t)tid < tile_len) {
            const uint32_t pos = tile + tid;
            const uint32_t block = meta[table + pos / block_size];
            if (block < num_blocks) {
                const size_t base =
                    (((size_t)block * 2) * heads + head) * block_size * head_dim + (size_t)(pos % block_size) * head_dim;
                key_base_s[tid] = base;
                score = dot_row(q_s, pool + base, head_dim);
            } else {
                key_base_s[tid] = 0;
                bad_block_s = 1;
            }
        }
        const float tile_max = block_reduce<true>(score, scratch);
        const float m_new = fmaxf(m, tile_max);
        const float p = (uint32_t)tid < tile_len && score != -INFINITY ? expf(score - m_new) : 0.f;
        p_s[tid] = p;
        const float tile_sum = block_reduce<false>(p, scratch);  // its barrier also publishes p_s and key_base_s
        const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
        l = l * alpha + tile_sum;
        m = m_new;

        if (groups > 1) {
            const uint32_t d = tid % head_dim;
            float a = acc[0] * alpha;
            for (uint32_t j = group; j < tile_len; j += groups) a = fmaf(p_s[j], to_float(pool[key_base_s[j] + kv_stride + d]), a);
            acc[0] = a;
        } else {
#pragma unroll
            for (int k = 0; k < kMaxDimsPerThread; ++k) {
                const uint32_t d = tid + k * kThreads;
                if (d < head_dim) {
                    float a = acc[k] * alpha;
                    for (uint32_t j = 0; j < tile_len; ++j) a = fmaf(p_s[j], to_float(pool[key_base_s[j] + kv_stride + d]), a);
                    acc[k] = a;
                }
            }
        }
    }

    // A block id outside the pool anywhere in the row's keys poisons the row (bad_block_s was published by the
    // reductions' barriers).
    const float inv_l = bad_block_s ? __int_as_float(0x7fc00000) : 1.f / l;

    if (groups > 1) {
        // Combine the groups' partial sums in group order (fixed, so batch invariant).
        float *partial = shared;  // reuses q_s / p_s: kThreads floats
        __syncthreads();
        partial[tid] = acc[0];
        __syncthreads();
        if (group == 0) {
            float total = partial[tid];
            for (int g = 1; g < groups; ++g) total += partial[g * head_dim + tid];
            out[row_offset + tid] = from_float<T>(total * inv_l);
        }
    } else {
#pragma unroll
        for (int k = 0; k < kMaxDimsPerThread; ++k) {
            const uint32_t d = tid + k * kThreads;
            if (d < head_dim) out[row_offset + d] = from_float<T>(acc[k] * inv_l);
        }
    }
}

// new_kv (tokens, 2, heads, head_dim) -> pool (num_blocks, 2, heads, block_size, head_dim) at the tokens' slots.
// One thread block per token, threads over its 2 * heads * head_dim values. A slot outside the pool is skipped (the
// host cannot check slots without a device-to-host copy; the CPU op reports them).
template <typename T>
__device__ void write_kv(T *__restrict__ pool, const T *__restrict__ new_kv, const uint32_t *__restrict__ slots,
                         uint32_t heads, uint32_t head_dim, uint32_t block_size, uint32_t num_blocks) {
    const uint32_t token = blockIdx.x;
    const uint32_t slot = slots[token];
    const uint32_t block = slot / block_size, offset = slot % block_size;
    if (block >= num_blocks) return;
    const uint32_t per_token = 2 * heads * head_dim;
    const T *src = new_kv + (size_t)token * per_token;
    for (uint32_t e = threadIdx.x; e < per_token; e += blockDim.x) {
        const uint32_t d = e % head_dim;
        const uint32_t kv_head = e / head_dim;  // kv * heads + head
        pool[(((size_t)block * 2 * heads + kv_head) * block_size + offset) * head_dim + d] = src[e];
    }
}

}  // namespace

#define PAGED_KERNELS(NAME, T)                                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads)                                                           \
        paged_attention_##NAME(T *out, const T *q, const T *pool, const uint32_t *meta, uint32_t meta_len,          \
                               uint32_t num_seqs, uint32_t heads, uint32_t head_dim, uint32_t block_size,             \
                               uint32_t num_blocks) {                                                                 \
        paged_attention<T>(out, q, pool, meta, meta_len, num_seqs, heads, head_dim, block_size, num_blocks);        \
    }                                                                                                                 \
    extern "C" __global__ void write_kv_##NAME(T *pool, const T *new_kv, const uint32_t *slots, uint32_t heads,      \
                                               uint32_t head_dim, uint32_t block_size, uint32_t num_blocks) {        \
        write_kv<T>(pool, new_kv, slots, heads, head_dim, block_size, num_blocks);                                    \
    }

PAGED_KERNELS(f32, float)
PAGED_KERNELS(f16, __half)
PAGED_KERNELS(bf16, __nv_bfloat16)
