"""GPU check: qconvert's CPU-written checkpoints on CUDA, against diffusers' own GPU path.

    python bench/gpu_check.py --out DIR [--budget 500] [--model full|slim] [--size 1024]

One short run on a CUDA machine (also runs on CPU with --model slim --size 32 to test the
script itself). Writes DIR/gpu_check.json after every step (a run cut short keeps what it
measured) and prints the tables at the end.

1. bitsandbytes (width-3072 slim transformer): qconvert's CPU-written file vs diffusers'
   on-the-fly ``BitsAndBytesConfig`` quantization on CUDA of the same source. nf4 must be
   bit-identical; fp4 / double quant / int8: dequantization error of qconvert's weights must
   be no worse than 1.01x the CUDA path's.
2. Full-size FLUX.1-dev-shaped transformer + T5-XXL, random weights drawn on the GPU,
   converted by qconvert (CPU), validated by ``qconvert.validate`` at 1024^2 per backend:
   memory after load, peak, step time, PSNR/SSIM and forward error vs the same run's bf16.
Steps past ``--budget`` seconds are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

T0 = time.perf_counter()
RESULT: dict = {"steps": {}}
OUT: Path = Path(".")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def save() -> None:
    (OUT / "gpu_check.json").write_text(json.dumps(RESULT, indent=2, default=str) + "\n")


def step(name: str, budget: float):
    def wrap(fn):
        def run(*a, **k):
            if time.perf_counter() - T0 > budget:
                RESULT["steps"][name] = {"status": "skipped (time budget)"}
                log(f"SKIP {name}: over budget")
                save()
                return None
            log(f"START {name}")
            t = time.perf_counter()
            try:
                r = fn(*a, **k)
                RESULT["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 1), "result": r}
            except Exception as e:  # noqa: BLE001 - report and go on with the next check
                RESULT["steps"][name] = {"status": f"error: {type(e).__name__}: {e}",
                                         "trace": traceback.format_exc()[-3000:]}
                r = None
            log(f"END {name}: {RESULT['steps'][name]['status']}")
            save()
            return r

        return run

    return wrap


# --- 1. bitsandbytes vs diffusers on CUDA ---------------------------------------------------

BNB_SCHEMES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def _dequant_file(path_dir: Path, device: str) -> dict:
    """Dequantize every bnb Linear weight in a qconvert-written transformer folder."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out = {}
    for k in list(sd):
        if k.endswith(".weight") and (k + ".absmax") in sd:  # 4-bit
            qs_keys = {kk[len(k) + 1:]: v for kk, v in sd.items() if kk.startswith(k + ".")}
            qs = F.QuantState.from_dict(qs_keys, device=torch.device(device))
            out[k] = F.dequantize_4bit(sd[k].to(device), qs).float()
        elif k.endswith(".weight") and k[: -len(".weight")] + ".SCB" in sd:  # int8
            scb = sd[k[: -len(".weight")] + ".SCB"].to(device).float()
            out[k] = sd[k].to(device).float() * scb[:, None] / 127.0
    return out, sd


