"""qconvert against stable-diffusion.cpp's converter (`sd-cli -M convert`), type by type.

    python bench/sdcpp_compare.py --sd-cli /path/to/sd-cli --source slim-flux \
        [--types Q8_0,Q4_0,Q4_K,Q2_K,Q6_K,BF16,F16] [--json bench/sdcpp_compare.json]

Both convert the same transformer weights to one GGUF type, whole runs, on the same machine
in the same run, one after the other:

* qconvert: ``qconvert flux --source SOURCE --backend gguf --scheme <scheme> --layout bfl
  --components transformer --no-validate`` (its default, ggml's weighted search, and
  ``--gguf-search reference`` for the K and legacy types);
* sd.cpp: ``sd-cli -M convert -m <the transformer as a BF16 GGUF> -o out.gguf --type <t>``
  (sd.cpp converts any file it loads; the BF16 GGUF written by qconvert first holds the same
  bf16 values under the BFL names, so the two outputs' tensors match by name).

Per type: wall seconds (the source's pages warm for both), Mparam/s of the tensors written, and
the relative error ``sqrt(sum |deq - x|^2 / sum |x|^2)`` over the tensors *both* tools stored in
that type (gguf-py's dequantizer; x = the bf16 source values), and how many of those tensors
are byte-identical between the two files. Prints a table and writes JSON with the machine,
the versions and sd.cpp's commit (``--sd-commit``).
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

HERE = Path(__file__).resolve().parent
SCHEME = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q3_K": "Q3_K_S"}  # qconvert's scheme that is all <type>
SEARCHED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def qconvert(source: str, scheme: str, out: Path, extra: list[str]) -> float:
    cmd = ["qconvert", "flux", "--source", source, "--backend", "gguf", "--scheme", scheme, "--layout", "bfl",
           "--components", "transformer", "--no-validate", "-q", "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def transformer_gguf(folder: Path) -> Path:
    found = [p for p in folder.rglob("*.gguf") if "t5" not in p.name.lower()]
    if len(found) != 1:
        raise SystemExit(f"expected one transformer GGUF in {folder}, found {found}")
    return found[0]


def sdcpp(sd_cli: str, src: Path, t: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sd_cli, "-M", "convert", "-m", str(src), "-o", str(out), "--type", t.lower().replace("_k", "_K")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def tensors(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def compare(ref: Path, a: Path, b: Path, type_name: str) -> dict:
    """Error of a and b against ref over the tensors both stored as ``type_name``."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    want = GGMLQuantizationType[type_name]
    r, ta, tb = tensors(ref), tensors(a), tensors(b)
    num = {"qconvert": 0.0, "sdcpp": 0.0}
    den, n, same, params = 0.0, 0, 0, 0
    for name, x in r.items():
        if name not in ta or name not in tb or ta[name].tensor_type != want or tb[name].tensor_type != want:
            continue
        xv = dequantize(x.data, x.tensor_type).astype(np.float64).reshape(-1)
        for who, t in (("qconvert", ta[name]), ("sdcpp", tb[name])):
            num[who] += float(np.sum((dequantize(t.data, want).astype(np.float64).reshape(-1) - xv) ** 2))
        den += float(np.sum(xv**2))
        same += bytes(ta[name].data) == bytes(tb[name].data)
        n += 1
        params += xv.size
    return {"tensors": n, "params": params, "identical_tensors": same,
            "rel_err": {k: (v / den) ** 0.5 if den else None for k, v in num.items()}}  # fmt: skip


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("qconvert", "gguf", "numpy", "torch")}


def run_type(args: argparse.Namespace, t: str, bf16: Path, work: Path) -> dict:
    row: dict = {"type": t}
    scheme = SCHEME.get(t, t)
    searches = [("weighted", []), ("reference", ["--gguf-search", "reference"])] if t in SEARCHED else [("", [])]
    qfiles = {}
    for label, extra in searches:
        out = work / f"q-{t}-{label}"
        row[f"qconvert{'_' + label if label else ''}_s"] = round(qconvert(args.source, scheme, out, extra), 2)
        qfiles[label] = transformer_gguf(out)
    sd_out = work / f"sd-{t}.gguf"
    row["sdcpp_s"] = round(sdcpp(args.sd_cli, bf16, t, sd_out), 2)
    for label, q in qfiles.items():
        row[f"error{'_' + label if label else ''}"] = compare(bf16, q, sd_out, t)
    for label in qfiles:
        shutil.rmtree(work / f"q-{t}-{label}")
    sd_out.unlink()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd-cli", required=True)
    ap.add_argument("--sd-commit", default="")
    ap.add_argument("--source", default="slim-flux")
    ap.add_argument("--types", default="Q8_0,BF16,F16,Q4_0,Q5_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--json", type=Path, default=HERE / "sdcpp_compare.json")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdcpp-", dir=args.workdir))
    try:
        bf16_dir = work / "bf16"
        qconvert(args.source, "BF16", bf16_dir, [])
        bf16 = transformer_gguf(bf16_dir)
        params = sum(int(t.n_elements) for t in tensors(bf16).values())
        rows = []
        for t in args.types.split(","):
            row = run_type(args, t, bf16, work)
            row["params"] = params
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
           "versions": versions(), "sd_cpp_commit": args.sd_commit, "source": args.source, "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(rows))
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(rows: list[dict]) -> str:
    out = ["| type | qconvert s (Mparam/s) | qconvert reference s | sd.cpp s (Mparam/s) | rel. error qconvert | "
           "reference | sd.cpp | tensors identical to sd.cpp's |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mp = r["params"] / 1e6
        q = r.get("qconvert_weighted_s", r.get("qconvert_s"))
        e = r.get("error_weighted", r.get("error"))
        ref = r.get("error_reference")
        out.append(
            f"| {r['type']} | {q} ({mp / q:.0f}) | {r.get('qconvert_reference_s', '–')} | {r['sdcpp_s']} "
            f"({mp / r['sdcpp_s']:.0f}) | {e['rel_err']['qconvert']:.5f} | "
            f"{ref['rel_err']['qconvert'] if ref else float('nan'):.5f} | {e['rel_err']['sdcpp']:.5f} | "
            f"{e['identical_tensors']}/{e['tensors']} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
