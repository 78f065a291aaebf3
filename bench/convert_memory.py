"""Peak memory of one conversion, measured inside the converting process.

    python bench/convert_memory.py --source slim-flux --backend torchao --scheme int8wo \
        [--components transformer] [--json bench/convert_memory.json]

Imports every library first, takes the RssAnon baseline, then runs ``qconvert.convert``
with a /proc sampler (20 ms). Prints one JSON object: baseline, peak anonymous memory
above it, peak total RSS, model bytes, wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def measure(source: str, backend: str, scheme: str, components: str | None, options: dict) -> dict:
    # Everything the conversion imports, imported before the baseline on purpose: the
    # figure is the conversion's working memory, not the libraries' code and tables.
    import torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from diffusers import FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    from qconvert.convert import backend_class, convert, parse_components
    from qconvert.memory import PeakSampler
    from qconvert.sources import resolve_source

    backend_class(backend)  # imports the backend's library before the baseline
    if backend == "torchao":
        import torchao.quantization  # noqa: F401
    src = resolve_source(source)
    comps = parse_components(components)
    model_bytes = sum(src.components[c].nbytes for c in comps)
    largest = max(t.nbytes for c in comps for t in src.components[c].tensors.values())
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        t0 = time.perf_counter()
        with PeakSampler() as s:
            result = convert(src, backend, scheme, Path(tmp) / "out", components=comps,
                             progress=False, options=options)
        wall = time.perf_counter() - t0
        bytes_out = result.manifest["bytes_out"]
    return {
        "source": source, "backend": backend, "scheme": scheme, "components": list(comps),
        "model_bytes": model_bytes, "largest_tensor_bytes": largest, "bytes_out": bytes_out,
        "baseline_anon": s.baseline_anon, "peak_anon": s.peak_anon,
        "anon_above_baseline": s.anon_above_baseline, "peak_rss": s.peak_rss,
        "wall_s": round(wall, 2),
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="slim-flux")
    ap.add_argument("--backend", default="torchao")
    ap.add_argument("--scheme", default="int8wo")
    ap.add_argument("--components", default="transformer")
    ap.add_argument("--option", action="append", default=[], help="key=value backend option")
    ap.add_argument("--json", default=None, help="append the result to this JSON list file")
    a = ap.parse_args(argv)
    options = dict(o.split("=", 1) for o in a.option)
    r = measure(a.source, a.backend, a.scheme, a.components, options)
    print(json.dumps(r))
    if a.json:
        p = Path(a.json)
        data = json.loads(p.read_text()) if p.exists() else []
        data.append(r)
        p.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
