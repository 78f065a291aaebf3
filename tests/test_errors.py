"""Reliability: every expected failure is one line, a documented exit code, no traceback,
and nothing left behind (issue: bad input, interruptions and secrets)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, export_bfl, invoke, run_cli

ST = "diffusion_pytorch_model.safetensors"


def _copy_tiny(tiny: Path, tmp: Path, name: str = "src") -> Path:
    d = tmp / name
    shutil.copytree(tiny, d)
    return d


def _edit_transformer(tiny: Path, tmp: Path, edit) -> Path:
    d = _copy_tiny(tiny, tmp)
    f = d / "transformer" / ST
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))
    return d


def _model_index(tmp: Path, cls: str) -> Path:
    d = tmp / "other"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return d


def _single_file(tmp: Path, keys: list[str]) -> Path:
    f = tmp / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(f))
    return f


def _nan(sd):
    sd["proj_out.weight"][0, 0] = float("nan")


def _bad_shape(sd):
    sd["proj_out.weight"] = torch.zeros(3, 3)


def _int_dtype(sd):
    sd["proj_out.weight"] = sd["proj_out.weight"].to(torch.int32)


def _missing_weight(sd):
    del sd["proj_out.weight"]


def _corrupt_header(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    f = d / "transformer" / ST
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"\xff" * 12
    f.write_bytes(bytes(raw))
    return d


def _string_offsets(tiny, tmp):
    """A header whose data_offsets are strings (json.loads accepts it; arithmetic would not)."""
    d = _copy_tiny(tiny, tmp)
    f = d / "transformer" / ST
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [str(v) for v in header[key]["data_offsets"]]
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    return d


def _huge_header_len(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    f = d / "transformer" / ST
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(raw))
    return d


def _truncated(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    f = d / "transformer" / ST
    f.write_bytes(f.read_bytes()[:-64])
    return d


def _no_component(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    shutil.rmtree(d / "vae")
    return d


def _bad_index_json(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    (d / "model_index.json").write_text("{not json")
    return d


def _pickle_only(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    (d / "transformer" / ST).unlink()
    (d / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04.")
    return d


def _already_quantized(tiny, tmp):
    d = _copy_tiny(tiny, tmp)
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (d / "transformer" / "config.json").write_text(json.dumps(cfg))
    return d


# name -> (args after `flux`, or a builder returning the --source path; expected exit; text)
FLUX_CASES = {
    "missing path": (lambda t, d: str(d / "nope"), 3, "not found"),
    "empty folder": (lambda t, d: str((d / "e").mkdir() or d / "e"), 3, "model_index.json"),
    "sd pipeline": (lambda t, d: str(_model_index(d, "StableDiffusionPipeline")), 3, "Stable Diffusion"),
    "sdxl pipeline": (lambda t, d: str(_model_index(d, "StableDiffusionXLPipeline")), 3, "XL"),
    "sd3 pipeline": (lambda t, d: str(_model_index(d, "StableDiffusion3Pipeline")), 3, "Stable Diffusion 3"),
    "lora file": (lambda t, d: str(_single_file(d, ["lora_unet_a.lora_down.weight"])), 3, "LoRA"),
    "sdxl single file": (lambda t, d: str(_single_file(d, ["conditioner.embedders.0.w"])), 3, "XL"),
    "vae single file": (lambda t, d: str(_single_file(d, ["decoder.up_blocks.0.w"])), 3, "VAE"),
    "pickle checkpoint": (lambda t, d: str((d / "m.ckpt").write_bytes(b"x") and d / "m.ckpt"), 3, "pickle"),
    "text file": (lambda t, d: str((d / "m.txt").write_text("x") and d / "m.txt"), 3, "not a .safetensors"),
    "truncated safetensors": (lambda t, d: str(_truncated(t, d)), 3, "truncated"),
    "corrupt header": (lambda t, d: str(_corrupt_header(t, d)), 3, "header"),
    "huge header length": (lambda t, d: str(_huge_header_len(t, d)), 3, "header"),
    "string offsets in header": (lambda t, d: str(_string_offsets(t, d)), 3, "malformed offsets"),
    "nan weight": (lambda t, d: str(_edit_transformer(t, d, _nan)), 3, "NaN"),
    "shape mismatch": (lambda t, d: str(_edit_transformer(t, d, _bad_shape)), 3, "shape"),
    "integer weight": (lambda t, d: str(_edit_transformer(t, d, _int_dtype)), 3, "dtype"),
    "missing weight": (lambda t, d: str(_edit_transformer(t, d, _missing_weight)), 3, "missing"),
    "missing component": (lambda t, d: str(_no_component(t, d)), 3, "vae"),
    "model_index not json": (lambda t, d: str(_bad_index_json(t, d)), 3, "JSON"),
    "pickle-only component": (lambda t, d: str(_pickle_only(t, d)), 3, "pickle"),
    "already quantized": (lambda t, d: str(_already_quantized(t, d)), 3, "already quantized"),
}

OPTION_CASES = {
    "unknown backend": (["--backend", "onnx", "--scheme", "int8wo"], 2, "backend"),
    "torchao unknown scheme": (["--scheme", "int3"], 2, "scheme"),
    "bnb unknown scheme": (["--backend", "bnb", "--scheme", "nf3"], 2, "scheme"),
    "gguf unknown scheme": (["--backend", "gguf", "--scheme", "Q9_K"], 2, "scheme"),
    "gguf IQ type": (["--backend", "gguf", "--scheme", "IQ2_XXS"], 2, "scheme"),
    "bad component": (["--components", "vae"], 2, "components"),
    "bad shard size": (["--max-shard-size", "lots"], 2, "shard"),
    "infinite shard size": (["--max-shard-size", "infGB"], 2, "shard"),
    "option the backend does not read": (["--layout", "bfl"], 2, "does not take 'layout'"),
    "shards for gguf": (["--backend", "gguf", "--scheme", "Q8_0", "--max-shard-size", "5GB"], 2, "max_shard_size"),
    "empty component list": (["--components", ""], 2, "components"),
    "push option without --push": (["--repo-id", "acme/x"], 2, "only applies with --push"),
    "revision of a local source": (["--revision", "main"], 2, "--revision applies to a Hub repo id"),
    "base for a pipeline source": (["--base", "tiny-flux"], 2, "--base is for a single-file --source"),
    "missing single file with a base": (["--source", "typo.safetensors", "--base", "tiny-flux"], 3, "typo.safetensors not found"),
    "bfl without base": (None, 2, "--base"),
}


@pytest.mark.parametrize("case", sorted(FLUX_CASES))
def test_bad_source(case, tmp_path, tiny_path):
    make, code, text = FLUX_CASES[case]
    source = make(tiny_path, tmp_path)
    out = tmp_path / "out"
    proc = invoke("flux", "--source", source, "--backend", "torchao", "--scheme", "int8wo", "--out", str(out), "--no-validate")
    assert_one_line_error(proc, code=code, contains=text)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".qconvert-tmp-" in p.name]


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option(case, tmp_path, tiny_path):
    args, code, text = OPTION_CASES[case]
    out = tmp_path / "out"
    if args is None:
        f = export_bfl(tiny_path / "transformer", tmp_path / "flux1.safetensors")
        args = ["--source", str(f)]
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                   "--out", str(out), "--no-validate", *args)
    assert_one_line_error(proc, code=code, contains=text)
    assert not out.exists()


# Options used only after the conversion (validation, push) are checked before it: a typo must
# not cost a whole conversion and leave an output that needs --overwrite. name -> (args, exit, text)
LATE_OPTION_CASES = {
    "validation device that is not one": (["--device", "gpu"], 2, "cuda:N"),
    "cuda without a GPU": (["--device", "cuda"], 3, "no CUDA GPU"),
    "missing thresholds file": (["--thresholds", "missing.toml"], 2, "thresholds"),
    "push without a token": (["--push", "--repo-id", "acme/x"], 5, "no Hub token"),
    "push to a malformed repo id": (["--push", "--repo-id", "acme/bad..name"], 2, "repo id"),
    "BFL-layout GGUF diffusers cannot load": (["--backend", "gguf", "--scheme", "Q8_0"], 3, "width 3072"),
}


# "cuda without a GPU" is a bad option only where there is no CUDA
@pytest.mark.parametrize("case", sorted(c for c in LATE_OPTION_CASES if not (c == "cuda without a GPU" and torch.cuda.is_available())))
def test_options_of_later_steps_fail_before_converting(case, tmp_path, monkeypatch):
    args, code, text = LATE_OPTION_CASES[case]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--out", str(out), *args)
    assert_one_line_error(proc, code=code, contains=text)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["hf-home"] if (tmp_path / "hf-home").exists() else [])


def test_existing_out_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--out", str(out))
    assert_one_line_error(proc, code=2, contains="--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only a qconvert output: a mistyped --out never deletes someone's files
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--out", str(out),
                  "--overwrite", "--no-validate")
    assert_one_line_error(proc, code=2, contains="not a qconvert output")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "flux", "--source", str(tmp_path / "nope"), "--backend", "torchao", "--scheme", "int8wo")
    assert proc.returncode == 3 and "Traceback" in proc.stderr


def test_token_never_appears_in_output_or_files(tmp_path, tiny_path):
    token = "hf_" + "S3cretT0kenValue" * 2
    out = tmp_path / "out"
    proc = run_cli("-v", "flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                   "--out", str(out), env={"HF_TOKEN": token})
    assert proc.returncode == 0, proc.stderr
    bad = run_cli("flux", "--source", f"{tmp_path}/{token}", "--backend", "torchao", "--scheme", "int8wo",
                  env={"HF_TOKEN": token})
    assert bad.returncode == 3
    for text in (proc.stdout, proc.stderr, bad.stdout, bad.stderr):
        assert token not in text
    for f in out.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("backend,package,scheme", [("bnb", "bitsandbytes", "nf4"), ("gguf", "gguf", "Q8_0"),
                                                    ("torchao", "torchao", "int8wo")])
def test_missing_backend_library_names_the_extra(backend, package, scheme, tmp_path, monkeypatch):
    import importlib.util

    from qconvert.convert import convert
    from qconvert.errors import MissingDependency
    from qconvert.sources import resolve_source

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == package else real(name, *a, **k))
    with pytest.raises(MissingDependency) as e:
        convert(resolve_source("tiny-flux"), backend, scheme, tmp_path / "x", progress=False)
    assert e.value.one_line() == f"{package} is not installed (pip install 'qconvert[{backend}]')"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, -1, 1234])
def test_finite_check_finds_every_bad_value(dtype, bad, where):
    """The per-chunk check (one aminmax pass) sees NaN/Inf anywhere, in every float dtype."""
    import torch

    from qconvert.convert import _check_finite
    from qconvert.errors import CorruptCheckpoint

    t = torch.randn(40, 77, dtype=getattr(torch, dtype))
    _check_finite("w", t)
    _check_finite("w", t[:0])  # empty chunk
    t.view(-1)[where] = bad
    with pytest.raises(CorruptCheckpoint, match="NaN or Inf"):
        _check_finite("w", t)
