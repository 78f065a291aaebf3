"""Many variants from one read of the source, against one run per variant (cold reads).

    python bench/many_variants.py SOURCE [--variants bnb:nf4,bnb:int8,torchao:int8wo,gguf:Q8_0]
        [--components transformer] [--workdir DIR] [--json bench/many_variants.json]

"separate": one `qconvert flux --no-validate` subprocess per variant, the source's pages
evicted from the page cache before each (posix_fadvise DONTNEED), as eight matrix jobs or
eight runs on a machine whose page cache cannot hold the source would read it. "together":
one subprocess converting every variant side by side through one shared reader
(qconvert.convert.shared_read.convert_many, what `qconvert release` and `qconvert flux
--scheme a,b,c` run), evicted once. For each: wall time, bytes the process read from the
block device (/proc/PID/io read_bytes, sampled every 50 ms), peak anonymous memory; the
outputs of both are compared file by file (sha256) and deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOGETHER = r"""
import sys
from qconvert.convert.shared_read import Variant, convert_many
from qconvert.sources import resolve_source
src, work, comps = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
variants = [Variant(*v.split(":"), f"{work}/{v.replace(':', '-')}") for v in sys.argv[4:]]
results, reads = convert_many(resolve_source(src), variants, components=comps)
bad = [r for r in results if isinstance(r, BaseException)]
if bad:
    raise bad[0]
print(reads)
"""


def _proc(pid: int) -> tuple[int, int]:
    anon = read = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon"):
                anon = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes"):
                read = int(line.split()[1])
    except OSError:
        pass
    return anon, read


def run_measured(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = read = 0
    while p.poll() is None:
        anon, r = _proc(p.pid)
        peak_anon, read = max(peak_anon, anon), max(read, r)
        time.sleep(0.05)
    out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed: {err[-800:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "read_bytes": read, "peak_anon": peak_anon, "stdout": out[-300:]}


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, then the folder is deleted: the separate runs'
    outputs never share the disk with the together run's (at full size they would not fit)."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while block := fh.read(16 << 20):
                    h.update(block)
            out[p.relative_to(folder).as_posix()] = h.hexdigest()
    shutil.rmtree(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--variants", default="bnb:nf4,bnb:int8,torchao:int8wo,gguf:Q8_0")
    ap.add_argument("--components", default="transformer")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=str(HERE / "many_variants.json"))
    a = ap.parse_args(argv)
    from convert_bench import _cpu_name, _mem_total, _versions, evict

    from qconvert.sources import resolve_source

    src = resolve_source(a.source)
    comps = a.components.split(",")
    files = [f for c in comps for f in src.components[c].weight_files]
    variants = a.variants.split(",")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qconvert-many-"))
    separate = {"wall_s": 0.0, "read_bytes": 0, "peak_anon": 0, "runs": {}}
    digests = {}
    for v in variants:
        backend, scheme = v.split(":")
        evict(files)
        r = run_measured([sys.executable, "-m", "qconvert.cli", "-q", "flux", "--source", a.source, "--backend", backend,
                          "--scheme", scheme, "--out", str(work / "separate" / v.replace(":", "-")), "--no-validate",
                          "--components", a.components])  # fmt: skip
        separate["runs"][v] = {k: r[k] for k in ("wall_s", "read_bytes", "peak_anon")}
        digests[v] = _digests(work / "separate" / v.replace(":", "-"))
        separate["wall_s"] += r["wall_s"]
        separate["read_bytes"] += r["read_bytes"]
        separate["peak_anon"] = max(separate["peak_anon"], r["peak_anon"])
        print(v, separate["runs"][v], flush=True)
    evict(files)
    together = run_measured([sys.executable, "-c", TOGETHER, a.source, str(work / "together"), a.components, *variants])
    identical = all(digests[v] == _digests(work / "together" / v.replace(":", "-")) for v in variants)
    shutil.rmtree(work, ignore_errors=True)
    source_bytes = sum(src.components[c].nbytes for c in comps)
    result = {
        "machine": _cpu_name(), "mem_total": _mem_total(), "versions": _versions(), "source": a.source,
        "components": comps, "source_bytes": source_bytes, "variants": variants,
        "separate": {**separate, "wall_s": round(separate["wall_s"], 1)}, "together": together,
        "identical_outputs": identical,
        "read_ratio": round(together["read_bytes"] / max(separate["read_bytes"], 1), 3),
        "wall_ratio": round(together["wall_s"] / separate["wall_s"], 3),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions",)}, indent=1))
    p = Path(a.json)
    data = json.loads(p.read_text()) if p.exists() else []
    data.append(result)
    p.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
