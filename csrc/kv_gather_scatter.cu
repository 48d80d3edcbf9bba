// kv_gather_scatter.cu - move one request's KV blocks, across all layers, between a paged
// KV cache on the GPU and one contiguous staging buffer, in a single launch.
//
// Built at run time by pdfabric.kernels (cupy.RawModule through NVRTC, options in
// pdfabric/kernels/cuda.py) and compile-checked by nvcc in the unit tests. It includes no
// header: NVRTC has none, and uint4 is built in.
//
// Geometry, in bytes. Every layer tensor is viewed as [outer][num_blocks][inner_bytes]
// (outer = 2 for the flash-attn K/V planes, 1 otherwise). Copy c, for c in
// 0 .. n_layers*outer*n_ids - 1, is (layer, o, j) with c = (layer*outer + o)*n_ids + j:
//
//     cache side    layer_ptrs[layer] + (o*num_blocks + ids[j]) * inner_bytes
//     staging side  staging + c * inner_bytes
//
// Each copy is cut into chunks of chunk_bytes (a multiple of 16); a CTA moves one chunk
// per step of a grid-stride loop over n_work = n_copies * chunks_per_copy. A chunk moves as
// 16-byte vectors, KV_UNROLL loads in flight per thread, when both of its ends are 16-byte
// aligned, and a byte at a time otherwise (plus a byte-wise tail when its length is not a
// multiple of 16). The caller checks ids against num_blocks; the kernel trusts them.
// No shared memory and no __syncthreads: threads are independent, so the unit tests can
// run this file's code on the CPU, one thread after another.

#define KV_THREADS 256
#define KV_UNROLL 4

typedef unsigned long long kv_u64;
typedef long long kv_i64;
typedef unsigned char kv_byte;

__device__ __forceinline__ void kv_copy_chunk(kv_byte* __restrict__ dst,
                                              const kv_byte* __restrict__ src, kv_i64 len)
{
    const kv_i64 tid = (kv_i64)threadIdx.x;
    const kv_i64 step = (kv_i64)blockDim.x;
    kv_i64 done = 0;
    if ((((kv_u64)dst | (kv_u64)src) & 15ull) == 0ull) {
        const kv_i64 n16 = len >> 4;
        const uint4* __restrict__ s = (const uint4*)src;
        uint4* __restrict__ d = (uint4*)dst;
        kv_i64 i = tid;
        for (; i + (KV_UNROLL - 1) * step < n16; i += KV_UNROLL * step) {
            uint4 r[KV_UNROLL];
#pragma unroll
            for (int u = 0; u < KV_UNROLL; ++u) r[u] = s[i + u * step];
#pragma unroll
            for (int u = 0; u < KV_UNROLL; ++u) d[i + u * step] = r[u];
        }
        for (; i < n16; i += step) d[i] = s[i];
        done = n16 << 4;
    }
    for (kv_i64 b = done + tid; b < len; b += step) dst[b] = src[b];
}

template <bool kGather>
__device__ __forceinline__ void kv_blocks(const kv_u64* __restrict__ layer_ptrs, int outer,
                                          kv_i64 num_blocks, kv_i64 inner_bytes,
                                          const kv_i64* __restrict__ ids, kv_i64 n_ids,
                                          kv_byte* staging, kv_i64 chunk_bytes, kv_i64 n_work)
{
    const kv_i64 chunks = (inner_bytes + chunk_bytes - 1) / chunk_bytes;
    for (kv_i64 w = (kv_i64)blockIdx.x; w < n_work; w += (kv_i64)gridDim.x) {
        const kv_i64 c = w / chunks;
        const kv_i64 off = (w - c * chunks) * chunk_bytes;
        const kv_i64 j = c % n_ids;
        const kv_i64 lo = c / n_ids;  // layer * outer + o
        const kv_i64 o = lo % outer;
        const kv_i64 layer = lo / outer;
        kv_byte* cache = (kv_byte*)layer_ptrs[layer] + (o * num_blocks + ids[j]) * inner_bytes + off;
        kv_byte* stage = staging + c * inner_bytes + off;
        const kv_i64 rest = inner_bytes - off;
        const kv_i64 len = rest < chunk_bytes ? rest : chunk_bytes;
        if (kGather) {
            kv_copy_chunk(stage, cache, len);
        } else {
            kv_copy_chunk(cache, stage, len);
        }
    }
}

// staging[c] = cache[layer][o][ids[j]] for every copy c = (layer, o, j)
extern "C" __global__ void __launch_bounds__(KV_THREADS)
kv_gather(const kv_u64* __restrict__ layer_ptrs, int outer, kv_i64 num_blocks, kv_i64 inner_bytes,
          const kv_i64* __restrict__ ids, kv_i64 n_ids, kv_byte* staging, kv_i64 chunk_bytes,
          kv_i64 n_work)
{
    kv_blocks<true>(layer_ptrs, outer, num_blocks, inner_bytes, ids, n_ids, staging, chunk_bytes,
                    n_work);
}

// cache[layer][o][ids[j]] = staging[c]; with a repeated id, which copy lands is unspecified
extern "C" __global__ void __launch_bounds__(KV_THREADS)
kv_scatter(const kv_u64* __restrict__ layer_ptrs, int outer, kv_i64 num_blocks, kv_i64 inner_bytes,
           const kv_i64* __restrict__ ids, kv_i64 n_ids, kv_byte* staging, kv_i64 chunk_bytes,
           kv_i64 n_work)
{
    kv_blocks<false>(layer_ptrs, outer, num_blocks, inner_bytes, ids, n_ids, staging, chunk_bytes,
                     n_work);
}
