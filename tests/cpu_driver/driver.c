/*
 * A command-line driver for one rendered sae-tune CPU kernel, linked with it into a static executable
 * (tests/test_cpu_portability.py cross-compiles both for aarch64 and runs them under qemu-aarch64).
 * Inputs are raw binary files written by the test; outputs are raw binary files it reads back.
 *
 *   driver decode B F D ars acs wrs wcs bs out_size threads acts W bias|- out
 *       out (B x D, contiguous, out_size bytes each) = the decode kernel's result
 *   driver encode B F chunk cap threads pre thr|- prefix
 *       the encode kernels over a (B x F) pre-activation matrix in chunks of `chunk` features, each
 *       chunk scanned into at most `cap` slots (a second, exact pass when they are too few) as
 *       targets/cpu/encode.py does, then the CSR assembled: prefix.offsets (B + 1 int64), prefix.idx
 *       (int64), prefix.val (raw bits) and prefix.status (one int32 scan status per chunk; a chunk whose
 *       status is 1, NaN or Inf, contributes nothing here: the product takes torch's expression for it)
 *
 * Only the entry points of the kernel it is linked with exist; the others are weak and null.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const char *sae_tune_kernel_name(void);
extern int sae_tune_openmp(void);
extern int sae_tune_decode(int64_t B, int64_t F, int64_t D, const void *acts, int64_t ars, int64_t acs,
                           const void *W, int64_t wrs, int64_t wcs, const void *bias, int64_t bs, void *out,
                           int64_t ors, int32_t nthreads) __attribute__((weak));
extern int32_t sae_tune_encode_scan(int64_t B, int64_t n, int64_t s, const void *pre, int64_t ld,
                                    const float *thr, int64_t *counts, int64_t *starts, int64_t *idx,
                                    void *val, int64_t cap, int64_t *total, int32_t nthreads)
    __attribute__((weak));
extern void sae_tune_encode_write(int64_t B, int64_t n, int64_t s, const void *pre, int64_t ld,
                                  const float *thr, const int64_t *starts, int64_t *idx, void *val,
                                  int32_t nthreads) __attribute__((weak));
extern void sae_tune_encode_assemble(int64_t B, int64_t n_chunks, const int64_t *counts, const int64_t *starts,
                                     const int64_t *idx_ptrs, const int64_t *val_ptrs, int64_t *offsets,
                                     int64_t *idx, void *val, int32_t nthreads) __attribute__((weak));

static void die(const char *what)
{
    fprintf(stderr, "driver: %s\n", what);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void *read_file(const char *path, size_t *size)
{
    if (strcmp(path, "-") == 0) {
        *size = 0;
        return NULL;
    }
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *data = xmalloc((size_t)n);
    if (n && fread(data, 1, (size_t)n, f) != (size_t)n)
        die(path);
    fclose(f);
    *size = (size_t)n;
    return data;
}

static void write_file(const char *prefix, const char *suffix, const void *data, size_t n)
{
    char path[4096];
    snprintf(path, sizeof path, "%s%s", prefix, suffix);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n))
        die(path);
    fclose(f);
}

static int64_t arg(char **argv, int i) { return strtoll(argv[i], NULL, 10); }

static int decode(int argc, char **argv)
{
    if (argc != 16 || !sae_tune_decode)
        die("usage: decode B F D ars acs wrs wcs bs out_size threads acts W bias|- out (a decode kernel)");
    const int64_t B = arg(argv, 2), F = arg(argv, 3), D = arg(argv, 4);
    size_t n;
    const void *acts = read_file(argv[12], &n), *W = read_file(argv[13], &n), *bias = read_file(argv[14], &n);
    const size_t out_bytes = (size_t)(B * D * arg(argv, 10));
    void *out = xmalloc(out_bytes);
    int rc = sae_tune_decode(B, F, D, acts, arg(argv, 5), arg(argv, 6), W, arg(argv, 7), arg(argv, 8), bias,
                             arg(argv, 9), out, D, (int32_t)arg(argv, 11));
    if (rc != 0)
        die("the decode kernel failed");
    write_file(argv[15], "", out, out_bytes);
    return 0;
}

static int encode(int argc, char **argv)
{
    if (argc != 10 || !sae_tune_encode_scan || !sae_tune_encode_write || !sae_tune_encode_assemble)
        die("usage: encode B F chunk cap threads pre thr|- prefix (the encode kernels)");
    const int64_t B = arg(argv, 2), F = arg(argv, 3), chunk = arg(argv, 4), cap_arg = arg(argv, 5);
    const int32_t threads = (int32_t)arg(argv, 6);
    size_t pre_size, thr_size;
    const char *pre = read_file(argv[7], &pre_size);
    const float *thr = read_file(argv[8], &thr_size);
    if (B < 1 || F < 1 || chunk < 1 || pre_size % (size_t)(B * F))
        die("pre must hold B x F values");
    const size_t es = pre_size / (size_t)(B * F);
    const int64_t n_chunks = (F + chunk - 1) / chunk;
    int64_t *counts = xmalloc(sizeof(int64_t) * (size_t)(n_chunks * B));
    int64_t *starts = xmalloc(sizeof(int64_t) * (size_t)(n_chunks * B));
    int64_t *idx_ptrs = xmalloc(sizeof(int64_t) * (size_t)n_chunks);
    int64_t *val_ptrs = xmalloc(sizeof(int64_t) * (size_t)n_chunks);
    int32_t *status = xmalloc(sizeof(int32_t) * (size_t)n_chunks);
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t s = c * chunk, n = s + chunk < F ? chunk : F - s;
        const int64_t cap = cap_arg < B * n ? cap_arg : B * n;
        int64_t *cnt = counts + c * B, *first = starts + c * B, total = 0;
        int64_t *idx = xmalloc(sizeof(int64_t) * (size_t)cap);
        char *val = xmalloc(es * (size_t)cap);
        const float *t = thr ? thr + s : NULL;
        status[c] = sae_tune_encode_scan(B, n, s, pre + (size_t)s * es, F, t, cnt, first, idx, val, cap, &total,
                                         threads);
        if (status[c] == 1) { /* NaN or Inf: the product takes torch's expression for this chunk */
            memset(cnt, 0, sizeof(int64_t) * (size_t)B);
            memset(first, 0, sizeof(int64_t) * (size_t)B);
        } else if (status[c] == 2) { /* too few slots: exact offsets from the counts, a second pass */
            int64_t o = 0;
            for (int64_t r = 0; r < B; r++) {
                first[r] = o;
                o += cnt[r];
            }
            if (o != total)
                die("the scan's total is not the sum of its counts");
            free(idx);
            free(val);
            idx = xmalloc(sizeof(int64_t) * (size_t)total);
            val = xmalloc(es * (size_t)total);
            sae_tune_encode_write(B, n, s, pre + (size_t)s * es, F, t, first, idx, val, threads);
        } else if (status[c] != 0) {
            die("unknown scan status");
        }
        idx_ptrs[c] = (int64_t)(intptr_t)idx;
        val_ptrs[c] = (int64_t)(intptr_t)val;
    }
    int64_t nnz = 0;
    for (int64_t i = 0; i < n_chunks * B; i++)
        nnz += counts[i];
    int64_t *offsets = xmalloc(sizeof(int64_t) * (size_t)(B + 1));
    int64_t *idx = xmalloc(sizeof(int64_t) * (size_t)nnz);
    char *val = xmalloc(es * (size_t)nnz);
    sae_tune_encode_assemble(B, n_chunks, counts, starts, idx_ptrs, val_ptrs, offsets, idx, val, threads);
    write_file(argv[9], ".offsets", offsets, sizeof(int64_t) * (size_t)(B + 1));
    write_file(argv[9], ".idx", idx, sizeof(int64_t) * (size_t)nnz);
    write_file(argv[9], ".val", val, es * (size_t)nnz);
    write_file(argv[9], ".status", status, sizeof(int32_t) * (size_t)n_chunks);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "decode") == 0)
        return decode(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "encode") == 0)
        return encode(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "name") == 0) {
        printf("%s openmp=%d\n", sae_tune_kernel_name(), sae_tune_openmp());
        return 0;
    }
    die("usage: driver decode|encode|name ...");
    return 2;
}
