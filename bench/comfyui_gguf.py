"""Every family's transformer GGUF through ComfyUI + ComfyUI-GGUF's own code, on CPU (issue 16).

For each family (FLUX.1 dev-shaped, schnell-shaped, Kontext, Fill, Depth/Canny control, Chroma)
this builds the slim width-3072 pipeline (``qconvert.tiny.build_pipeline(slim=True)``), converts
its transformer with ``qconvert flux --backend gguf`` at each scheme, and then:

* loads each file as ComfyUI-GGUF's ``UnetLoaderGGUF.load_unet`` does (its own node function:
  ``gguf_sd_loader`` + ``comfy.sd.load_diffusion_model_state_dict`` with ``GGMLOps``), in a
  fresh subprocess per family (ComfyUI's import-time state and the torchvision stub stay out of
  the main process); records the model class ComfyUI detected, its unet config (in_channels,
  guidance_embed, ...), and the "unet missing" / "unet unexpected" keys ComfyUI logs;
* runs ComfyUI's diffusion model forward (``model.model.diffusion_model``, after
  ``comfy.model_management.load_models_gpu``) on fixed inputs, in float32 (ComfyUI's CPU dtype);
* compares it, as ||a - b|| / ||b||, with the diffusers model of the slim pipeline (the BF16
  source, upcast to float32) on the same inputs: the reference is the source itself, so the BF16
  row checks the whole BFL key mapping (fused qkv order, the final layer's swapped shift/scale)
  and the quantized rows add only their quantization error;
* and, for the same file, the forward of diffusers' ``from_single_file`` +
  ``GGUFQuantizationConfig`` (qconvert's validation loader, the path behind its
  ``forward_rel_error``) on the same inputs, vs the same reference.

Inputs: a 16x16 latent (8x8 tokens after ComfyUI's 2x2 patchify; diffusers gets the same tokens
packed as FluxPipeline packs them, ids as ComfyUI builds them), 16 text tokens, t = 0.5,
guidance 3.5 (0 for Chroma, as diffusers' Chroma hard-codes). Fill (96 ComfyUI channels: latent,
masked image, 8x8 mask) and Control (32: latent, control latent) get their extra channels as one
concatenated ``x``, i.e. what ``model_base.Flux.concat_cond`` hands the model; Kontext gets one
reference latent (``ref_latents``, ComfyUI's default "offset" method: ids [1, row, col], as
diffusers' Kontext pipeline builds them).

Chroma: ComfyUI hard-codes the full model's approximator (in 64, hidden 5120, 5 layers) and 344
modulation vectors (19 double + 38 single blocks: the final layer takes vectors 342-343); the slim
fixture's defaults (16/32/1) cannot load there, which the run records, and the compared Chroma
case is built with the real approximator shape. For the 1+1-block model diffusers' Chroma takes
the final layer's vectors at its own last indices (15-16), so the reference swaps diffusers'
``mod_proj`` buffer (a non-persistent sinusoidal table, not a weight) for the 344-entry one;
weights untouched.

Usage (from the repository root; ~30-40 min on 2 busy cores, < 8 GB RAM)::

    python bench/comfyui_gguf.py [--schemes BF16,Q8_0,Q4_K_S,Q2_K] [--cases dev,schnell,...]

ComfyUI and ComfyUI-GGUF come from the ``fetch`` tool's snapshots (bare git dirs, default
/work/.mirror/Comfy-Org+ComfyUI/repo and /work/.mirror/city96+ComfyUI-GGUF/repo); their HEAD
trees are exported to --work/src (blobs absent from the snapshot are skipped and listed).

Extra packages in the current environment (``pip install --no-deps``; torch stays 2.13.0+cpu):
einops==0.8.2, torchsde==0.2.6, trampoline==0.1.2, sentencepiece==0.2.3, av==16.0.1 (ComfyUI's
nodes.py imports comfy_api, which imports av). torchvision is NOT
installed (PyPI's 0.28.0 is a CUDA build whose ``_C`` does not load with the CPU torch, and in
the shared environment it would change what transformers/diffusers import): the ComfyUI worker
puts a stub ``torchvision`` module in ``sys.modules`` before importing ComfyUI, which imports it
only for models this bench does not build (Stable Cascade, Cosmos, ACE). ComfyUI's frontend
packages, aiohttp, torchaudio, kornia, spandrel, alembic and SQLAlchemy are not needed to
load and run a model from Python and are not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY_GIT = "/work/.mirror/Comfy-Org+ComfyUI/repo"
GGUF_GIT = "/work/.mirror/city96+ComfyUI-GGUF/repo"
SCHEMES = ("BF16", "Q8_0", "Q4_K_S", "Q2_K")

# case -> (qconvert family, build_pipeline changes, what ComfyUI should detect)
CASES: dict[str, tuple[str, dict, dict]] = {
    "dev": ("flux", {}, {"class": "Flux", "in_channels": 16, "guidance_embed": True}),
    "schnell": ("flux", {"guidance_embeds": False}, {"class": "FluxSchnell", "in_channels": 16, "guidance_embed": False}),
    "kontext": ("flux-kontext", {}, {"class": "Flux", "in_channels": 16, "guidance_embed": True}),
    "fill": ("flux-fill", {"in_channels": 384, "out_channels": 64}, {"class": "FluxInpaint", "in_channels": 96}),
    "control": ("flux-control", {"in_channels": 128, "out_channels": 64}, {"class": "Flux", "in_channels": 32}),
    # the fixture's own approximator (16/32/1): ComfyUI builds 64/5120/5, so this is expected to fail
    "chroma-fixture": ("chroma", {}, {"class": "Chroma"}),
    "chroma": ("chroma", {"approximator_num_channels": 64, "approximator_hidden_dim": 5120, "approximator_layers": 5},
               {"class": "Chroma", "in_channels": 64}),
}
CHROMA_MOD_VECTORS = 344  # ComfyUI's fixed mod_index_length (comfy/ldm/chroma/model.py)
# the T5-XXL check is bench/comfyui_t5_gguf.py: it writes the "t5_xxl" entry of this bench's JSON
LATENT = 16  # latent side: 8x8 tokens
TXT = 16


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def git(gdir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={gdir}", *args], check=True, capture_output=True, text=True).stdout


def export_tree(gdir: str, dest: Path) -> dict:
    """HEAD's tree of a bare snapshot into ``dest``; blobs the snapshot lacks are skipped."""
    head = git(gdir, "rev-parse", "HEAD").strip()
    info = {"commit": head, "date": git(gdir, "log", "-1", "--format=%cI").strip(), "skipped_blobs": []}
    if (dest / ".commit").exists() and (dest / ".commit").read_text() == head:
        info["skipped_blobs"] = json.loads((dest / ".skipped").read_text())
        return info
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    rows = [line.split("\t", 1) for line in git(gdir, "ls-tree", "-r", "HEAD").splitlines()]
    for meta, path in rows:
        mode, kind, sha = meta.split()
        if kind != "blob":
            continue
        blob = subprocess.run(["git", f"--git-dir={gdir}", "cat-file", "blob", sha], capture_output=True)
        if blob.returncode:
            info["skipped_blobs"].append(path)
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.stdout)
    (dest / ".skipped").write_text(json.dumps(info["skipped_blobs"]))
    (dest / ".commit").write_text(head)
    return info


