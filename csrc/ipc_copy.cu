// cuda_ipc: copy rows of (src, dst, len) device to device, one row per blockIdx.y;
// 16-byte vectors when both ends are aligned, bytes otherwise. Built at run time by
// transports/_cuda_ipc_device.py with cupy.RawKernel (name pdfabric_ipc_copy).
#define THREADS 512
#define UNROLL 8
#define CHUNK_VEC (THREADS * UNROLL)
typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(THREADS)
pdfabric_ipc_copy(const u64* __restrict__ rows, unsigned int first)
{
    const u64* row = rows + 3ull * ((u64)first + blockIdx.y);
    const char* src = (const char*)row[0];
    char* dst = (char*)row[1];
    const u64 len = row[2];
    const u64 t = threadIdx.x;
    const u64 bstride = (u64)gridDim.x * THREADS;
    u64 tail = 0;
    if ((((u64)src | (u64)dst) & 15ull) == 0) {
        const uint4* __restrict__ s = (const uint4*)src;
        uint4* __restrict__ d = (uint4*)dst;
        const u64 nvec = len >> 4;
        for (u64 c = (u64)blockIdx.x * CHUNK_VEC; c < nvec; c += (u64)gridDim.x * CHUNK_VEC) {
            uint4 v[UNROLL];
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) {
                const u64 i = c + (u64)k * THREADS + t;
                if (i < nvec) v[k] = s[i];
            }
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) {
                const u64 i = c + (u64)k * THREADS + t;
                if (i < nvec) d[i] = v[k];
            }
        }
        tail = nvec << 4;
    }
    for (u64 b = tail + (u64)blockIdx.x * THREADS + t; b < len; b += bstride)
        dst[b] = src[b];
}
