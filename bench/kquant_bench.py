"""Benchmark the numpy K-quant quantizers (qconvert.convert.kquants).

Single-threaded throughput (Mparam/s per core) and relative error
||deq - x|| / ||x|| for Q2_K..Q6_K on a seeded Gaussian float32 matrix, next to
gguf-py's own Q8_0 and Q4_0 quantizers measured in the same run.  Prints a
table and writes JSON (default: bench/kquant_bench.json).

    python bench/kquant_bench.py                 # 4096 x 4096, best of 3
    python bench/kquant_bench.py --rows 1024 --reps 5
    python bench/kquant_bench.py --ggml-lib /path/libggml-quants.so   # + ggml's C reference

Throughput uses the best (minimum) time of --reps runs; both wall-clock and
process CPU time are reported (CPU time is less disturbed by other processes
on a shared machine).
"""

from __future__ import annotations

import os

# one thread everywhere, before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qconvert.convert.kquants import CHUNK_BLOCKS, quantize_kquant  # noqa: E402

Q = GGMLQuantizationType
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
GGUF_TYPES = [Q.Q8_0, Q.Q4_0]
GGML_TYPICAL_GAUSS = {Q.Q6_K: 0.018, Q.Q5_K: 0.036, Q.Q4_K: 0.071, Q.Q3_K: 0.15, Q.Q2_K: 0.30}


def machine_facts() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gguf": metadata.version("gguf"),
        "platform": platform.platform(),
        "threads": 1,
    }
    try:
        facts["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return facts


def time_fn(fn, x: np.ndarray, reps: int) -> tuple[np.ndarray, float, float]:
    """Best wall and CPU seconds over `reps` runs (one untimed warm-up on a slice)."""
    fn(x[: max(1, x.shape[0] // 64)])
    best_wall = best_cpu = float("inf")
    out = None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(x)
        w1, c1 = time.perf_counter(), time.process_time()
        best_wall, best_cpu = min(best_wall, w1 - w0), min(best_cpu, c1 - c0)
    return out, best_wall, best_cpu


def ggml_c_quantizer(lib_path: str):
    """quantize_row_q*_K_ref from a shared library built from ggml-quants.c (optional)."""
    lib = ctypes.CDLL(lib_path)

    def make(qtype):
        name = f"quantize_row_{qtype.name[:-1].lower()}K_ref" if qtype.name.endswith("_K") \
            else f"quantize_row_{qtype.name.lower()}_ref"
        fn = getattr(lib, name)
        type_size = GGML_QUANT_SIZES[qtype][1]

        def run(x):
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty((*x.shape[:-1], x.shape[-1] // 256 * type_size), dtype=np.uint8)
            fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
            return out
        return run
    return make


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096, help="multiple of 256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("kquant_bench.json"))
    ap.add_argument("--ggml-lib", default=None,
                    help="optional shared library exporting ggml's quantize_row_q*_K_ref, for comparison")
    args = ap.parse_args(argv)

    x = np.random.default_rng(args.seed).standard_normal((args.rows, args.cols), dtype=np.float32)
    n = x.size
    x_norm = float(np.linalg.norm(x))
    results = {}

    def record(key, qtype, fn, impl):
        q, wall, cpu = time_fn(fn, x, args.reps)
        err = float(np.linalg.norm(quants.dequantize(q, qtype) - x) / x_norm)
        results[key] = {
            "impl": impl,
            "qtype": qtype.name,
            "bits_per_weight": GGML_QUANT_SIZES[qtype][1] * 8 / GGML_QUANT_SIZES[qtype][0],
            "mparam_per_s": round(n / wall / 1e6, 2),
            "mparam_per_s_cpu": round(n / cpu / 1e6, 2),
            "best_wall_s": round(wall, 4),
            "rel_err": round(err, 5),
        }
        if qtype in GGML_TYPICAL_GAUSS:
            results[key]["ggml_typical_rel_err"] = GGML_TYPICAL_GAUSS[qtype]
        r = results[key]
        print(f"{key:14s} {r['mparam_per_s']:8.2f} {r['mparam_per_s_cpu']:8.2f} {r['rel_err']:9.5f}"
              f"  {r.get('ggml_typical_rel_err', ''):>6}", flush=True)

    facts = machine_facts()
    print(f"# {facts['cpu_model']} | numpy {facts['numpy']} | gguf {facts['gguf']} | "
          f"{args.rows}x{args.cols} float32 Gaussian, 1 thread, best of {args.reps}")
    print(f"{'type':14s} {'Mparam/s':>8s} {'(cpu)':>8s} {'rel_err':>9s}  {'ggml':>6s}")
    for qt in GGUF_TYPES:
        record(f"{qt.name} gguf-py", qt, lambda a, qt=qt: quants.quantize(a, qt), "gguf-py")
    for qt in K_TYPES:
        record(qt.name, qt, lambda a, qt=qt: quantize_kquant(a, qt), "qconvert.kquants (numpy)")
    if args.ggml_lib:
        make = ggml_c_quantizer(args.ggml_lib)
        for qt in K_TYPES:
            record(f"{qt.name} ggml-C", qt, make(qt), f"ggml C reference ({args.ggml_lib})")

    payload = {
        "machine": facts,
        "matrix": {"rows": args.rows, "cols": args.cols, "dtype": "float32",
                   "distribution": "standard normal", "seed": args.seed},
        "reps": args.reps,
        "chunk_blocks": CHUNK_BLOCKS,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
