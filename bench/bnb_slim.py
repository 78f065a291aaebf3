"""Wall time and peak memory of the bitsandbytes backend on ``slim-flux``, per scheme.

    python bench/bnb_slim.py [--schemes nf4,int8] [--source slim-flux] [--json bench/bnb_slim.json]

``slim-flux`` is the built-in width-3072 Flux (1 double + 1 single block, T5 with
d_model 4096; ~1.3 GB bf16), built once into the cache ($QCONVERT_CACHE) before timing.
Each scheme runs ``qconvert flux --source slim-flux --backend bnb --scheme S --no-validate``
(conversion only) in its own
subprocess (so every run starts cold and the figures are the whole CLI process's), while
this process samples ``/proc/<pid>/status`` every 20 ms: peak RssAnon (anonymous memory:
what must fit in RAM; mmapped safetensors pages are page cache) and VmHWM (peak total
RSS, mapped file pages included). Results are printed and written as JSON, with the
1-minute load average after each run: wall times from a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
ROOT = Path(__file__).resolve().parent.parent


def status(pid: int) -> dict[str, int]:
    from qconvert.memory import read_status

    return read_status(pid)


def run(cmd: list[str], interval: float = 0.02) -> tuple[int, float, dict[str, int], str, str]:
    """Run ``cmd``; return rc, wall seconds, peak /proc figures, stdout, stderr."""
    peak = {"RssAnon": 0, "VmHWM": 0, "VmRSS": 0}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        try:
            while proc.poll() is None:
                for k, v in status(proc.pid).items():
                    peak[k] = max(peak[k], v)
                time.sleep(interval)
        except BaseException:  # Ctrl-C: do not leave the conversion running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, peak, out.read(), err.read()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="slim-flux")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--json", default=str(ROOT / "bench" / "bnb_slim.json"))
    ap.add_argument("--scratch", default=None, help="folder for the outputs [the system temp dir]")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]

    # Build (or find) the source once, outside the timed runs.
    rc, wall, _, _, err = run([sys.executable, "-c",
                               f"from qconvert.tiny import builtin_path; builtin_path({args.source!r})"])
    if rc != 0 and args.source in ("tiny-flux", "slim-flux"):
        print(err, file=sys.stderr)
        return 1
    print(f"source {args.source} ready ({wall:.1f} s)", file=sys.stderr)

    from importlib.metadata import version

    scratch = Path(tempfile.mkdtemp(prefix="bnb-bench-", dir=args.scratch))
    results: list[dict] = []
    report = {
        "source": args.source,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {p: version(p) for p in ("torch", "bitsandbytes", "diffusers", "transformers")},
        "baseline_imports": None,
        "runs": results,
    }

    def save() -> None:  # after every run, so an interrupted bench still leaves its figures
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    try:
        # Baseline: the same interpreter importing what a conversion imports, doing nothing.
        rc, wall, peak, _, err = run([sys.executable, "-c",
                                      "import torch, diffusers, transformers, bitsandbytes, qconvert.cli; "
                                      "from diffusers import FluxTransformer2DModel; "
                                      "from transformers import T5EncoderModel"])  # fmt: skip
        report["baseline_imports"] = {
            "wall_s": round(wall, 2), "peak_rss_anon": peak["RssAnon"], "vm_hwm": peak["VmHWM"]
        }  # fmt: skip
        print(f"imports only: {wall:.1f} s, RssAnon {peak['RssAnon'] / 1e9:.2f} GB, "
              f"VmHWM {peak['VmHWM'] / 1e9:.2f} GB", file=sys.stderr)  # fmt: skip
        for scheme in schemes:
            out = scratch / scheme
            cmd = [sys.executable, "-m", "qconvert.cli", "flux", "--source", args.source, "--backend", "bnb",
                   "--scheme", scheme, "--out", str(out), "--json", "--no-validate"]  # fmt: skip
            rc, wall, peak, stdout, err = run(cmd)
            row = {"scheme": scheme, "rc": rc, "wall_s": round(wall, 2),
                   "peak_rss_anon": peak["RssAnon"], "vm_hwm": peak["VmHWM"],
                   "loadavg_1m_after": round(os.getloadavg()[0], 2)}  # fmt: skip
            if rc == 0:
                summary = json.loads(stdout)
                row.update(
                    bytes_in=summary["bytes_in"],
                    bytes_out=summary["bytes_out"],
                    convert_s=summary["seconds"],
                    components={k: {"bytes_in": v["bytes_in"], "bytes_out": v["bytes_out"], "seconds": v["seconds"]}
                                for k, v in summary["components"].items() if v["action"] == "quantize"},
                )  # fmt: skip
                row["disk_bytes"] = dir_bytes(out)
            else:
                row["error"] = err.strip().splitlines()[-1:] if err.strip() else []
            results.append(row)
            save()
            print(f"{scheme:<8} rc={rc} wall {wall:6.1f} s  RssAnon {peak['RssAnon'] / 1e9:5.2f} GB  "
                  f"VmHWM {peak['VmHWM'] / 1e9:5.2f} GB  out {row.get('bytes_out', 0) / 1e9:.3f} GB",
                  file=sys.stderr)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(json.dumps(report, indent=2))
    save()
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
