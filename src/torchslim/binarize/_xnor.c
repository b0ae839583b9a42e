/* torchslim's XNOR-popcount kernel: the C side of torchslim/binarize/_ckernel.py.

   One file, two builds:
   - at install time (setup.py), as the CPython extension module torchslim.binarize._xnor
     (TORCHSLIM_XNOR_EXTENSION defined: a module with no Python functions, loaded with ctypes);
   - on first use, when no installed object fits, as a plain shared object in the user's cache.
   The loader compares the build keys below with the running source and CPU before it calls
   anything, so an object built from other source or with -march=native for another CPU is never
   used. */

#ifdef TORCHSLIM_XNOR_EXTENSION
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stdint.h>

#ifndef TORCHSLIM_XNOR_SOURCE_KEY
#define TORCHSLIM_XNOR_SOURCE_KEY ""
#endif
#ifndef TORCHSLIM_XNOR_CPU_KEY
#define TORCHSLIM_XNOR_CPU_KEY ""
#endif

/* Hash of this file's text the object was built from ("" when not recorded). */
const char *torchslim_xnor_source_key(void) { return TORCHSLIM_XNOR_SOURCE_KEY; }

/* Hash of the CPU feature flags it was tuned for with -march=native ("portable": any CPU). */
const char *torchslim_xnor_cpu_key(void) { return TORCHSLIM_XNOR_CPU_KEY; }

/* out[m, n] = kvalid[m] - 2 * popcount((a[m] ^ b[n]) & mask[m]) over W 64-bit words:
   the dot product of two rows of +-1 entries (bit 1 = +1) whose valid entries the mask marks
   (no mask: all k entries are valid and kvalid[m] = k). Row m uses mask row m % mrows. Rows of
   b are tiled so that a tile stays in cache while every row of a passes over it; rows of a run
   in parallel. */
#define NT 64
void xnor_gemm(const uint64_t *a, const uint64_t *b, const uint64_t *mask, const int32_t *kvalid,
               int64_t mrows, int32_t k, int64_t M, int64_t N, int64_t W, int32_t *out, int nthreads) {
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
        int64_t n1 = n0 + NT < N ? n0 + NT : N;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const uint64_t *ar = a + m * W;
            int32_t kv = kvalid ? kvalid[m % mrows] : k;
            if (mask) {
                const uint64_t *mr = mask + (m % mrows) * W;
                for (int64_t n = n0; n < n1; ++n) {
                    const uint64_t *br = b + n * W;
                    int64_t acc = 0;
                    for (int64_t w = 0; w < W; ++w) acc += __builtin_popcountll((ar[w] ^ br[w]) & mr[w]);
                    out[m * N + n] = kv - 2 * (int32_t)acc;
                }
            } else {
                for (int64_t n = n0; n < n1; ++n) {
                    const uint64_t *br = b + n * W;
                    int64_t acc = 0;
                    for (int64_t w = 0; w < W; ++w) acc += __builtin_popcountll(ar[w] ^ br[w]);
                    out[m * N + n] = kv - 2 * (int32_t)acc;
                }
            }
        }
    }
}

/* Pack the signs of rows of k floats, 64 to a word, bit j of word w = entry 64 w + j >= 0. */
void pack_f32(const float *x, int64_t rows, int64_t k, uint64_t *out, int nthreads) {
    int64_t W = (k + 63) / 64;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * k;
        uint64_t *o = out + r * W;
        for (int64_t w = 0; w < W; ++w) {
            int64_t base = w * 64, end = base + 64 < k ? base + 64 : k;
            uint64_t word = 0;
            for (int64_t j = base; j < end; ++j) word |= (uint64_t)(xr[j] >= 0.0f) << (j - base);
            o[w] = word;
        }
    }
}

#ifdef TORCHSLIM_XNOR_EXTENSION
static struct PyModuleDef xnor_module = {
    PyModuleDef_HEAD_INIT, "_xnor",
    "torchslim's XNOR-popcount kernel; its C functions are called through ctypes "
    "(see torchslim.binarize._ckernel).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xnor(void) { return PyModule_Create(&xnor_module); }
#endif
