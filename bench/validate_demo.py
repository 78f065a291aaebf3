"""The validation table of the built-in demo, per backend (CPU).

    python bench/validate_demo.py [--json bench/validate_demo.json]

Converts ``tiny-flux`` with torchao int8wo, bnb nf4 and GGUF Q8_0 (diffusers layout) and
validates each in this one process (defaults: 32x32, 4 steps, 2 prompts, fp32), as
``qconvert flux`` does. Prints one row per variant and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = [("torchao", "int8wo", None), ("bnb", "nf4", None), ("gguf", "Q8_0", {"layout": "diffusers"})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=HERE / "validate_demo.json")
    a = ap.parse_args(argv)
    from qconvert.convert import convert
    from qconvert.manifest import library_versions
    from qconvert.sources import resolve_source
    from qconvert.validate import validate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, scheme, options in VARIANTS:
            out = Path(tmp) / f"{backend}-{scheme}"
            convert(resolve_source("tiny-flux"), backend, scheme, out, progress=False, options=options)
            d = validate(out, write=False).to_dict()
            q, r, ql = d["quantized"], d["reference"], d["quality"]
            rows.append({
                "variant": f"{backend} {scheme}", "passed": d["passed"],
                "transformer_bytes": q["transformer_bytes"], "reference_transformer_bytes": r["transformer_bytes"],
                "memory_reduction": round(ql["memory_reduction"], 3),
                "forward_rel_error": round(ql["forward_rel_error"], 5), "t5_rel_error": round(ql["t5_rel_error"], 5),
                "psnr": None if ql["psnr"] is None else round(ql["psnr"], 2), "ssim": round(ql["ssim"], 4),
                "memory_after_load": q["memory_after_load"], "reference_memory_after_load": r["memory_after_load"],
                "peak_memory": q["peak_memory"], "reference_peak_memory": r["peak_memory"],
                "step_s": round(q["step_s"], 4), "reference_step_s": round(r["step_s"], 4),
                "lpips_note": ql["lpips_note"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": library_versions("torchao", "bitsandbytes", "gguf", "torchmetrics"),
        "settings": {"size": 32, "steps": 4, "prompts": 2, "dtype": "float32", "device": "cpu"},
        "variants": rows,
    }  # fmt: skip
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
