"""Write tests/data/ggml_kquants.json: ggml's own K-quant bytes for fixed inputs.

    python bench/make_kquant_golden.py --ggml-lib /path/libggml-quants.so [--ggml-commit SHA]

The library is ggml's ``ggml-quants.c`` built as a shared object (the reference quantizers
``quantize_row_q{2..6}_K_ref``; see bench/kquant_bench.py). The inputs come from
:func:`golden_inputs`, plain integer arithmetic and float64 math, so they are the same on
every machine and numpy version; tests/test_kquants.py quantizes them with qconvert and
compares block by block with these bytes.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / "tests" / "data" / "ggml_kquants.json"
BLOCKS = 32  # per case: 32 rows of one 256-value super-block
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _uniform(seed: int, n: int) -> np.ndarray:
    """n floats in (0, 1) from a 64-bit LCG (Knuth's MMIX constants): no library RNG."""
    state = np.uint64(seed)
    a, c = np.uint64(6364136223846793005), np.uint64(1442695040888963407)
    out = np.empty(n, dtype=np.float64)
    with np.errstate(over="ignore"):
        for i in range(n):
            state = a * state + c
            out[i] = ((int(state) >> 11) + 0.5) / float(1 << 53)
    return out


def golden_inputs() -> dict[str, np.ndarray]:
    """Gaussian and Student-t (3 degrees of freedom, heavy tails) rows, float32 (BLOCKS, 256)."""
    n = BLOCKS * 256
    u = _uniform(2026, 6 * n).reshape(6, n)

    def box_muller(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = np.sqrt(-2.0 * np.log(u1))
        return r * np.cos(2.0 * np.pi * u2), r * np.sin(2.0 * np.pi * u2)

    z, _ = box_muller(u[0], u[1])
    n1, n2 = box_muller(u[2], u[3])
    n3, _ = box_muller(u[4], u[5])
    t3 = z / np.sqrt((n1**2 + n2**2 + n3**2) / 3.0)
    return {"gauss": z.astype(np.float32).reshape(BLOCKS, 256), "t3": t3.astype(np.float32).reshape(BLOCKS, 256)}


def main(argv: list[str] | None = None) -> int:
    from gguf import GGMLQuantizationType
    from kquant_bench import ggml_c_quantizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ggml-lib", required=True)
    ap.add_argument("--ggml-commit", default=None, help="the ggml commit the library was built from")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    make = ggml_c_quantizer(a.ggml_lib)
    cases = {}
    for name in K_TYPES:
        run = make(GGMLQuantizationType[name])
        for dist, x in golden_inputs().items():
            cases[f"{name}/{dist}"] = base64.b64encode(run(x).tobytes()).decode()
    doc = {
        "about": "ggml's quantize_row_q*_K_ref bytes for bench/make_kquant_golden.py:golden_inputs()",
        "ggml_commit": a.ggml_commit, "blocks": BLOCKS, "cases": cases,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
