"""Every bitsandbytes scheme through `qconvert flux` + `qconvert validate` on this CPU, per CPU path.

    python bench/bnb_cpu_paths.py [--sources tiny-flux,slim-flux] [--schemes nf4,...] [--json bench/bnb_cpu_paths.json]

For each source and scheme: one conversion (``qconvert flux ... --no-validate``), then one
``qconvert validate`` per bitsandbytes CPU path (``QCONVERT_BNB_CPU_REPACK`` = ``auto``: the
AVX512-BF16 repacked kernel where the CPU has it, ``off``: the C dequantize path), each in its
own subprocess, as a user runs them. Records pass/fail, the errors against the source, and how
many 4-bit layers took each path (``validation.json`` → ``environment.bnb_cpu_kernels``).
Prints a Markdown table and writes JSON with the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
MODES = ("auto", "off")


def qconvert(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qconvert.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800)  # fmt: skip


def run_one(source: str, scheme: str, root: Path) -> list[dict]:
    out = root / f"{source}-{scheme}"
    conv = qconvert("-q", "flux", "--source", source, "--backend", "bnb", "--scheme", scheme,
                    "--out", str(out), "--no-validate", "--overwrite")  # fmt: skip
    if conv.returncode != 0:
        return [{"source": source, "scheme": scheme, "mode": m, "error": conv.stderr.strip()[-300:]} for m in MODES]
    rows = []
    for mode in MODES:
        val = qconvert("validate", str(out), "--json", env={"QCONVERT_BNB_CPU_REPACK": mode})
        row: dict = {"source": source, "scheme": scheme, "mode": mode, "exit_code": val.returncode}
        try:
            report = json.loads(val.stdout)
        except ValueError:
            row["error"] = val.stderr.strip()[-300:]
        else:
            q = report["quality"]
            row.update(passed=report["passed"], failed=report["failed"], forward_rel_error=q["forward_rel_error"],
                       t5_rel_error=q["t5_rel_error"], psnr=q["psnr"], ssim=q["ssim"],
                       kernels=report["environment"].get("bnb_cpu_kernels"))  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| source | scheme | CPU path | passed | forward err | T5 err | PSNR | layers repacked / C dequantize / reference |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | {r['scheme']} | {r['mode']} | error: {r['error'][:80]} | | | | |")
            continue
        k = (r.get("kernels") or {}).get("layers", {})
        psnr = "∞" if r["psnr"] is None else f"{r['psnr']:.2f} dB"
        lines.append(f"| {r['source']} | {r['scheme']} | {r['mode']} | {'yes' if r['passed'] else 'no: ' + ','.join(r['failed'])} "
                     f"| {r['forward_rel_error']:.4f} | {r['t5_rel_error']:.4f} | {psnr} "
                     f"| {k.get('repacked', 0)} / {k.get('dequantize', 0)} / {k.get('reference', 0)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="tiny-flux,slim-flux")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    import bitsandbytes
    import torch

    from qconvert import __version__
    from qconvert.convert.bnb_cpu import cpu_has_repack_kernel

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bnb-cpu-paths-") as tmp:
        for source in args.sources.split(","):
            for scheme in args.schemes.split(","):
                rows += run_one(source, scheme, Path(tmp))
    print(table(rows))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "avx512_bf16": cpu_has_repack_kernel(), "torch": torch.__version__,
               "bitsandbytes": bitsandbytes.__version__, "qconvert": __version__}  # fmt: skip
    args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
