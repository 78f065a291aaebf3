"""Conversion benchmark: wall time and memory of `qconvert flux` per scheme, sampled from /proc.

    python bench/convert_bench.py SOURCE [--schemes torchao:int8wo,bnb:nf4,gguf:Q4_K_S]
        [--baseline] [--json bench/convert_bench.json] [--workdir DIR]

For each scheme it runs `qconvert flux` in a subprocess (no validation) and samples the
child's RssAnon and VmRSS every 50 ms: wall time, peak anonymous memory, peak total RSS, bytes
in and out, Mparam/s. It also times one sequential read of the source's weight files (the
floor any converter pays). The source's pages are evicted from the page cache (posix_fadvise
DONTNEED) before the read and before every run, so each one reads cold. With --baseline it
runs the load-everything path on the same source in a subprocess too (diffusers/transformers
from_pretrained with the backend's quantization config + save_pretrained; gguf-py for GGUF),
for the ratio. Each output is deleted after it is measured.
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

DEFAULT_SCHEMES = "torchao:int8wo,torchao:fp8wo,bnb:nf4,bnb:nf4-dq,bnb:int8,gguf:Q8_0,gguf:Q4_K_S,gguf:Q2_K"


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("RssAnon", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    try:  # bytes the process caused to be read from storage (page-cache hits not counted)
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                out["read_bytes"] = int(line.split()[1])
    except OSError:
        pass
    return out


def run_sampled(cmd: list[str], env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_anon = peak_rss = read_bytes = 0
    while p.poll() is None:
        st = _status(p.pid)
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        peak_rss = max(peak_rss, st.get("VmRSS", 0))
        read_bytes = max(read_bytes, st.get("read_bytes", 0))  # the last sample, 50 ms before exit
        time.sleep(0.05)
    out, err = p.communicate()
    return {
        "returncode": p.returncode, "wall_s": round(time.perf_counter() - t0, 2),
        "peak_anon": peak_anon, "peak_rss": peak_rss, "read_bytes": read_bytes, "stdout": out[-2000:], "stderr": err[-2000:],
    }  # fmt: skip


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed), so every run reads cold."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(files: list[Path]) -> dict:
    evict(files)
    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    s = time.perf_counter() - t0
    return {"bytes": n, "seconds": round(s, 2), "GB_per_s": round(n / s / 1e9, 3)}


BASELINE = r"""
import sys, json, torch
src, out, backend, scheme = sys.argv[1:5]
from pathlib import Path
if backend == "torchao":
    import torchao.quantization as q
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    cfg = {"int8wo": q.Int8WeightOnlyConfig, "fp8wo": q.Float8WeightOnlyConfig}[scheme]()
    m = FluxTransformer2DModel.from_pretrained(Path(src) / "transformer", quantization_config=TorchAoConfig(cfg), dtype=torch.bfloat16)
    m.save_pretrained(out)
elif backend == "bnb":
    from qconvert.convert.bnb_cpu import allow_bnb_on_cpu
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    kw = {"load_in_8bit": True} if scheme == "int8" else {"load_in_4bit": True, "bnb_4bit_quant_type": scheme.split("-")[0], "bnb_4bit_use_double_quant": scheme.endswith("-dq")}
    with allow_bnb_on_cpu():
        m = FluxTransformer2DModel.from_pretrained(Path(src) / "transformer", quantization_config=BitsAndBytesConfig(**kw), dtype=torch.bfloat16)
        m.save_pretrained(out)
else:
    import gguf, numpy as np
    from safetensors.torch import load_file
    sd = {}
    for f in sorted((Path(src) / "transformer").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(Path(out) / "t.gguf"), "flux")
    qt = getattr(gguf.GGMLQuantizationType, scheme)
    for k, v in sd.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(k, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(k, a.astype(np.float32))
    Path(out).mkdir(exist_ok=True)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--schemes", default=DEFAULT_SCHEMES)
    ap.add_argument("--components", default="transformer,text_encoder_2")
    ap.add_argument("--baseline", action="store_true", help="also run the load-everything path (transformer)")
    ap.add_argument("--json", default="bench/convert_bench.json")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--label", default=None)
    a = ap.parse_args(argv)

    from qconvert.sources import resolve_source

    src = resolve_source(a.source)
    comps = a.components.split(",")
    files = [f for c in comps for f in src.components[c].weight_files]
    params = sum(t.numel for c in comps for t in src.components[c].tensors.values())
    bytes_in = sum(src.components[c].nbytes for c in comps)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qconvert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "label": a.label or a.source, "source": a.source, "components": comps, "params": params,
        "bytes_in": bytes_in, "read_once": read_once(files), "runs": [],
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "cpu": _cpu_name(), "mem_total": _mem_total()},
        "versions": _versions(),
    }  # fmt: skip
    print(json.dumps({"read_once": result["read_once"], "params": params}), flush=True)
    for item in a.schemes.split(","):
        backend, scheme = item.split(":")
        out = work / f"{backend}-{scheme}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "qconvert.cli", "-q", "flux", "--source", a.source, "--backend", backend,
               "--scheme", scheme, "--out", str(out), "--no-validate", "--components", a.components]
        evict(files)
        r = run_sampled(cmd)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        row = {"backend": backend, "scheme": scheme, "path": "qconvert", "returncode": r["returncode"],
               "wall_s": r["wall_s"], "peak_anon": r["peak_anon"], "peak_rss": r["peak_rss"],
               "bytes_out": size, "read_bytes": r["read_bytes"], "mparam_s": round(params / r["wall_s"] / 1e6, 1)}  # fmt: skip
        if r["returncode"]:
            row["stderr"] = r["stderr"]
        shutil.rmtree(out, ignore_errors=True)
        if a.baseline:
            bout = work / f"baseline-{backend}-{scheme}"
            bout.mkdir(exist_ok=True)
            evict(files)
            b = run_sampled([sys.executable, "-c", BASELINE, str(src.root), str(bout), backend, scheme])
            row["baseline"] = {"wall_s": b["wall_s"], "peak_anon": b["peak_anon"], "peak_rss": b["peak_rss"],
                               "returncode": b["returncode"]}  # fmt: skip
            if b["returncode"]:
                row["baseline"]["stderr"] = b["stderr"][-500:]
            elif r["peak_anon"]:
                row["baseline"]["anon_ratio"] = round(b["peak_anon"] / r["peak_anon"], 2)
            shutil.rmtree(bout, ignore_errors=True)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    p = Path(a.json)
    data = json.loads(p.read_text()) if p.exists() else []
    data.append(result)
    p.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _versions() -> dict:
    from qconvert.manifest import library_versions

    return library_versions("torchao", "bitsandbytes", "gguf")


if __name__ == "__main__":
    sys.exit(main())
