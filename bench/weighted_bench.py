"""ggml's weighted search (qconvert's default) against its reference path, per GGUF type.

One thread, a seeded Gaussian float32 matrix (default 4096 x 4096): relative error
||deq - x|| / ||x|| and throughput (Mparam/s, wall and process CPU time, best of --reps) of

* ``reference``: what ``gguf_search = "reference"`` writes (gguf-py's Q4_0..Q5_1, kquants'
  Q2_K..Q6_K: ggml's ``quantize_row_*_ref`` bytes),
* ``weighted``: qconvert.convert.ggml_weighted with all-ones weights (the default; its
  compiled loops, convert/ggml_jit.py, where numba is installed),
* ``weighted_numpy``: the same search on the numpy path (no numba), and whether its bytes equal,
* with ``--ggml-lib``: ggml's own C ``quantize_<type>(..., all-ones)`` on the same machine,
  and whether its bytes equal qconvert's on the whole matrix.

    python bench/weighted_bench.py [--rows 4096 --cols 4096 --reps 2] [--ggml-lib libggml-quants.so]

Writes bench/weighted_bench.json (machine facts included).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType, quants  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from kquant_bench import machine_facts, time_fn  # noqa: E402

from qconvert.convert.ggml_weighted import WEIGHTED_TYPES, quantize_weighted  # noqa: E402
from qconvert.convert.kquants import quantize_kquant  # noqa: E402

Q = GGMLQuantizationType


def reference(qtype: str):
    if qtype.endswith("_K"):
        return lambda x: quantize_kquant(x, Q[qtype])
    return lambda x: quants.quantize(x, Q[qtype])


def numpy_path(fn, *args):
    """Call fn with ggml_jit's compiled loops switched off."""
    from qconvert.convert import ggml_jit

    names = ("qkx3_search", "make_qp_search", "make_qx_search", "k_prologue")
    saved = [getattr(ggml_jit, n) for n in names]
    for n in names:
        setattr(ggml_jit, n, None)
    try:
        return fn(*args)
    finally:
        for n, v in zip(names, saved):
            setattr(ggml_jit, n, v)


def measure(name: str, fn, x: np.ndarray, qtype: str, reps: int) -> dict:
    out, wall, cpu = time_fn(fn, x, reps)
    err = float(np.linalg.norm(quants.dequantize(out, Q[qtype]) - x) / np.linalg.norm(x))
    row = {"rel_error": round(err, 5), "mparam_s_wall": round(x.size / wall / 1e6, 1),
           "mparam_s_cpu": round(x.size / cpu / 1e6, 1)}  # fmt: skip
    print(f"{qtype:5s} {name:9s} err {err:.5f}  {row['mparam_s_wall']:6.1f} Mparam/s wall  "
          f"{row['mparam_s_cpu']:6.1f} cpu", flush=True)
    return row, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--types", default=",".join(WEIGHTED_TYPES))
    ap.add_argument("--ggml-lib", default=None, help="ggml-quants.c as a shared object (bench/make_weighted_golden.py)")
    ap.add_argument("--ggml-commit", default=None)
    ap.add_argument("--out", type=Path, default=HERE / "weighted_bench.json")
    a = ap.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((a.rows, a.cols), dtype=np.float32)
    run_c = None
    if a.ggml_lib:
        from make_weighted_golden import ggml_weighted

        run_c = ggml_weighted(a.ggml_lib)
    results = {}
    for qtype in a.types.split(","):
        res = {}
        res["reference"], _ = measure("reference", reference(qtype), x, qtype, a.reps)
        res["weighted"], ours = measure("weighted", lambda v: quantize_weighted(v, qtype), x, qtype, a.reps)
        res["weighted_numpy"], plain = measure("w. numpy", lambda v: numpy_path(quantize_weighted, v, qtype), x, qtype, a.reps)
        res["bytes_equal_numpy"] = bool(np.array_equal(plain, ours))
        if run_c is not None:
            res["ggml_c_weighted"], theirs = measure("ggml C", lambda v: run_c(qtype, v), x, qtype, a.reps)
            res["bytes_equal_ggml"] = bool(np.array_equal(theirs.reshape(-1), ours.reshape(-1)))
        res["error_ratio"] = round(res["weighted"]["rel_error"] / res["reference"]["rel_error"], 4)
        results[qtype] = res
    doc = {"machine": machine_facts(), "shape": [a.rows, a.cols], "reps": a.reps,
           "ggml_commit": a.ggml_commit, "results": results}  # fmt: skip
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
