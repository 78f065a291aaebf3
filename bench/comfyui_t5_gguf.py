"""The T5-XXL GGUF through ComfyUI-GGUF's CLIP loader vs transformers, on CPU (issue 16).

ComfyUI builds the T5 of Flux from a fixed T5-XXL config (``comfy/text_encoders/t5_config_xxl.json``:
24 blocks, d_model 4096, d_ff 10240, 64 heads), so only a T5-XXL-shaped encoder can show how
qconvert's T5 GGUF loads there. This bench:

* writes a FLUX.1 pipeline folder whose ``text_encoder_2`` is a T5-XXL-shaped T5EncoderModel with
  seeded random bf16 weights (``bench/make_full_size.py``'s builder, 4.76B params, 9.5 GB) and whose
  transformer is the built-in slim one (1+1 blocks: cheap; ``qconvert flux`` wants a transformer);
* converts only the T5 with ``qconvert flux --backend gguf --components text_encoder_2`` per scheme;
* writes a CLIP-L-shaped stand-in (random ``CLIPTextModelWithProjection`` with ComfyUI's own
  ``sd1_clip_config.json``, 123M params) because Flux's node is the dual loader;
* in a ComfyUI worker subprocess, per file: ``DualCLIPLoaderGGUF().load_clip(clip_l, t5, "flux")``
  (ComfyUI-GGUF's node function: ``gguf_clip_loader`` + ``comfy.sd.load_text_encoder_state_dicts``
  with ``GGMLOps``), records the model ComfyUI built, the T5 dtype, and the "clip missing" /
  "clip unexpected" keys it logs; tokenizes a fixed prompt with the CLIP object's own tokenizer
  (``clip.tokenize``: Flux's T5 tokenizer pads to 256 tokens) and encodes it with
  ``clip.encode_from_tokens``: for Flux the cond is the T5's last hidden state (after the final
  layer norm, no projection, no attention mask), float32;
* in a reference subprocess, transformers' ``T5EncoderModel`` of the bf16 source computing in
  float32 on the SAME token ids (no attention mask, as ComfyUI's Flux T5). To keep memory at one
  bf16 copy (~10 GB) instead of an fp32 one (19 GB), each block is upcast to float32 just before it
  runs and cast back after (bf16 -> fp32 -> bf16 is exact, so this is the fp32 model's arithmetic);
* relative error ||comfy - ref|| / ||ref|| per scheme, over all 256 positions and over the prompt's
  own tokens (up to and with the end token).

One big model is in memory at a time (ComfyUI's worker, then the reference). Needs ~15 GB free RAM
and ~27 GB of disk under --work (source 9.5 GB, BF16 9.5 GB, Q8_0 5.1 GB, Q4_K_S 2.7 GB); the
work folder is deleted at the end unless --keep. Results go into the ``t5_xxl`` entry of
bench/comfyui_gguf.json (the transformer bench keeps that entry when it reruns).

Usage (from the repository root; ~20-30 min on 2 busy cores)::

    python bench/comfyui_t5_gguf.py [--schemes BF16,Q8_0,Q4_K_S] [--min-free-gb 16]

ComfyUI/ComfyUI-GGUF sources and the extra packages: as for bench/comfyui_gguf.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_gguf as cg  # noqa: E402  (the sibling bench: sources, ComfyUI import, environment)

PROMPT = "a photo of a red fox sitting in the snow at golden hour, 35mm film, shallow depth of field"
FP32_TAG = " --fp32-text-enc"
FP16_TAG = " fp16-dequant"


def mem_available_gb() -> float:
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
    return int(line.split()[1]) / 2**20


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# --- inputs (main process) -------------------------------------------------------------------------


def build_source(src: Path) -> dict:
    """make_full_size's T5-XXL text_encoder_2 + the slim transformer, as a pipeline folder."""
    import make_full_size

    from qconvert.tiny import builtin_path

    t = time.time()
    report = {} if (src / "text_encoder_2" / "config.json").exists() else make_full_size.build(src, ["text_encoder_2"])
    if not (src / "transformer").exists():
        shutil.copytree(builtin_path("slim-flux") / "transformer", src / "transformer")
    return {"text_encoder_2": report.get("text_encoder_2", "reused"), "build_s": round(time.time() - t, 1)}


