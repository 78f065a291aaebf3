// Stand-ins for the ggml.c functions ggml-quants.c links against (type sizes only), so that
// bench/make_weighted_golden.py can build ggml-quants.c alone as a shared object.
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include "ggml.h"
static size_t tsize(enum ggml_type t, int64_t *blck) {
    switch (t) {
        case GGML_TYPE_Q4_0: *blck = 32; return 18;
        case GGML_TYPE_Q4_1: *blck = 32; return 20;
        case GGML_TYPE_Q5_0: *blck = 32; return 22;
        case GGML_TYPE_Q5_1: *blck = 32; return 24;
        case GGML_TYPE_Q8_0: *blck = 32; return 34;
        case GGML_TYPE_Q2_K: *blck = 256; return 84;
        case GGML_TYPE_Q3_K: *blck = 256; return 110;
        case GGML_TYPE_Q4_K: *blck = 256; return 144;
        case GGML_TYPE_Q5_K: *blck = 256; return 176;
        case GGML_TYPE_Q6_K: *blck = 256; return 210;
        default: fprintf(stderr, "shim: type %d\n", (int)t); abort();
    }
}
size_t ggml_type_size(enum ggml_type t) { int64_t b; return tsize(t, &b); }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { int64_t b; size_t s = tsize(t, &b); return s * ne / b; }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "ggml_abort %s:%d %s\n", file, line, fmt); abort(); }
