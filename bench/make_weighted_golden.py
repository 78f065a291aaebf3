"""Write tests/data/ggml_weighted.json: ggml's weighted-search bytes for fixed inputs.

    python bench/make_weighted_golden.py --ggml-src /path/to/ggml --ggml-commit SHA
    python bench/make_weighted_golden.py --ggml-lib /path/libggml-quants.so --ggml-commit SHA

The library is ggml's ``src/ggml-quants.c`` built as a shared object together with
bench/ggml_shim.c, which stands in for the four ggml.c functions it links against
(ggml_row_size, ggml_type_size, ggml_type_name, ggml_abort); ``--ggml-src`` (a ggml checkout:
``include/``, ``src/``) builds it with :data:`BUILD` (x86-64 baseline ``-O2``: no FMA
contraction, so float32 arithmetic is plain IEEE, which numpy reproduces). Every case calls ``quantize_<type>(src, dst, nrow,
n_per_row, quant_weights)`` with ``quant_weights`` = all ones, which is what switches ggml from
its reference path (quant_weights NULL) to the weighted search, as stable-diffusion.cpp's
converter does. The inputs (:func:`golden_inputs`) come from integer arithmetic and float64
math, so they are the same on every machine; tests/test_ggml_weighted.py quantizes them with
qconvert.convert.ggml_weighted and compares block by block.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / "tests" / "data" / "ggml_weighted.json"
ROWS, COLS = 8, 512  # per case: 8 rows of 512 (two super-blocks, sixteen 32-blocks per row)
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84),
         "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


BUILD = "gcc -O2 -fPIC -DNDEBUG -shared -I{src}/include -I{src}/src {src}/src/ggml-quants.c {shim} -lm -o {out}"


def build_lib(src: Path, out: Path) -> Path:
    """Compile ggml-quants.c + bench/ggml_shim.c into ``out`` (gcc)."""
    import shlex
    import subprocess

    cmd = BUILD.format(src=src, shim=HERE / "ggml_shim.c", out=out)
    subprocess.run(shlex.split(cmd), check=True)
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), as a float32 array."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def golden_inputs() -> dict[str, np.ndarray]:
    """float32 (ROWS, COLS) cases: Gaussian, Student-t(3), all-zero blocks, exact ties,
    subnormals, large and the largest finite bfloat16 values."""
    from make_kquant_golden import golden_inputs as kquant_inputs

    base = kquant_inputs()
    gauss = base["gauss"].reshape(-1, COLS)[:ROWS]
    t3 = base["t3"].reshape(-1, COLS)[:ROWS]
    zeros = t3.copy()
    zeros[0] = 0                                   # a whole row (sigma2 = 0 for the legacy types)
    zeros[1, :256] = 0                             # a super-block next to data
    zeros[2:, ::64] = 0                            # scattered zeros
    zeros[3].reshape(-1, 32)[::2] = 0              # every other 32-block
    zeros[4].reshape(-1, 16)[1::3] = 0             # 16-sub-blocks
    # Ties: a grid of quarter steps, so scaled values land on .5 and the maximum magnitude
    # appears with both signs (the first one wins in ggml's scan).
    ties = (np.round(gauss * 4) / 4).astype(np.float32)
    ties[:, 0], ties[:, 1] = 3.0, -3.0
    ties[5] = np.tile(np.array([1, -1, 0.5, -0.5], np.float32), COLS // 4)
    sub = _bf16(gauss * np.float32(1e-39))         # subnormal float32 (and bf16) values
    sub[0:4] = _bf16(gauss[0:4] * np.float32(1e-30))  # tiny normals next to them
    big = _bf16(t3 * np.float32(1e4))              # large, fp16 scales still finite
    top = np.array([0x7F7F0000], np.uint32).view(np.float32)[0]  # largest finite bfloat16
    bf16max = _bf16(np.clip(gauss / 4, -1, 1) * top)
    bf16max[:, 0], bf16max[:, 1] = top, -top
    return {"gauss": gauss, "t3": t3, "zeros": zeros, "ties": ties, "subnormal": sub, "large": big,
            "bf16max": bf16max}


def ggml_weighted(lib_path: str):
    """``quantize_<type>`` from the library, called with an all-ones importance matrix
    (or the given one)."""
    lib = ctypes.CDLL(lib_path)

    def run(name: str, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        fn = getattr(lib, "quantize_" + name.lower().replace("_k", "_K"))
        fn.restype = ctypes.c_size_t
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrow, n = x.shape
        qw = np.ones(n, np.float32) if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
        block, size = SIZES[name]
        out = np.zeros((nrow, n // block * size), dtype=np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
           ctypes.c_int64(nrow), ctypes.c_int64(n), qw.ctypes.data_as(ctypes.c_void_p))
        return out
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ggml-lib", help="a built libggml-quants.so")
    src.add_argument("--ggml-src", type=Path, help="a ggml checkout to build it from (gcc)")
    ap.add_argument("--ggml-commit", default=None, help="the ggml commit the library was built from")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if a.ggml_src:
        import tempfile

        a.ggml_lib = str(build_lib(a.ggml_src.resolve(), Path(tempfile.mkdtemp()) / "libggml-quants.so"))
    run = ggml_weighted(a.ggml_lib)
    cases = {f"{t}/{d}": base64.b64encode(run(t, x).tobytes()).decode()
             for t in TYPES for d, x in golden_inputs().items()}
    # pluggable weights: one non-uniform importance vector, on the Gaussian case
    w = (1.0 + np.arange(COLS, dtype=np.float32) % 7) / 4
    for t in TYPES:
        cases[f"{t}/gauss/imatrix"] = base64.b64encode(run(t, golden_inputs()["gauss"], w).tobytes()).decode()
    doc = {
        "about": "ggml's quantize_<type>(..., quant_weights = ones) bytes for "
                 "bench/make_weighted_golden.py:golden_inputs(); '/imatrix' cases: quant_weights = (1 + col % 7)/4",
        "ggml_commit": a.ggml_commit, "build": BUILD.format(src="<ggml>", shim="bench/ggml_shim.c", out="libggml-quants.so"), "rows": ROWS, "cols": COLS, "cases": cases,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