def convert_t5(src: Path, scheme: str, out: Path) -> tuple[Path, float]:
    t = time.time()
    cmd = ["qconvert", "flux", "--source", str(src), "--backend", "gguf", "--scheme", scheme,
           "--components", "text_encoder_2", "--out", str(out), "--no-validate", "--overwrite", "-q"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")
    (path,) = sorted(out.glob("t5xxl-*.gguf"))
    return path, time.time() - t


def write_clip_l(path: Path, comfy_src: Path) -> int:
    """A random CLIP-L-shaped text encoder (ComfyUI's own clip_l config), bf16 safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = json.loads((comfy_src / "ComfyUI" / "comfy" / "sd1_clip_config.json").read_text())
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path)
    return sum(v.numel() for v in sd.values())


# --- the ComfyUI side (worker subprocess) ----------------------------------------------------------


def _keys(msgs: list[str], tag: str) -> list[str]:
    import ast

    out: list[str] = []
    for m in msgs:
        if m.startswith(tag):
            try:
                out += list(ast.literal_eval(m[len(tag):].strip()))
            except (ValueError, SyntaxError):
                out.append(m)
    return out


def comfy_encode(nodes, log, clip_l: str, t5: str) -> dict:
    import comfy.model_management

    start = len(log.records)
    t = time.time()
    try:
        (clip,) = nodes.DualCLIPLoaderGGUF().load_clip(clip_l, t5, "flux")
    except Exception as e:
        return {"loaded": False, "error": f"{type(e).__name__}: {e}"[:1500], "log": log.records[start:][-5:]}
    msgs = log.records[start:]
    cond_model = clip.cond_stage_model
    t5m = cond_model.t5xxl
    missing, unexpected = _keys(msgs, "clip missing:"), _keys(msgs, "clip unexpected:")
    res = {
        "loaded": True, "load_s": round(time.time() - t, 1),
        "cond_stage_model": type(cond_model).__mro__[1].__name__,  # flux_clip() returns a subclass
        "t5_module": f"{type(t5m).__module__}.{type(t5m).__name__}",
        "t5_blocks": len(t5m.transformer.encoder.block),
        "t5_wi_0_shape": list(t5m.transformer.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.shape),
        "t5_dtype": str(getattr(t5m.transformer, "dtype", None)),
        "model_dtypes": sorted(str(d) for d in cond_model.dtypes),
        "t5_missing": [k for k in missing if not k.startswith("text_model")],
        "t5_unexpected": [k for k in unexpected if not k.startswith("text_model")],
        "clip_l_missing": [k for k in missing if k.startswith("text_model")],
        "clip_l_unexpected": [k for k in unexpected if k.startswith("text_model")],
        "warnings": [m for m in msgs if not m.startswith(("clip missing", "clip unexpected"))][-12:],
    }  # fmt: skip
    tokens = clip.tokenize(PROMPT)
    t = time.time()
    cond = clip.encode_from_tokens(tokens)
    res["encode_s"] = round(time.time() - t, 1)
    res["ids"] = [int(tok) for tok, _w in tokens["t5xxl"][0]]
    res["weights_all_one"] = all(w == 1.0 for _t, w in tokens["t5xxl"][0])
    res["cond_shape"], res["cond_dtype"] = list(cond.shape), str(cond.dtype)
    res["out"] = cond.float()
    del clip, cond_model, t5m
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return res


def worker(spec_path: Path) -> None:
    import gc
    import logging

    from safetensors.torch import save_file

    spec = json.loads(spec_path.read_text())
    nodes = cg.import_comfy(Path(spec["src"]))
    import folder_paths

    log = cg._Log()
    logging.getLogger().setLevel(logging.DEBUG)  # "clip unexpected" is logged at debug level
    folder_paths.add_model_folder_path("clip", spec["models"])
    import comfy.cli_args

    results, outs = {}, {}
    for name, fp32 in spec["runs"]:
        comfy.cli_args.args.fp32_text_enc = fp32  # read when the CLIP object is built
        r = comfy_encode(nodes, log, spec["clip_l"], name)
        r["fp32_text_enc"] = fp32
        name = name + FP32_TAG * fp32
        if "out" in r:
            outs[name] = r.pop("out").contiguous()
        r["peak_rss_gb_so_far"] = peak_rss_gb()
        results[name] = r
        gc.collect()
        print(json.dumps({name: {k: v for k, v in r.items() if k != "ids"}}), flush=True)
    save_file(outs, spec["out"])
    Path(spec["out"] + ".json").write_text(json.dumps(results, indent=1))


# --- the transformers side (reference subprocess) --------------------------------------------------


def upcast_blockwise(model) -> None:
    """Run each T5 block in float32 from the bf16 weights: upcast before, back to bf16 after."""
    import torch

    def up(mod, _args):
        mod.float()

    def down(mod, _args, _out):
        mod.to(torch.bfloat16)

    for blk in model.encoder.block:
        blk.register_forward_pre_hook(up)
        blk.register_forward_hook(down)
    model.shared.float()
    model.encoder.final_layer_norm.float()


def reference(spec_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import T5EncoderModel, T5TokenizerFast

    spec = json.loads(spec_path.read_text())
    t = time.time()
    model = T5EncoderModel.from_pretrained(spec["t5"], dtype=torch.bfloat16).eval()
    load_s = time.time() - t
    upcast_blockwise(model)
    ids = torch.tensor([spec["ids"]])
    t = time.time()
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state.float()
    # the tokenizer FluxPipeline users load (ComfyUI ships the same T5 tokenizer files)
    tok = T5TokenizerFast.from_pretrained(str(Path(spec["src"]) / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer"))
    hf_ids = tok(PROMPT).input_ids
    save_file({"hidden": hidden.contiguous()}, spec["out"])
    info = {"load_s": round(load_s, 1), "forward_s": round(time.time() - t, 1), "dtype_weights": "bfloat16",
            "compute_dtype": "float32 (blockwise upcast)", "transformers_tokenizer_ids": hf_ids,
            "peak_rss_gb": peak_rss_gb()}  # fmt: skip
    Path(spec["out"] + ".json").write_text(json.dumps(info, indent=1))


def dequant_fp16_q8_0(data):
    """Q8_0 as ComfyUI-GGUF dequantizes it by default (dequant_dtype None): fp16 scale x int8 in fp16."""
    import numpy as np

    blocks = data.reshape(-1, 34)
    d, q = blocks[:, :2].copy().view(np.float16), blocks[:, 2:].view(np.int8)
    return (d * q.astype(np.float16)).reshape(*data.shape[:-1], -1)


def from_gguf_blockwise(model, path: str, fp16_q8_0: bool = False) -> None:
    """Give ``model`` the GGUF's own dequantized tensors (float32), each block just before it runs.

    gguf-py dequantizes in float32; ``fp16_q8_0`` rounds Q8_0's products to fp16 as ComfyUI-GGUF does."""
    import gguf
    import torch

    from qconvert.convert.gguf import t5_gguf_name

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def load(mod, prefix: str) -> None:
        for n, p in mod.named_parameters():
            t = tensors[t5_gguf_name(prefix + n)]
            q8 = fp16_q8_0 and t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            w = dequant_fp16_q8_0(t.data) if q8 else gguf.quants.dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(w.astype("float32")).reshape(p.shape)
            p.data = w

    def up(i):
        return lambda mod, _a: load(mod, f"encoder.block.{i}.")

    def drop(mod, _a, _o):
        for p in mod.parameters():
            p.data = torch.empty(0)  # one forward only: free the block

    for i, blk in enumerate(model.encoder.block):
        blk.register_forward_pre_hook(up(i))
        blk.register_forward_hook(drop)
    load(model.shared, "shared.")
    load(model.encoder.final_layer_norm, "encoder.final_layer_norm.")


def reference_gguf(spec_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    spec = json.loads(spec_path.read_text())
    outs, info = {}, {}
    runs = [(n, p, False) for n, p in spec["files"].items()]
    runs += [(n + FP16_TAG, p, True) for n, p in spec["files"].items() if "Q8_0" in n]
    for name, path, fp16 in runs:
        t = time.time()
        model = T5EncoderModel.from_pretrained(spec["t5"], dtype=torch.bfloat16).eval()  # structure + config
        from_gguf_blockwise(model, path, fp16)
        with torch.no_grad():
            outs[name] = model(input_ids=torch.tensor([spec["ids"]])).last_hidden_state.float().contiguous()
        del model
        info[name] = {"seconds": round(time.time() - t, 1), "peak_rss_gb_so_far": peak_rss_gb()}
    save_file(outs, spec["out"])
    Path(spec["out"] + ".json").write_text(json.dumps(info, indent=1))


def sanity_upcast() -> float:
    """The blockwise upcast equals a float32 model on a small T5 (same arithmetic, asserted)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=100, d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=3,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    torch.manual_seed(0)
    m32 = T5EncoderModel(cfg).eval().to(torch.bfloat16).float()
    m16 = T5EncoderModel(cfg).eval().to(torch.bfloat16)
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m32.state_dict().items()})
    upcast_blockwise(m16)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return cg.rel(m16(input_ids=ids).last_hidden_state, m32(input_ids=ids).last_hidden_state)


def _sub(mode: str, spec: Path) -> None:
    r = subprocess.run([sys.executable, __file__, mode, str(spec)], capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    if r.returncode:
        raise RuntimeError(f"{mode} failed: {r.stderr[-2500:]}")


# --- main ------------------------------------------------------------------------------------------


def compare(comfy: dict, outs: dict, ref, files: dict, ref_gguf: dict) -> dict:
    """Per ComfyUI run: vs the source; quantized files also vs transformers on the file's weights."""
    rows = {}
    for name, r in comfy.items():
        file = name.removesuffix(FP32_TAG)
        row = {**files[file], **{k: v for k, v in r.items() if k != "ids"}}
        if name in outs:
            out = outs[name]
            n = r["ids"].index(1) + 1 if 1 in r["ids"] else len(r["ids"])  # prompt tokens incl. </s>
            row["rel_error_all_256"] = cg.rel(out, ref)
            row["rel_error_prompt_tokens"] = cg.rel(out[:, :n], ref[:, :n])
            row["max_abs_error"] = float((out.double() - ref.double()).abs().max())
            row["prompt_tokens"] = n
            if file in ref_gguf:  # same dequantized weights in transformers: isolates how ComfyUI reads the file
                row["rel_error_vs_transformers_on_this_gguf"] = cg.rel(out, ref_gguf[file])
                row["transformers_on_this_gguf_vs_source"] = cg.rel(ref_gguf[file], ref)
            if file + FP16_TAG in ref_gguf:  # ... with Q8_0 dequantized in fp16 as ComfyUI-GGUF does
                row["rel_error_vs_transformers_on_this_gguf_fp16_dequant"] = cg.rel(out, ref_gguf[file + FP16_TAG])
        rows[name] = row
    return rows


def run(a) -> dict:
    from safetensors.torch import load_file

    src_tree = a.work / "src"
    infos = {"ComfyUI": cg.export_tree(a.comfy_git, src_tree / "ComfyUI"),
             "ComfyUI-GGUF": cg.export_tree(a.gguf_git, src_tree / "ComfyUI-GGUF")}  # fmt: skip
    res: dict = {"environment": cg.environment(infos), "prompt": PROMPT, "loader": "DualCLIPLoaderGGUF(type=flux)"}
    res["upcast_sanity_rel"] = sanity_upcast()
    pipe, models = a.source or a.work / "pipe", a.work / "models"
    models.mkdir(parents=True, exist_ok=True)
    res["source"] = build_source(pipe)
    files = {}
    for s in a.schemes.split(","):
        done = sorted(models.glob(f"t5xxl-*-{s}.gguf"))  # a rerun reuses its conversions
        if done:
            path, secs = done[0], None
        else:
            path, secs = convert_t5(pipe, s, a.work / f"out-{s}")
            shutil.move(str(path), models / path.name)
            shutil.rmtree(a.work / f"out-{s}")
        files[path.name] = {"scheme": s, "convert_s": None if secs is None else round(secs, 1), **cg.gguf_facts(models / path.name)}
        print(json.dumps(files[path.name]), flush=True)
    res["clip_l_standin_params"] = write_clip_l(models / "clip_l-standin.safetensors", src_tree)
    spec = a.work / "spec.json"
    out = a.work / "comfy_out.safetensors"
    runs = [(f, False) for f in files] + [(f, True) for f, r in files.items() if r["scheme"] in a.fp32_text_enc.split(",")]
    spec.write_text(json.dumps({"src": str(src_tree), "models": str(models), "runs": runs,
                                "clip_l": "clip_l-standin.safetensors", "out": str(out)}))  # fmt: skip
    _sub("--worker", spec)
    comfy, outs = json.loads(Path(str(out) + ".json").read_text()), load_file(out)
    ids = next(r["ids"] for r in comfy.values() if "ids" in r)
    res["ids"] = ids
    ref_out = a.work / "ref_out.safetensors"
    spec.write_text(json.dumps({"src": str(src_tree), "t5": str(pipe / "text_encoder_2"), "ids": ids, "out": str(ref_out)}))
    _sub("--reference", spec)
    res["reference"] = json.loads(Path(str(ref_out) + ".json").read_text())
    res["reference"]["ids_match_comfy"] = ids[: len(res["reference"]["transformers_tokenizer_ids"])] == res["reference"]["transformers_tokenizer_ids"]
    quantized = {f: str(models / f) for f, r in files.items() if r["scheme"] != "BF16"}
    gguf_out = a.work / "ref_gguf_out.safetensors"
    spec.write_text(json.dumps({"t5": str(pipe / "text_encoder_2"), "ids": ids, "files": quantized, "out": str(gguf_out)}))
    _sub("--reference-gguf", spec)
    res["reference_gguf"] = json.loads(Path(str(gguf_out) + ".json").read_text())
    res["files"] = compare(comfy, outs, load_file(ref_out)["hidden"], files, load_file(gguf_out))
    return res


def save(json_path: Path, entry: dict) -> None:
    """Into the ``t5_xxl`` entry; the runs before it are kept under ``earlier_runs`` (no environment)."""
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    old = data.get("t5_xxl") or {}
    earlier = old.pop("earlier_runs", [])
    if "files" in old or "error" in old:
        earlier.append({k: v for k, v in old.items() if k not in ("environment", "ids")})
    data["t5_xxl"] = {**entry, "earlier_runs": earlier}
    json_path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference-gguf", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fp32-text-enc", default="BF16", help="schemes also run with ComfyUI's --fp32-text-enc")
    ap.add_argument("--schemes", default="BF16,Q8_0,Q4_K_S")
    ap.add_argument("--work", type=Path, default=Path("/tmp/comfyui_t5_bench"))
    ap.add_argument("--comfy-src", type=Path, default=Path("/tmp/comfyui_gguf_bench/src"),
                    help="an exported tree from bench/comfyui_gguf.py to reuse (else exported again)")  # fmt: skip
    ap.add_argument("--comfy-git", default=cg.COMFY_GIT)
    ap.add_argument("--gguf-git", default=cg.GGUF_GIT)
    ap.add_argument("--source", type=Path, help="an existing folder from a previous run (kept afterwards)")
    ap.add_argument("--min-free-gb", type=float, default=16.0)
    ap.add_argument("--keep", action="store_true", help="keep --work (source, GGUFs) afterwards")
    ap.add_argument("--json", type=Path, default=cg.ROOT / "bench" / "comfyui_gguf.json")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    if a.reference:
        return reference(a.reference)
    if a.reference_gguf:
        return reference_gguf(a.reference_gguf)
    free = mem_available_gb()
    if free < a.min_free_gb:
        save(a.json, {"skipped": f"MemAvailable {free:.1f} GB < {a.min_free_gb} GB needed (one T5-XXL in memory at a time)"})
        raise SystemExit(f"not enough free memory: {free:.1f} GB available, {a.min_free_gb} GB needed")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.comfy_src.exists() and not (a.work / "src").exists():
        (a.work / "src").symlink_to(a.comfy_src)
    t = time.time()
    entry = {"mem_available_gb_at_start": round(free, 1)}
    try:
        entry |= run(a)
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"[:3000]
    entry["run_s"] = round(time.time() - t, 1)
    entry["children_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    save(a.json, entry)
    print(json.dumps({k: v for k, v in entry.items() if k not in ("ids", "environment")}, indent=1), flush=True)
    if not a.keep:
        shutil.rmtree(a.work / "pipe", ignore_errors=True)
        shutil.rmtree(a.work / "models", ignore_errors=True)


if __name__ == "__main__":
    main()
