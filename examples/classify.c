/* classify.c: run a net compiled by graphc from C and print the top classes.
 *
 * Build (net.so and net.h from `graphc compile NET.prototxt --weights W -o net.so`):
 *
 *     cc -O2 -I. examples/classify.c ./net.so -Wl,-rpath,'$ORIGIN' -o classify
 *
 * Run:
 *     ./classify [input.npy | input.f32] [--threads N] [--top K] [--check-errors]
 *
 * The input is a float32 .npy file (C order) or raw little-endian float32 values, with
 * as many values as the net's first input has (GRAPHC_INPUT0_NUMEL); without a file a
 * fixed pattern is used.  For each item of the batch it prints the K highest scores of
 * the net's first output.  --check-errors also feeds the API wrong names, shapes,
 * dtypes and NULL pointers and checks that each gives its error code and a message
 * (exit status 1 if one does not).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net.h"

static float *read_input(const char *path, int64_t numel) {
    FILE *f = fopen(path, "rb");
    float *data;
    long size;
    size_t skip = 0;
    unsigned char magic[10];
    if (!f) {
        perror(path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size >= 10 && fread(magic, 1, 10, f) == 10 && memcmp(magic, "\x93NUMPY", 6) == 0) {
        /* .npy: magic, version, header length, an ASCII header, then the data */
        size_t hlen = magic[6] == 1 ? (size_t)(magic[8] | magic[9] << 8) : 0;
        if (magic[6] != 1) {
            fprintf(stderr, "%s: only .npy version 1 files are read\n", path);
            fclose(f);
            return NULL;
        }
        char *header = calloc(1, hlen + 1);
        if (!header || fread(header, 1, hlen, f) != hlen || !strstr(header, "'<f4'") ||
            strstr(header, "'fortran_order': True")) {
            fprintf(stderr, "%s: expected a C-order float32 (<f4) array\n", path);
            free(header);
            fclose(f);
            return NULL;
        }
        free(header);
        skip = 10 + hlen;
    }
    if ((size_t)size - skip != (size_t)numel * sizeof(float)) {
        fprintf(stderr, "%s: holds %ld bytes of data, the net's input needs %lld floats "
                "(%lld bytes)\n", path, (long)(size - (long)skip), (long long)numel,
                (long long)numel * 4);
        fclose(f);
        return NULL;
    }
    data = malloc((size_t)numel * sizeof(float));
    fseek(f, (long)skip, SEEK_SET);
    if (!data || fread(data, sizeof(float), (size_t)numel, f) != (size_t)numel) {
        fprintf(stderr, "%s: read error\n", path);
        free(data);
        data = NULL;
    }
    fclose(f);
    return data;
}

static int expect(int got, int want, const char *what, graphc_ctx *ctx) {
    const char *msg = graphc_error_message(ctx);
    if (got != want || !msg || !*msg) {
        fprintf(stderr, "FAIL %s: status %d (want %d), message '%s'\n", what, got, want,
                msg ? msg : "(null)");
        return 1;
    }
    printf("ok   %-28s -> %d: %s\n", what, got, msg);
    return 0;
}