# --- inputs and the diffusers side (main process) --------------------------------------------------


def make_inputs(case: str, comfy_in: int) -> dict:
    """ComfyUI-side inputs (unpacked latents); diffusers' are derived from them by ``packed``."""
    import torch

    g = torch.Generator().manual_seed(0)
    inp = {
        "x": torch.randn(1, comfy_in, LATENT, LATENT, generator=g),
        "context": torch.randn(1, TXT, 4096, generator=g),
        "timestep": torch.tensor([0.5]),
    }
    if not case.startswith("chroma"):
        inp["y"] = torch.randn(1, 768, generator=g)
    inp["guidance"] = torch.tensor([0.0 if case.startswith("chroma") else 3.5])
    if case == "kontext":
        inp["ref"] = torch.randn(1, 16, LATENT, LATENT, generator=g)
    return inp


def pack(x):
    """FluxPipeline._pack_latents == ComfyUI's rearrange 'b c (h ph) (w pw) -> b (h w) (c ph pw)'."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def grid_ids(index: float = 0.0):
    import torch

    n = LATENT // 2
    ids = torch.zeros(n, n, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(n)[:, None]
    ids[..., 2] = torch.arange(n)[None, :]
    return ids.reshape(n * n, 3)


def diffusers_forward(model, case: str, inp: dict):
    import torch

    if case.startswith("chroma"):
        chroma_mod_proj(model)
    hidden, ids = pack(inp["x"]), grid_ids()
    if case == "kontext":
        hidden = torch.cat([hidden, pack(inp["ref"])], dim=1)
        ids = torch.cat([ids, grid_ids(1.0)], dim=0)
    kw = dict(hidden_states=hidden, encoder_hidden_states=inp["context"], timestep=inp["timestep"], img_ids=ids,
              txt_ids=torch.zeros(TXT, 3), return_dict=False)
    if "y" in inp:
        kw["pooled_projections"] = inp["y"]
        if model.config.guidance_embeds:
            kw["guidance"] = inp["guidance"]
    with torch.no_grad():
        out = model(**kw)[0]
    return out[:, : (LATENT // 2) ** 2].float()


def chroma_mod_proj(model) -> None:
    """ComfyUI's 344-entry modulation index table in place of diffusers' 17-entry one (see top)."""
    from diffusers.models.embeddings import get_timestep_embedding

    emb = model.time_text_embed
    ch = emb.mod_proj.shape[1]
    import torch

    table = get_timestep_embedding(torch.arange(CHROMA_MOD_VECTORS) * 1000, ch, flip_sin_to_cos=True, downscale_freq_shift=0)
    emb.register_buffer("mod_proj", table.to(emb.mod_proj.dtype), persistent=False)


def diffusers_reference(family: str, root: Path, case: str, inp: dict):
    import torch

    from qconvert.families import family as family_named

    model = family_named(family).transformer_type().from_pretrained(root / "transformer", torch_dtype=torch.float32)
    out = diffusers_forward(model, case, inp)
    del model
    return out


def diffusers_gguf(family: str, root: Path, path: Path, case: str, inp: dict) -> dict:
    """qconvert's validation loader (diffusers from_single_file + GGUFQuantizationConfig), float32."""
    import torch
    from diffusers import GGUFQuantizationConfig

    from qconvert.families import family as family_named

    try:
        model = family_named(family).transformer_type().from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(root), subfolder="transformer", dtype=torch.float32)  # fmt: skip
        out = diffusers_forward(model, case, inp)
        del model
        return {"out": out}
    except Exception as e:  # a finding, recorded
        return {"error": f"{type(e).__name__}: {e}"[:600]}


