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


# --- file-system failures a user causes (issue 14: disk full, permissions, read-only, names) ---------
#
# Each is produced for real where the machine allows: a small or read-only tmpfs mounted in a
# private mount namespace (`unshare --mount`, as root; `unshare --user --map-root-user --mount`
# otherwise, where the kernel allows user namespaces), so no mount outlives the test. Only when
# neither works is the OSError injected at the write layer (the shard writer's add_group, where
# tensor bytes hit the disk), which still runs the real clean-up and mapping code.

import errno  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from functools import cache  # noqa: E402

CONVERT = ("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--no-validate")


def _unshare_prefix() -> list[str]:
    return ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]


@cache
def _can_mount() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            proc = subprocess.run([*_unshare_prefix(), "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"],
                                  capture_output=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0


def _cli_on_tmpfs(mnt: Path, options: str, *args: str, then: str = "") -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI with a fresh tmpfs (mount ``options``) at ``mnt``; return the process and what
    the tmpfs holds afterwards (listed inside the namespace, where the mount lives)."""
    mnt.mkdir(exist_ok=True)
    cli = " ".join(f"'{a}'" for a in (sys.executable, "-m", "qconvert.cli", *args))
    script = (f"mount -t tmpfs -o {options} tmpfs '{mnt}' || exit 99\n{then}\n{cli}\nrc=$?\n"
              f"echo '--- left:'; ls -A '{mnt}'\nexit $rc\n")  # fmt: skip
    proc = subprocess.run([*_unshare_prefix(), "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 99, proc.stderr
    stdout, _, left = proc.stdout.partition("--- left:\n")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, proc.stderr), left.split()


def _inject_at_write(monkeypatch, code: int) -> None:
    from qconvert.convert import writers

    def refuse(self, tensors):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writers.ShardedSafetensorsWriter, "add_group", refuse)


def test_disk_full_while_writing_is_an_input_error_and_leaves_nothing(tmp_path, monkeypatch):
    """400 KB passes the preflight check (336 KB of tensor data) but not the files' real size."""
    mnt = tmp_path / "small"
    if _can_mount():
        proc, left = _cli_on_tmpfs(mnt, "size=400k", *CONVERT, "--out", str(mnt / "out" / "x"))
    else:
        _inject_at_write(monkeypatch, errno.ENOSPC)
        mnt.mkdir()
        proc, left = invoke(*CONVERT, "--out", str(mnt / "out" / "x")), [p.name for p in mnt.iterdir()]
    line = assert_one_line_error(proc, code=3, contains=f"the disk under {mnt} filled up while writing {mnt / 'out' / 'x'}")
    assert "tensor data alone: 336.49 KB" in line and "free space or choose another --out" in line
    assert left == []  # no output, no temporary sibling, no out/ folder the command created


def test_read_only_filesystem_names_the_folder(tmp_path, monkeypatch):
    mnt = tmp_path / "ro"
    if _can_mount():
        proc, _ = _cli_on_tmpfs(mnt, "ro,size=1m", *CONVERT, "--out", str(mnt / "x"))
    else:
        _inject_at_write(monkeypatch, errno.EROFS)
        proc = invoke(*CONVERT, "--out", str(mnt / "x"))
    assert_one_line_error(proc, code=3, contains="read-only")
    assert str(mnt / "x") in proc.stderr and "choose another --out" in proc.stderr


def _without_file_permission_override() -> list[str]:
    """A command prefix under which permission bits apply: root ignores them unless its
    CAP_DAC_OVERRIDE (and friends) are gone from the process."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_permission_denied_on_out_names_the_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = subprocess.run([*_without_file_permission_override(), sys.executable, "-m", "qconvert.cli", *CONVERT,
                               "--out", str(locked / "a" / "x")], capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert_one_line_error(proc, code=3, contains=f"permission denied while creating the output folder {locked / 'a' / 'x'}")
    assert "fix the permissions" in proc.stderr
    assert list(locked.iterdir()) == []


def test_unreadable_source_file_names_it(tmp_path, tiny_path):
    src = _copy_tiny(tiny_path, tmp_path)
    weights = src / "transformer" / ST
    weights.chmod(0)
    try:
        proc = subprocess.run([*_without_file_permission_override(), sys.executable, "-m", "qconvert.cli", "flux",
                               "--source", str(src), "--backend", "torchao", "--scheme", "int8wo", "--dry-run"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        weights.chmod(0o644)
    line = assert_one_line_error(proc, code=3, contains="permission denied while reading the source")
    assert str(weights) in line and "make the source readable" in line


@pytest.mark.parametrize("case", ["a file in the path", "long output name", "long folder name"])
def test_out_paths_the_filesystem_refuses_fail_before_converting(case, tmp_path):
    (tmp_path / "afile").write_text("x")
    out, needle = {
        "a file in the path": (tmp_path / "afile" / "x", "is a file"),
        "long output name": (tmp_path / ("n" * 240), "too long"),  # fits, but not its temporary sibling
        "long folder name": (tmp_path / ("d" * 300) / "x", "too long"),
    }[case]
    proc = invoke(*CONVERT, "--out", str(out))
    line = assert_one_line_error(proc, code=3, contains=needle)
    assert "--out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_late_file_system_error_still_names_the_path_and_the_fix(tmp_path):
    """validation.json is written by validate(), after the output exists: an output on a
    read-only mount (here remounted read-only after converting) reaches cli.main's last-resort
    mapping, which still gives one line with the path and exit 3."""
    if not _can_mount():
        pytest.skip("needs a mount namespace (unshare) for a real read-only remount")
    mnt = tmp_path / "m"
    convert_first = (f"'{sys.executable}' -m qconvert.cli -q {' '.join(CONVERT)} --out '{mnt / 'x'}' >/dev/null "
                     f"&& mount -o remount,ro '{mnt}' || exit 98")  # fmt: skip
    proc, _ = _cli_on_tmpfs(mnt, "size=8m", "validate", str(mnt / "x"), then=convert_first)
    assert proc.returncode != 98, proc.stderr
    line = assert_one_line_error(proc, code=3, contains="read-only")
    assert str(mnt / "x") in line and "unexpected" not in line


# --- push targets checked before converting: collection titles as the Hub takes them ------------------

COLLECTION_CASES = {
    "blank": ("   ", "needs a title"),
    "empty": ("", "needs a title"),
    "too long": ("x" * 61, "at most 60"),
    "newline": ("FLUX\nquants", "control character"),
    "tab": ("FLUX\tquants", "control character"),
}


@pytest.mark.parametrize("case", sorted(COLLECTION_CASES))
def test_bad_collection_title_fails_before_converting(case, tmp_path, monkeypatch):
    title, needle = COLLECTION_CASES[case]
    monkeypatch.chdir(tmp_path)
    proc = invoke(*CONVERT, "--out", str(tmp_path / "out"), "--push", "--repo-id", "acme/x", "--collection", title)
    assert_one_line_error(proc, code=2, contains=needle)
    assert list(tmp_path.iterdir()) == []
    push = invoke("push", str(tmp_path / "never"), "--repo-id", "acme/x", "--collection", title, "--dry-run")
    assert_one_line_error(push, code=2, contains=needle)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[release]\nsource = "tiny-flux"\nnamespace = "acme"\ncollection = {json.dumps(title)}\n'
                    '[[variant]]\nname = "a"\nbackend = "torchao"\nscheme = "int8wo"\n')  # fmt: skip
    release = invoke("release", str(plan), "--dry-run")
    line = assert_one_line_error(release, code=2, contains=needle)
    assert "plan.toml" in line and "collection" in line


@pytest.mark.parametrize("title", ["FLUX.1-dev quantized", "x" * 60, "Flux ⚡ quants — 2026", "日本語のコレクション"])
def test_good_collection_titles_pass_the_check(title, tmp_path, monkeypatch):
    """The next check (the token) is what stops these: the title itself was accepted."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    proc = invoke(*CONVERT, "--out", str(tmp_path / "out"), "--push", "--repo-id", "acme/x", "--collection", title)
    assert_one_line_error(proc, code=5, contains="no Hub token")


# --- the Hub refusing a download's token ---------------------------------------------------------------


def test_rejected_token_on_a_download_says_so_and_how_to_fix_it(hub, hub_env, tiny_path, tmp_path):
    hub.seed_repo("acme/tiny-flux-token", tiny_path)
    proc = run_cli("flux", "--source", "acme/tiny-flux-token", "--backend", "torchao", "--scheme", "int8wo", "--dry-run",
                   env={"HF_TOKEN": "hf_" + "NotAValidToken" * 3})  # fmt: skip
    line = assert_one_line_error(proc, code=3, contains="the Hub rejected the token while downloading acme/tiny-flux-token (HTTP 401)")
    assert "HF_TOKEN" in line and "hf auth login" in line and "retry later" not in line
    # the same repo with the right token downloads (the failure was the token, nothing else)
    assert run_cli("flux", "--source", "acme/tiny-flux-token", "--backend", "torchao", "--scheme", "int8wo",
                   "--dry-run").returncode == 0


def test_full_hub_cache_during_a_download_names_the_cache(hub, hub_env, tiny_path, tmp_path):
    if not _can_mount():
        pytest.skip("needs a mount namespace (unshare) for a real small filesystem")
    hub.seed_repo("acme/tiny-flux-cache", tiny_path)
    mnt = tmp_path / "hf"
    env = f"export HF_HOME='{mnt}' HF_HUB_CACHE='{mnt / 'hub'}'"
    # a conversion streams the weights, so the cache gets only the small files (~70 KB)
    proc, _ = _cli_on_tmpfs(mnt, "size=16k", "flux", "--source", "acme/tiny-flux-cache", "--backend", "torchao",
                            "--scheme", "int8wo", "--dry-run", then=env)  # fmt: skip
    line = assert_one_line_error(proc, code=3, contains="no space left on the device while downloading acme/tiny-flux-cache")
    assert "HF_HOME" in line


# --- optional libraries: a missing one is one line naming the extra -----------------------------------


def _run_blocking(blocked: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess where ``blocked`` cannot be imported (as if not installed)."""
    code = f"import sys\nsys.modules[{blocked!r}] = None\nfrom qconvert.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One unvalidated output per backend (tiny-flux), converted in this process."""
    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    root = tmp_path_factory.mktemp("outputs")
    src = resolve_source("tiny-flux")
    made = {"torchao": convert(src, "torchao", "int8wo", root / "torchao", progress=False).out,
            "gguf": convert(src, "gguf", "Q8_0", root / "gguf", progress=False, options={"layout": "diffusers"}).out}  # fmt: skip
    return made


@pytest.mark.parametrize("backend, blocked, extra", [
    ("gguf", "torchmetrics", "validate"),
    ("torchao", "torchmetrics", "validate"),
    ("torchao", "torchao", "torchao"),
    ("gguf", "gguf", "gguf"),
])  # fmt: skip
def test_validate_without_an_optional_library_names_the_extra(backend, blocked, extra, outputs, tmp_path):
    proc = _run_blocking(blocked, "validate", str(outputs[backend]), cwd=tmp_path)
    assert_one_line_error(proc, code=3, contains=f"{blocked} is not installed (pip install 'qconvert[{extra}]')")
    assert not (outputs[backend] / "validation.json").exists()


def test_flux_without_torchmetrics_fails_before_converting(tmp_path):
    proc = _run_blocking("torchmetrics", *CONVERT[:-1], "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(proc, code=3, contains="torchmetrics is not installed (pip install 'qconvert[validate]')")
    assert list(tmp_path.iterdir()) == []
    # --no-validate does not need it
    proc = _run_blocking("torchmetrics", *CONVERT, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_options_in_messages_are_worded_by_the_edge():
    """A library error names options abstractly: Python names by default, flags under the CLI's
    wording (``main()`` sets it for the whole command, so a release's records read the same)."""
    from qconvert.cli import cli_wording
    from qconvert.errors import UsageError, opt, worded

    e = UsageError(f"{opt('thresholds_file', metavar='FILE')} is not {{'a': 'dict'}}",
                   hint=f"pass {opt('overwrite', True)}, {opt('validate', False)}, {opt('layout', 'diffusers')} or {opt('jobs')}")
    api = "`thresholds_file=FILE` is not {'a': 'dict'} (pass `overwrite=True`, `validate=False`, `layout='diffusers'` or `jobs`)"
    cli = "--thresholds FILE is not {'a': 'dict'} (pass --overwrite, --no-validate, --layout diffusers or --jobs)"
    assert str(e) == e.one_line() == api
    assert e.one_line(cli_wording) == cli
    with worded(cli_wording):
        assert str(e) == cli
        # a message built from another error's text keeps its references
        assert str(UsageError(f"plan: {e.message} ({e.hint})")) == "plan: " + cli
    assert str(e) == api