def _dequant_module(model, device: str) -> tuple[dict, dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out, raw = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            raw[f"{name}.weight"] = m.weight.data
            raw[f"{name}.weight.absmax"] = m.weight.quant_state.absmax
        elif isinstance(m, bnb.nn.Linear8bitLt):
            w = m.weight
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = m.state.SCB
            out[f"{name}.weight"] = w.data.float() * scb.float()[:, None] / 127.0
            raw[f"{name}.weight"] = w.data
            raw[f"{name}.SCB"] = scb
    return out, raw


def bnb_check(slim: Path, work: Path, device: str) -> dict:
    import torch
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from safetensors.torch import load_file

    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    src = resolve_source(str(slim))
    source_sd = {}
    for f in sorted((slim / "transformer").glob("*.safetensors")):
        source_sd.update(load_file(str(f)))
    table = {}
    for scheme, kw in BNB_SCHEMES.items():
        out = work / f"bnb-{scheme}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        convert(src, "bnb", scheme, out, components=("transformer",), progress=False)
        conv_s = time.perf_counter() - t
        ours, ours_raw = _dequant_file(out / "transformer", device)
        ctx = _cpu_ctx() if device == "cpu" else _null()
        with ctx:
            ref = FluxTransformer2DModel.from_pretrained(
                slim / "transformer", quantization_config=BitsAndBytesConfig(**kw), torch_dtype=torch.bfloat16,
                device_map={"": device} if device != "cpu" else None,
            )
        theirs, theirs_raw = _dequant_module(ref, device)
        keys = sorted(set(ours) & set(theirs))
        err_ours = err_theirs = norm = 0.0
        identical_w = identical_absmax = 0
        for k in keys:
            w = source_sd[k].to(device).float()
            err_ours += float(((ours[k] - w) ** 2).sum())
            err_theirs += float(((theirs[k] - w) ** 2).sum())
            norm += float((w**2).sum())
            a = ours_raw[k].to(device).reshape(-1)
            b = theirs_raw[k].reshape(-1)
            identical_w += int(a.numel() == b.numel() and torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
            ak = k + ".absmax" if scheme != "int8" else k[: -len(".weight")] + ".SCB"
            bk = ak
            if ak in ours_raw and bk in theirs_raw:
                x, y = ours_raw[ak].to(device), theirs_raw[bk]
                identical_absmax += int(x.numel() == y.numel() and torch.equal(x.float().reshape(-1), y.float().reshape(-1)))
        rel_ours, rel_theirs = (err_ours / norm) ** 0.5, (err_theirs / norm) ** 0.5
        table[scheme] = {
            "linears": len(keys), "missing_in_ours": sorted(set(theirs) - set(ours))[:5],
            "identical_weights": identical_w, "identical_absmax_or_SCB": identical_absmax,
            "rel_error_qconvert": round(rel_ours, 6), "rel_error_cuda": round(rel_theirs, 6),
            "ratio": round(rel_ours / rel_theirs, 4) if rel_theirs else None,
            "convert_s": round(conv_s, 1),
        }  # fmt: skip
        if scheme == "nf4":
            table[scheme]["pass"] = identical_w == len(keys) and identical_absmax == len(keys) and len(keys) > 0
        else:
            table[scheme]["pass"] = len(keys) > 0 and rel_ours <= 1.01 * rel_theirs
        log(f"bnb {scheme}: {table[scheme]}")
        del ref, ours, theirs
        shutil.rmtree(out, ignore_errors=True)
        if device != "cpu":
            torch.cuda.empty_cache()
    return table


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _cpu_ctx():
    from qconvert.convert.bnb_cpu import allow_bnb_on_cpu

    return allow_bnb_on_cpu()


# --- 2. full-size conversion + validation ---------------------------------------------------

VARIANTS = [
    ("torchao", "int8wo"),
    ("bnb", "nf4"),
    ("gguf", "Q8_0"),
    ("gguf", "Q4_K_S"),
    ("torchao", "fp8wo"),
    ("bnb", "int8"),
    # the source post's other rows (issue 17): Quanto INT8/INT4/FP8 and FP8 storage with
    # layerwise casting (the fp8 backend's default diffusers layout); run when their wheels
    # (optimum-quanto) travel in .whl/, else each step records its ImportError
    ("quanto", "int8"),
    ("quanto", "int4"),
    ("quanto", "fp8"),
    ("fp8", "e4m3fn"),
]


def build_model(kind: str, work: Path, device: str) -> Path:
    """The model the variants are converted from.

    full: the exact FLUX.1-dev transformer (11.9B params, random weights drawn on the GPU) with
    slim-flux's small text encoders and VAE. T5-XXL is left out on purpose: converting it
    with every variant does not fit the device time of one session; the transformer is what the per-backend table is about.
    """
    from make_full_size import build, write_vae

    from qconvert.tiny import builtin_path

    if kind == "tiny":
        return builtin_path("tiny-flux")
    if kind == "slim":
        # slim-flux's one-block VAE has scale factor 1 (1024^2 would be 262,144 image tokens,
        # 64x FLUX's); give the copy a scale-8 VAE so --size means what it means for FLUX.
        path = work / "slim-flux"
        shutil.copytree(builtin_path("slim-flux"), path, ignore=shutil.ignore_patterns("vae"))
        write_vae(path / "vae")
        return path
    path = work / "flux-full"
    build(path, ["transformer"], device=device, log=log)
    shutil.copytree(builtin_path("slim-flux") / "text_encoder_2", path / "text_encoder_2", dirs_exist_ok=True)
    return path


def convert_and_validate(source: Path, work: Path, backend: str, scheme: str, device: str, size: int) -> dict:
    from qconvert.convert import convert
    from qconvert.sources import resolve_source
    from qconvert.validate import validate

    out = work / f"{backend}-{scheme}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = convert(resolve_source(str(source)), backend, scheme, out, progress=False,
                  options=({"layout": "bfl" if source.name == "flux-full" or "slim" in source.name else "diffusers"}
                           if backend == "gguf" else None))
    conv_s = time.perf_counter() - t
    report = validate(out, device=device, size=size, steps=4, prompts=["a photo of a cat"])
    d = report.to_dict()
    row = {
        "convert_s": round(conv_s, 1), "bytes_out": res.manifest["bytes_out"], "passed": d["passed"],
        "failed": d["failed"], "quantized": d["quantized"], "reference": d["reference"],
        "quality": {k: d["quality"][k] for k in ("psnr", "ssim", "forward_rel_error", "t5_rel_error", "memory_reduction")},
    }  # fmt: skip
    grid = out / "samples" / "grid.png"
    if grid.is_file() and len(list(OUT.glob("grid-*.png"))) < 4:  # the device returns at most 8 files
        shutil.copyfile(grid, OUT / f"grid-{backend}-{scheme}.png")
    shutil.rmtree(out, ignore_errors=True)
    return row


def tables() -> str:
    from qconvert.plan import human_bytes

    lines = []
    bnb = (RESULT["steps"].get("bnb_vs_diffusers_cuda") or {}).get("result") or {}
    if bnb:
        lines.append("bitsandbytes: qconvert (CPU-written) vs diffusers on-the-fly (CUDA), slim width-3072 transformer")
        lines.append(f"{'scheme':<8}{'linears':>8}{'same w':>8}{'same absmax':>12}{'err ours':>10}{'err cuda':>10}{'ratio':>8}  pass")
        for s, r in bnb.items():
            lines.append(f"{s:<8}{r['linears']:>8}{r['identical_weights']:>8}{r['identical_absmax_or_SCB']:>12}"
                         f"{r['rel_error_qconvert']:>10.5f}{r['rel_error_cuda']:>10.5f}{(r['ratio'] or 0):>8.4f}  {r['pass']}")
    rows = [(k[len("validate_"):], v) for k, v in RESULT["steps"].items() if k.startswith("validate_")]
    ref = next((v["result"]["reference"] for _, v in rows if v.get("result")), None)
    if rows:
        lines.append("")
        lines.append(f"validation at {RESULT.get('size')}^2 ({RESULT.get('image_tokens')} image tokens), "
                     f"{RESULT.get('model')} model, device {RESULT.get('device_name')}")
        lines.append(f"{'variant':<16}{'T weights':>11}{'after load':>12}{'peak':>11}{'s/step':>8}{'PSNR':>7}{'SSIM':>7}{'fwd err':>9}{'T5 err':>8}{'conv s':>8}  pass")
        if ref:
            lines.append(f"{'bf16 (ref)':<16}{human_bytes(ref['transformer_bytes']):>11}{human_bytes(ref['memory_after_load']):>12}"
                         f"{human_bytes(ref['peak_memory']):>11}{ref['step_s']:>8.3f}")
        for name, v in rows:
            r = v.get("result")
            if not r:
                lines.append(f"{name:<16}{v['status']}")
                continue
            q, ql = r["quantized"], r["quality"]
            lines.append(f"{name:<16}{human_bytes(q['transformer_bytes']):>11}{human_bytes(q['memory_after_load']):>12}"
                         f"{human_bytes(q['peak_memory']):>11}{q['step_s']:>8.3f}{(ql['psnr'] if ql['psnr'] is not None else float('inf')):>7.1f}{ql['ssim']:>7.3f}"
                         f"{ql['forward_rel_error']:>9.4f}{ql['t5_rel_error']:>8.4f}{r['convert_s']:>8.0f}  {r['passed']}")
    return "\n".join(lines)


def _workdir() -> Path:
    """RAM-backed /dev/shm when it has room (the device's disk is small), else a temp dir."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 60e9:
            return Path(tempfile.mkdtemp(prefix="gpu-check-", dir=shm))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="gpu-check-"))


def main(argv: list[str] | None = None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--budget", type=float, default=500.0, help="seconds after which remaining steps are skipped")
    ap.add_argument("--model", choices=["full", "slim", "tiny"], default="full")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-bnb", action="store_true")
    ap.add_argument("--variants", default=None, help="comma list backend:scheme")
    a = ap.parse_args(argv)
    OUT = a.out
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QCONVERT_CACHE", str(Path(tempfile.gettempdir()) / "qconvert-cache"))
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from qconvert.manifest import library_versions

    RESULT.update({
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": a.model, "size": a.size, "versions": library_versions("torchao", "bitsandbytes", "gguf", "optimum-quanto", "torchmetrics"),
        "cpu_count": os.cpu_count(),
    })  # fmt: skip
    log(json.dumps({k: RESULT[k] for k in ("device", "device_name", "versions")}))
    save()
    work = a.work or _workdir()
    log(f"work folder {work}")
    from qconvert.tiny import builtin_path

    slim = step("build_slim", a.budget)(builtin_path)("tiny-flux" if a.model == "tiny" else "slim-flux")
    if not a.skip_bnb and slim is not None:
        step("bnb_vs_diffusers_cuda", a.budget)(bnb_check)(slim, work, device)
    source = step("build_model", a.budget)(build_model)(a.model, work, device)
    if source is not None:
        vae_blocks = len(json.loads((source / "vae" / "config.json").read_text())["block_out_channels"])
        RESULT["image_tokens"] = (a.size // 2 ** (vae_blocks - 1) // 2) ** 2
        save()
    variants = VARIANTS if not a.variants else [tuple(v.split(":")) for v in a.variants.split(",")]
    if source is not None:
        for backend, scheme in variants:
            step(f"validate_{backend}-{scheme}", a.budget)(convert_and_validate)(source, work, backend, scheme, device, a.size)
    RESULT["total_s"] = round(time.perf_counter() - T0, 1)
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(tables(), flush=True)
    (OUT / "gpu_check.txt").write_text(tables() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