def convert(root: Path, scheme: str, out: Path) -> tuple[Path, float]:
    t = time.time()
    cmd = ["qconvert", "flux", "--source", str(root), "--backend", "gguf", "--scheme", scheme,
           "--components", "transformer", "--out", str(out), "--no-validate", "--overwrite", "-q"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")
    (path,) = sorted(out.glob("*.gguf"))
    return path, time.time() - t


def gguf_facts(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {"file": path.name, "bytes": path.stat().st_size, "architecture": str(arch.parts[arch.data[-1]], "utf-8"),
            "tensors": len(reader.tensors), "tensor_types": kinds}  # fmt: skip


# --- the ComfyUI side (worker subprocess) ----------------------------------------------------------


def stub_torchvision() -> None:
    import importlib.machinery
    import types

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            mod = _Stub(f"{self.__name__}.{name}")
            setattr(self, name, mod)
            sys.modules[mod.__name__] = mod
            return mod

        def __call__(self, *a, **k):
            raise RuntimeError(f"{self.__name__} is a stub (torchvision is not installed)")

    tv = _Stub("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv.__file__ = None
    sys.modules["torchvision"] = tv
    for sub in ("transforms", "models", "ops", "io"):
        getattr(tv, sub)


def import_comfy(src: Path):
    """ComfyUI with --cpu, and ComfyUI-GGUF's nodes module as ComfyUI would load the custom node."""
    import importlib.util

    stub_torchvision()
    sys.path.insert(0, str(src / "ComfyUI"))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    pkg = src / "ComfyUI-GGUF"
    spec = importlib.util.spec_from_file_location("ComfyUI_GGUF", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_GGUF"] = mod
    spec.loader.exec_module(mod)
    return sys.modules["ComfyUI_GGUF.nodes"]


class _Log:
    def __init__(self):
        import logging

        self.records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: self.records.append(r.getMessage())
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)


def comfy_load_and_run(nodes, log: _Log, name: str, case: str, inp: dict) -> dict:
    import comfy.model_management
    import torch

    start = len(log.records)
    try:
        (patcher,) = nodes.UnetLoaderGGUF().load_unet(name)
    except Exception as e:
        return {"loaded": False, "error": f"{type(e).__name__}: {e}"[:1500], "log": log.records[start:][-5:]}
    base = patcher.model
    dm = base.diffusion_model
    params = getattr(dm, "params", None)
    msgs = log.records[start:]
    res = {
        "loaded": True,
        "model_base": f"{type(base).__module__}.{type(base).__name__}",
        "model_config": type(base.model_config).__name__,
        "unet_config": {k: v for k, v in base.model_config.unet_config.items() if isinstance(v, (int, float, str, bool, list))},
        "in_channels": getattr(params, "in_channels", None),
        "guidance_embed": getattr(params, "guidance_embed", None),
        "dtype": str(base.get_dtype()), "manual_cast_dtype": str(base.manual_cast_dtype),
        "missing": [m for m in msgs if m.startswith("unet missing")],
        "unexpected": [m for m in msgs if m.startswith("unet unexpected")],
    }  # fmt: skip
    try:
        comfy.model_management.load_models_gpu([patcher])
        kw = dict(x=inp["x"], timestep=inp["timestep"], context=inp["context"], guidance=inp["guidance"])
        if "y" in inp:
            kw["y"] = inp["y"]
        if case == "kontext":
            kw["ref_latents"] = [inp["ref"]]
        with torch.no_grad():
            out = dm(**kw)
        res["out"] = pack(out.float())
    except Exception as e:
        res["forward_error"] = f"{type(e).__name__}: {e}"[:1500]
    del patcher, base, dm
    comfy.model_management.unload_all_models()
    return res


def worker(spec_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    spec = json.loads(spec_path.read_text())
    nodes = import_comfy(Path(spec["src"]))
    import folder_paths

    log = _Log()
    folder_paths.add_model_folder_path("diffusion_models", spec["models"])
    inp = load_file(spec["inputs"])
    results, outs = {}, {}
    for name in spec["files"]:
        r = comfy_load_and_run(nodes, log, name, spec["case"], inp)
        if "out" in r:
            outs[name] = r.pop("out").contiguous()
        results[name] = r
    save_file(outs, spec["out"])
    Path(spec["out"] + ".json").write_text(json.dumps(results, indent=1))


def run_comfy(src: Path, models: Path, files: list[str], case: str, inputs: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    out = models / "comfy_out.safetensors"
    spec = models / "spec.json"
    spec.write_text(json.dumps({"src": str(src), "models": str(models), "files": files, "case": case,
                                "inputs": str(inputs), "out": str(out)}))  # fmt: skip
    r = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ComfyUI worker failed: {r.stderr[-2000:]}")
    return json.loads(Path(str(out) + ".json").read_text()), load_file(out)


# --- one case --------------------------------------------------------------------------------------


def run_case(case: str, schemes: list[str], work: Path, src: Path) -> dict:
    import gc

    from safetensors.torch import save_file

    from qconvert.tiny import build_pipeline

    family, changes, expect = CASES[case]
    d = work / case
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    root = d / f"slim-{case}"
    t = time.time()
    build_pipeline(root, family=family, slim=True, **changes)
    row: dict = {"family": family, "build_changes": changes, "expected": expect, "build_s": round(time.time() - t, 1)}
    comfy_in = (changes.get("in_channels", 64) // 4) if not family == "chroma" else 16
    inp = make_inputs(case, comfy_in)
    save_file({k: v.contiguous() for k, v in inp.items()}, d / "inputs.safetensors")
    ref = diffusers_reference(family, root, case, inp)
    gc.collect()
    models = d / "models"
    models.mkdir()
    files, per = [], {}
    for s in (schemes if case != "chroma-fixture" else ["BF16"]):
        path, secs = convert(root, s, d / f"out-{s}")
        shutil.move(str(path), models / path.name)
        files.append(path.name)
        per[path.name] = {"scheme": s, "convert_s": round(secs, 1), **gguf_facts(models / path.name)}
    comfy, outs = run_comfy(src, models, files, case, d / "inputs.safetensors")
    bf16_comfy = next((outs[f] for f in files if per[f]["scheme"] == "BF16" and f in outs), None)
    for f in files:
        r = {**per[f], **comfy[f]}
        if f in outs:
            r["comfy_vs_source"] = rel(outs[f], ref)
            if bf16_comfy is not None:
                r["comfy_vs_comfy_bf16"] = rel(outs[f], bf16_comfy)
        dg = diffusers_gguf(family, root, models / f, case, inp) if comfy[f].get("loaded") else {"error": "skipped"}
        if "out" in dg:
            r["diffusers_gguf_vs_source"] = rel(dg["out"], ref)
            if f in outs:
                r["comfy_vs_diffusers_gguf"] = rel(outs[f], dg["out"])
        else:
            r["diffusers_gguf_error"] = dg["error"]
        gc.collect()
        per[f] = r
        print(json.dumps({"case": case, **{k: v for k, v in r.items() if k not in ("unet_config",)}}), flush=True)
    row["files"] = per
    shutil.rmtree(d)
    return row


def environment(infos: dict) -> dict:
    import diffusers
    import gguf
    import torch
    import transformers

    qc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "qconvert"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "")
    return {"comfyui": infos["ComfyUI"], "comfyui_gguf": infos["ComfyUI-GGUF"], "qconvert_commit": qc,
            "qconvert_dirty_files": dirty.splitlines(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "gguf": getattr(gguf, "__version__", "?"),
            "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}  # fmt: skip


def _cell(v) -> str:
    return "—" if v is None else "0 (exact)" if v == 0 else (f"{v:.2e}" if v < 1e-3 else f"{v:.4f}")


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a run's JSON."""
    lines = ["| case (family) | scheme | file | MB | ComfyUI model | in_channels | missing / unexpected | "
             "ComfyUI vs source | diffusers GGUF vs source | ComfyUI vs diffusers GGUF |", "|---" * 10 + "|"]
    for case, row in result["cases"].items():
        if "files" not in row:
            lines.append(f"| {case} | — | — | — | **error**: {row.get('error', '')[:200]} | | | | | |")
            continue
        for r in row["files"].values():
            if not r.get("loaded"):
                model, keys = f"**not loaded**: `{' '.join(r.get('error', '').split())[:190]}`", "—"
            else:
                model = f"{r['model_config']} (`{r['model_base']}`)"
                keys = f"{len(r['missing'])} / {len(r['unexpected'])}"
            dg = _cell(r.get("diffusers_gguf_vs_source"))
            if r.get("diffusers_gguf_error", "skipped") != "skipped":
                dg = f"error: `{r['diffusers_gguf_error'][:120]}`"
            lines.append(f"| {case} ({row['family']}) | {r['scheme']} | `{r['file']}` | {r['bytes'] / 1e6:.0f} | {model} | "
                         f"{r.get('in_channels', '—')} | {keys} | {_cell(r.get('comfy_vs_source'))} | {dg} | "
                         f"{_cell(r.get('comfy_vs_diffusers_gguf'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--schemes", default="BF16,Q8_0,Q4_K_S")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/comfyui_gguf_bench"))
    ap.add_argument("--comfy-git", default=COMFY_GIT)
    ap.add_argument("--gguf-git", default=GGUF_GIT)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "comfyui_gguf.json")
    ap.add_argument("--markdown", action="store_true", help="print the docs table of --json and stop")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    if a.markdown:
        return print(markdown(json.loads(a.json.read_text())))
    src = a.work / "src"
    infos = {"ComfyUI": export_tree(a.comfy_git, src / "ComfyUI"), "ComfyUI-GGUF": export_tree(a.gguf_git, src / "ComfyUI-GGUF")}
    t5 = json.loads(a.json.read_text()).get("t5_xxl") if a.json.exists() else None  # kept across reruns
    result = {"environment": environment(infos), "schemes": a.schemes.split(","), "cases": {}, "t5_xxl": t5}
    print(json.dumps(result["environment"]), flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    for case in a.cases.split(","):
        t = time.time()
        try:
            result["cases"][case] = run_case(case, a.schemes.split(","), a.work, src)
        except Exception as e:
            result["cases"][case] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(json.dumps({"case": case, "error": result["cases"][case]["error"]}), flush=True)
        result["cases"][case]["case_s"] = round(time.time() - t, 1)
        a.json.write_text(json.dumps(result, indent=1) + "\n")  # after each case: partial runs keep their rows


if __name__ == "__main__":
    main()
