"""Tensor-level digests of every backend and scheme's output, to prove a refactor changed no byte.

    python bench/output_digests.py [--sources tiny-flux,slim-flux] [--json bench/output_digests.json]
    python bench/output_digests.py --compare bench/output_digests.json   # exit 1 on any difference

Converts each built-in source with every scheme this machine can run (torchao int4wo needs a
GPU and is skipped, with the reason recorded) and records, per output file, the sha256 of every
tensor's bytes with its dtype (or GGML type) and shape, plus the sha256 of each config.json and
of the GGUF key-value metadata. ``--compare`` converts again and lists what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def safetensors_digests(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            raw = t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
            out[key] = [str(t.dtype).replace("torch.", ""), list(t.shape), hashlib.sha256(raw).hexdigest()]
    return out


def gguf_digests(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape], hashlib.sha256(t.data.tobytes()).hexdigest()]
               for t in reader.tensors}  # fmt: skip
    kv = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        kv[field.name] = hashlib.sha256(b"".join(bytes(p) for p in field.parts)).hexdigest()
    return {"tensors": dict(sorted(tensors.items())), "kv": dict(sorted(kv.items()))}


def output_digests(out: Path) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.suffix == ".safetensors":
            files[rel] = safetensors_digests(p)
        elif p.suffix == ".gguf":
            files[rel] = gguf_digests(p)
        elif p.name == "config.json" and p.parent.name in ("transformer", "text_encoder_2"):
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    from qconvert.convert import SCHEMES

    out = []
    for backend, schemes in SCHEMES.items():
        for scheme in schemes:
            if backend == "gguf":
                out += [(backend, scheme, {"layout": "bfl"}), (backend, scheme, {"layout": "diffusers"})]
            else:
                out.append((backend, scheme, {}))
    return out


def collect(sources: list[str]) -> dict[str, Any]:
    from qconvert.convert import convert
    from qconvert.errors import QConvertError
    from qconvert.sources import resolve_source

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qconvert-digests-") as tmp:
        for spec in sources:
            source = resolve_source(spec)
            for backend, scheme, options in variants():
                key = f"{spec}:{backend}:{scheme}" + (f":{options['layout']}" if options else "")
                out = Path(tmp) / key.replace(":", "-")
                try:
                    convert(source, backend, scheme, out, progress=False, options=options)
                except QConvertError as e:
                    result[key] = {"skipped": e.one_line()}
                    print(f"{key}: skipped: {e.one_line()}", flush=True)
                    continue
                result[key] = output_digests(out)
                print(f"{key}: {sum(len(v) if isinstance(v, dict) else 1 for v in result[key].values())} entries", flush=True)
                import shutil

                shutil.rmtree(out)
    return result


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = old.get(key, {}), new.get(key, {})
            files = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f)) if isinstance(a, dict) and isinstance(b, dict) else []
            diffs.append(f"{key}: differs in {files[:5]}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="tiny-flux,slim-flux")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    ap.add_argument("--compare", type=Path, default=None, help="digests file to compare against")
    args = ap.parse_args()
    digests = collect(args.sources.split(","))
    if args.compare:
        old = json.loads(args.compare.read_text())["digests"]
        old = {k: v for k, v in old.items() if k.split(":")[0] in args.sources.split(",")}
        diffs = compare(old, digests)
        print("\n".join(diffs) if diffs else f"identical: {len(digests)} outputs")
        return 1 if diffs else 0
    from qconvert.manifest import library_versions

    args.json.write_text(json.dumps({"versions": library_versions("torchao", "bitsandbytes", "gguf"),
                                     "digests": digests}, indent=1, sort_keys=True) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
