"""The CLI as a user runs it: help, demo, determinism, dry run, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, assert_one_line_error, invoke, run_cli, tree_hashes


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys\n"
        "from qconvert.cli import main\n"
        "for argv in ([], ['--help'], ['flux', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Examples:" in out and "qconvert flux --source tiny-flux" in out
    # bare `qconvert` is the help (exit 0), every command listed with its full one-line summary
    assert out.count("Convert a Flux pipeline (bnb, torchao or GGUF).") == 2 and "error:" not in out


def test_demo_then_determinism(tmp_path, tiny_path):
    a = run_cli("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    assert "transformer" in a.stdout and "int8wo" in a.stdout
    b = run_cli("-q", "flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                "--out", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    a_files, b_files = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    # validation.json holds measurements (times, memory): it differs run to run by nature.
    # Every other file, the validation's sample images included, is byte-identical.
    assert a_files.pop("validation.json") and b_files.pop("validation.json")
    assert a_files == b_files
    assert "samples/grid.png" in a_files
    # no temporary folders are left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_json_summary_and_overwrite(tmp_path, tiny_path):
    out = tmp_path / "o"
    args = ("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "fp8wo", "--out", str(out), "--json")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["components"]["transformer"]["scheme"] == "fp8wo"
    assert summary["bytes_out"] < summary["bytes_in"]
    again = run_cli(*args)
    assert_one_line_error(again, code=2, contains="--overwrite")
    assert invoke(*args, "--overwrite", "--no-validate").returncode == 0  # the replacement, not validation again


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_path):
    p = run_cli("-v", "flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                "--out", str(tmp_path / "x"), "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "transformer_blocks.0.attn.to_q.weight" in p.stdout and "quantize -> int8wo" in p.stdout
    assert "text_encoder_2" in p.stdout and "copy" in p.stdout
    assert not (tmp_path / "x").exists()
    j = invoke("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--dry-run", "--json")
    plan = json.loads(j.stdout)
    assert {c["name"] for c in plan["components"]} >= {"transformer", "text_encoder_2", "vae"}


def _sd_folder(tmp_path):
    d = tmp_path / "sd"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return d


def _truncated(tmp_path, tiny_path):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_path, d)
    f = d / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    return d


BAD = {
    "missing path": (lambda tp, tiny: ["--source", str(tp / "nope")], 3, "not found"),
    "sd pipeline": (lambda tp, tiny: ["--source", str(_sd_folder(tp))], 3, "Stable Diffusion"),
    "truncated": (lambda tp, tiny: ["--source", str(_truncated(tp, tiny))], 3, "truncated"),
    "unknown scheme": (lambda tp, tiny: ["--source", "tiny-flux", "--scheme", "int3"], 2, "scheme"),
    "int4 on cpu": (lambda tp, tiny: ["--source", "tiny-flux", "--scheme", "int4wo"], 3, "CUDA"),
    "bad component": (lambda tp, tiny: ["--source", "tiny-flux", "--components", "vae"], 2, "components"),
}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# "int4 on cpu" is a bad input only where there is no CUDA (tests/test_torchao.py covers both)
@pytest.mark.parametrize("case", sorted(c for c in BAD if not (c == "int4 on cpu" and _cuda())))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, tiny_path):
    make, code, text = BAD[case]
    args = ["flux", "--backend", "torchao", "--scheme", "int8wo", "--out", str(tmp_path / "out")]
    extra = make(tmp_path, tiny_path)
    # later options win in click: append the case's own --scheme/--source
    proc = run_cli(*args, *extra)
    assert_one_line_error(proc, code=code, contains=text)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".qconvert-tmp-" in p.name]


def test_unknown_backend_is_a_usage_error(tmp_path):
    proc = run_cli("flux", "--source", "tiny-flux", "--backend", "onnx", "--scheme", "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, code=2, contains="backend")


def test_readme_dry_run_example_runs_as_written():
    """`-v` after the command, as the README and `flux --help` show it."""
    line = next(li for li in (REPO_ROOT / "README.md").read_text().splitlines() if "--dry-run -v" in li)
    args = line.split("#")[0].split()
    assert args[0] == "qconvert"
    proc = invoke(*args[1:])
    assert proc.returncode == 0, proc.stderr
    assert "proj_out.weight" in proc.stdout  # per-tensor lines: -v took effect
    quiet = invoke(*args[1:-1], "-q")
    assert quiet.returncode == 0 and "resolving source" not in quiet.stderr


def test_dry_run_plans_int4wo_without_a_gpu():
    """A plan reads headers only: it needs the library, not the GPU the conversion needs."""
    proc = invoke("flux", "--source", "slim-flux", "--backend", "torchao", "--scheme", "int4wo", "--dry-run", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "x_embedder.weight [3072, 64] BF16 keep" in proc.stdout
    assert "proj_out.weight [64, 3072] BF16 quantize -> int4wo" in proc.stdout


def test_dry_run_shows_k_quant_fallbacks():
    """tiny-flux's rows are shorter than a K-quant block (256): the plan says what they become."""
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "gguf", "--scheme", "Q4_K_S", "--layout", "diffusers", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "quantized as: Q5_0 x" in proc.stdout
    plain = invoke("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--dry-run")
    assert "quantized as" not in plain.stdout  # one type, the scheme's own
