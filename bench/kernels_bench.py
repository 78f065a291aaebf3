"""Fast exact kernels against the library functions they reproduce: speed and byte identity.

    python bench/kernels_bench.py [--rows 3072 --cols 3072] [--threads 1] [--json bench/kernels_bench.json]

One bfloat16 N(0, 0.02^2) weight (FLUX.1's 3072-wide shape by default), each quantizer run on
it three times after a warm-up; wall-clock Mparam/s of qconvert.convert.kernels and of the
library call it replaces (bitsandbytes' quantize_4bit / int8_vectorwise_quant, gguf-py's
quantize after a bf16->f32 conversion, as the GGUF backend called it before), and whether the
bytes are identical. tests/test_kernels.py checks identity on the golden inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rate(fn, n: int, repeat: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return n / ((time.perf_counter() - t0) / repeat) / 1e6


def _cases(w):
    import bitsandbytes.functional as F
    import gguf
    import numpy as np
    import torch

    from qconvert.convert import kernels as K

    def lib4(qt):
        return lambda: K._library_4bit(w, qt)

    def gguf_q8():  # the GGUF backend before: numpy bf16->f32 (shift and view), then gguf-py
        raw = w.view(torch.int16).numpy().view(np.uint16)
        return gguf.quants.quantize((raw.astype(np.uint32) << 16).view(np.float32), gguf.GGMLQuantizationType.Q8_0)

    def same(a, b) -> bool:
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        return all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)) for x, y in zip(a, b))

    yield "bnb nf4", lambda: K.quantize_4bit(w, "nf4"), lib4("nf4"), same
    yield "bnb fp4", lambda: K.quantize_4bit(w, "fp4"), lib4("fp4"), same
    yield "bnb int8", lambda: K.quantize_int8(w), lambda: F.int8_vectorwise_quant(w.to(torch.float16))[:2], same
    yield "GGUF Q8_0", lambda: K.quantize_q8_0(w), gguf_q8, same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(HERE / "kernels_bench.json"))
    a = ap.parse_args(argv)
    import torch

    from convert_bench import _cpu_name, _versions

    torch.set_num_threads(a.threads)
    w = (torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    n = w.numel()
    rows = []
    for name, fast, lib, same in _cases(w):
        row = {"kernel": name, "identical": bool(same(_np(fast()), _np(lib()))),
               "fast_Mparam_s": round(_rate(fast, n), 1), "library_Mparam_s": round(_rate(lib, n), 1)}  # fmt: skip
        row["speedup"] = round(row["fast_Mparam_s"] / row["library_Mparam_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": _cpu_name(), "threads": a.threads, "shape": [a.rows, a.cols], "versions": _versions(),
              "torch": torch.__version__, "runs": rows}  # fmt: skip
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _np(x):
    import torch

    if isinstance(x, tuple):
        return tuple(_np(v) for v in x)
    return x.numpy() if isinstance(x, torch.Tensor) else x


if __name__ == "__main__":
    sys.exit(main())
