"""Every quanto scheme on tiny-flux and slim-flux: `qconvert flux` (convert + validate), one
subprocess each, and the validation figures (memory after load, peak memory, time per step,
errors) from its validation.json.

    python bench/quanto_check.py [--json bench/quanto_check.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("int8", "fp8", "int4", "int2")
SOURCES = ("tiny-flux", "slim-flux")


def run_one(source: str, scheme: str, work: Path) -> dict:
    out = work / f"{source}-{scheme}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qconvert.cli", "flux", "--source", source, "--backend", "quanto",
         "--scheme", scheme, "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    row = {"source": source, "scheme": scheme, "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    report_path = out / "validation.json"
    if not report_path.is_file():
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return row
    report = json.loads(report_path.read_text())
    q, ref, quality = report["quantized"], report["reference"], report["quality"]
    row.update(
        passed=report["passed"],
        transformer_bytes=q["transformer_bytes"], reference_transformer_bytes=ref["transformer_bytes"],
        t5_bytes=q["t5_bytes"], reference_t5_bytes=ref["t5_bytes"],
        memory_after_load=q["memory_after_load"], reference_memory_after_load=ref["memory_after_load"],
        peak_memory=q["peak_memory"], reference_peak_memory=ref["peak_memory"],
        step_s=q["step_s"], reference_step_s=ref["step_s"],
        forward_rel_error=quality["forward_rel_error"], t5_rel_error=quality["t5_rel_error"],
        psnr=quality["psnr"], ssim=quality["ssim"], settings=report["settings"]["dtype"],
    )  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            for scheme in SCHEMES:
                rows.append(run_one(source, scheme, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
