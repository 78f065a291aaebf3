"""qconvert's fp8 ComfyUI-layout file through ComfyUI's own loader, on CPU (issue 17).

Converts the slim width-3072 pipeline's transformer with ``qconvert flux --backend fp8
--layout comfyui`` (e4m3fn and e5m2), then, in a fresh subprocess (ComfyUI's import-time state
and the torchvision stub stay out of the main process):

* loads each file with ComfyUI's ``UNETLoader().load_unet(name, "default")`` (nodes.py: the
  *Load Diffusion Model* node, i.e. ``comfy.sd.load_diffusion_model``), records the model class
  ComfyUI detected, the dtype it chose for the weights (``model.get_dtype()``: float8 kept, or
  upcast) and its manual-cast dtype, the "unet missing"/"unet unexpected" keys it logs, and the
  dtypes its diffusion model holds;
* runs ComfyUI's diffusion-model forward on fixed inputs and compares it, ||a - b|| / ||b||,
  with the diffusers model of the BF16 source upcast to float32 on the same inputs (the inputs,
  packing and reference are bench/comfyui_gguf.py's);
* and, for the same file, the forward of qconvert's validation loader (diffusers
  ``from_single_file`` + ``enable_layerwise_casting``, float32 compute) vs the same reference.

Usage (repository root; a few minutes on 2 busy cores)::

    python bench/comfyui_fp8.py [--json bench/comfyui_fp8.json]

ComfyUI comes from the ``fetch`` snapshot (Comfy-Org/ComfyUI, bare git dir); the extra
packages are bench/comfyui_gguf.py's (einops, torchsde, trampoline, sentencepiece, av;
torchvision stubbed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY_GIT = "/work/.mirror/Comfy-Org+ComfyUI/repo"
SCHEMES = ("e4m3fn", "e5m2")


def _gguf_bench():
    """bench/comfyui_gguf.py as a module: its tree export, inputs, packing and reference."""
    spec = importlib.util.spec_from_file_location("comfyui_gguf_bench", ROOT / "bench" / "comfyui_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def convert(scheme: str, out: Path) -> Path:
    cmd = ["qconvert", "flux", "--source", "slim-flux", "--backend", "fp8", "--scheme", scheme, "--layout", "comfyui",
           "--components", "transformer", "--out", str(out), "--no-validate", "--overwrite", "-q"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")
    (path,) = sorted(out.glob("*.safetensors"))
    return path


def diffusers_side(bench, root: Path, path: Path, scheme: str, inp: dict):
    """qconvert's validation loader for the comfyui layout, float32 compute."""
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_single_file(str(path), config=str(root), subfolder="transformer", dtype=torch.float32)
    model.enable_layerwise_casting(storage_dtype=getattr(torch, f"float8_{scheme}"), compute_dtype=torch.float32)
    return bench.diffusers_forward(model, "dev", inp)


# --- the ComfyUI side (worker subprocess) ----------------------------------------------------------


def comfy_run(bench, name: str, inp: dict, log) -> dict:
    import comfy.model_management
    import nodes
    import torch

    start = len(log.records)
    try:
        (patcher,) = nodes.UNETLoader().load_unet(name, "default")
    except Exception as e:  # a finding, recorded
        return {"loaded": False, "error": f"{type(e).__name__}: {e}"[:1500], "log": log.records[start:][-5:]}
    base = patcher.model
    dm = base.diffusion_model
    msgs = log.records[start:]
    held: dict[str, int] = {}
    for t in dm.state_dict().values():
        held[str(t.dtype)] = held.get(str(t.dtype), 0) + t.numel()
    res = {"loaded": True, "model_config": type(base.model_config).__name__, "dtype": str(base.get_dtype()),
           "manual_cast_dtype": str(base.manual_cast_dtype), "values_by_dtype": held,
           "missing": [m for m in msgs if m.startswith("unet missing")],
           "unexpected": [m for m in msgs if m.startswith("unet unexpected")]}  # fmt: skip
    try:
        comfy.model_management.load_models_gpu([patcher])
        with torch.no_grad():
            out = dm(x=inp["x"], timestep=inp["timestep"], context=inp["context"], y=inp["y"], guidance=inp["guidance"])
        res["out"] = bench.pack(out.float())
    except Exception as e:
        res["forward_error"] = f"{type(e).__name__}: {e}"[:1500]
    comfy.model_management.unload_all_models()
    return res


def worker(spec_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    spec = json.loads(spec_path.read_text())
    bench = _gguf_bench()
    bench.stub_torchvision()
    sys.path.insert(0, str(Path(spec["src"]) / "ComfyUI"))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    log = bench._Log()
    folder_paths.add_model_folder_path("diffusion_models", spec["models"])
    inp = load_file(spec["inputs"])
    results, outs = {}, {}
    for name in spec["files"]:
        r = comfy_run(bench, name, inp, log)
        if "out" in r:
            outs[name] = r.pop("out").contiguous()
        results[name] = r
    save_file(outs, spec["out"])
    Path(spec["out"] + ".json").write_text(json.dumps(results, indent=1))


# --- main ------------------------------------------------------------------------------------------


def run(work: Path, comfy_git: str) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from qconvert.tiny import builtin_path

    bench = _gguf_bench()
    src = work / "src"
    info = bench.export_tree(comfy_git, src / "ComfyUI")
    root = builtin_path("slim-flux")
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    inp = bench.make_inputs("dev", 16)  # 16 latent channels (slim-flux: 64 packed)
    inputs = work / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in inp.items()}, str(inputs))
    ref = bench.diffusers_reference("flux", root, "dev", inp)
    result: dict = {"ComfyUI": info, "cases": {}}
    files = {}
    for scheme in SCHEMES:
        t = time.time()
        path = convert(scheme, work / f"out-{scheme}")
        target = models / path.name
        target.unlink(missing_ok=True)
        target.symlink_to(path)
        files[scheme] = path.name
        d = diffusers_side(bench, root, path, scheme, inp)
        result["cases"][scheme] = {"file": path.name, "bytes": path.stat().st_size, "convert_s": round(time.time() - t, 1),
                                   "diffusers_rel_error": bench.rel(d, ref)}  # fmt: skip
    spec = work / "spec.json"
    out = work / "comfy_out.safetensors"
    spec.write_text(json.dumps({"src": str(src), "models": str(models), "files": list(files.values()),
                                "inputs": str(inputs), "out": str(out)}))  # fmt: skip
    r = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ComfyUI worker failed: {r.stderr[-2000:]}")
    comfy, outs = json.loads(Path(str(out) + ".json").read_text()), load_file(str(out))
    for scheme, name in files.items():
        case = result["cases"][scheme]
        case["comfyui"] = comfy[name]
        if name in outs:
            case["comfyui_rel_error"] = bench.rel(outs[name], ref)
            d = diffusers_side(bench, root, models / name, scheme, inp)
            case["comfyui_vs_diffusers_rel"] = bench.rel(outs[name], d)
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/comfyui_fp8_bench"))
    ap.add_argument("--comfy-git", default=COMFY_GIT)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    result = run(a.work, a.comfy_git)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