/* Wrong inputs give an error code and a message, never a crash. */
static int check_errors(graphc_ctx *ctx, const float *data) {
    int64_t shape[] = GRAPHC_INPUT0_SHAPE, bad[] = GRAPHC_INPUT0_SHAPE;
    float out[1];
    int fails = 0;
    bad[0] += 1;
    fails += expect(graphc_set_input(ctx, "no_such_blob", GRAPHC_F32, data, shape,
                                     GRAPHC_INPUT0_NDIM), GRAPHC_ERR_NAME, "unknown input name", ctx);
    fails += expect(graphc_set_input(ctx, GRAPHC_INPUT0_NAME, GRAPHC_F32, data, bad,
                                     GRAPHC_INPUT0_NDIM), GRAPHC_ERR_SHAPE, "wrong shape", ctx);
    fails += expect(graphc_set_input(ctx, GRAPHC_INPUT0_NAME, GRAPHC_F32, data, shape,
                                     GRAPHC_INPUT0_NDIM - 1), GRAPHC_ERR_SHAPE, "wrong rank", ctx);
    fails += expect(graphc_set_input(ctx, GRAPHC_INPUT0_NAME, 7, data, shape,
                                     GRAPHC_INPUT0_NDIM), GRAPHC_ERR_DTYPE, "wrong dtype", ctx);
    fails += expect(graphc_set_input(ctx, GRAPHC_INPUT0_NAME, GRAPHC_F32, NULL, shape,
                                     GRAPHC_INPUT0_NDIM), GRAPHC_ERR_ARGUMENT, "NULL data", ctx);
    fails += expect(graphc_set_input(ctx, NULL, GRAPHC_F32, data, shape, GRAPHC_INPUT0_NDIM),
                    GRAPHC_ERR_ARGUMENT, "NULL name", ctx);
    fails += expect(graphc_set_input(NULL, GRAPHC_INPUT0_NAME, GRAPHC_F32, data, shape,
                                     GRAPHC_INPUT0_NDIM), GRAPHC_ERR_ARGUMENT, "NULL context", NULL);
    fails += expect(graphc_get_output(ctx, GRAPHC_OUTPUT0_NAME, GRAPHC_F32, out, 1),
                    GRAPHC_OUTPUT0_NUMEL > 1 ? GRAPHC_ERR_SHAPE : GRAPHC_ERR_STATE,
                    "output buffer too small", ctx);
    fails += expect(graphc_get_output(ctx, "nope", GRAPHC_F32, out, 1), GRAPHC_ERR_NAME,
                    "unknown output name", ctx);
    fails += expect(graphc_run(NULL), GRAPHC_ERR_ARGUMENT, "run without a context", NULL);
    return fails;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int threads = 0, top = 5, errors = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--top") && i + 1 < argc) top = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--check-errors")) errors = 1;
        else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: %s [input.npy|input.f32] [--threads N] [--top K] "
                    "[--check-errors]\n", argv[0]);
            return 2;
        } else path = argv[i];
    }

    int64_t numel = GRAPHC_INPUT0_NUMEL;
    float *input;
    if (path) {
        if (!(input = read_input(path, numel))) return 1;
    } else {
        input = malloc((size_t)numel * sizeof(float));
        for (int64_t i = 0; input && i < numel; i++) input[i] = (float)((i * 7919) % 255) / 255.0f - 0.5f;
    }
    if (!input) return 1;

    graphc_ctx *ctx;
    if (graphc_create_ex(&ctx, threads, NULL) != GRAPHC_OK) {
        fprintf(stderr, "graphc_create: %s\n", graphc_error_message(NULL));
        return 1;
    }
    int fails = errors ? check_errors(ctx, input) : 0;

    int64_t shape[] = GRAPHC_INPUT0_SHAPE;
    int64_t out_numel = GRAPHC_OUTPUT0_NUMEL, out_shape[] = GRAPHC_OUTPUT0_SHAPE;
    float *scores = malloc((size_t)out_numel * sizeof(float));
    if (!scores ||
        graphc_set_input(ctx, GRAPHC_INPUT0_NAME, GRAPHC_F32, input, shape, GRAPHC_INPUT0_NDIM) ||
        graphc_run(ctx) ||
        graphc_get_output(ctx, GRAPHC_OUTPUT0_NAME, GRAPHC_F32, scores, out_numel)) {
        fprintf(stderr, "%s\n", graphc_error_message(ctx));
        graphc_destroy(ctx);
        return 1;
    }

    int64_t batch = out_shape[0], classes = out_numel / batch;
    printf("net %s, %d thread(s), output '%s'\n", graphc_net_name(), graphc_num_threads(ctx),
           GRAPHC_OUTPUT0_NAME);
    for (int64_t n = 0; n < batch; n++) {
        const float *s = scores + n * classes;
        printf("item %lld:", (long long)n);
        /* the top K by partial selection sort of the class indices */
        int64_t *idx = malloc((size_t)classes * sizeof *idx);
        for (int64_t c = 0; c < classes; c++) idx[c] = c;
        for (int k = 0; k < top && k < classes; k++) {
            int64_t m = k;
            for (int64_t c = k + 1; c < classes; c++)
                if (s[idx[c]] > s[idx[m]]) m = c;
            int64_t t = idx[k]; idx[k] = idx[m]; idx[m] = t;
            printf(" %lld (%.4f)", (long long)idx[k], s[idx[k]]);
        }
        printf("\n");
        free(idx);
    }
    free(scores);
    free(input);
    graphc_destroy(ctx);
    return fails ? 1 : 0;
}
