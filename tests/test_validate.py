"""validate: load as downstream, generate, measure, compare; sabotaged outputs fail."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_one_line_error, invoke, run_cli
from qconvert.convert import convert
from qconvert.sources import resolve_source
from qconvert.validate import raise_if_failed, validate
from qconvert.validate.thresholds import load_thresholds


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("val") / "flux-int8"
    convert(resolve_source("tiny-flux"), "torchao", "int8wo", out, progress=False)
    return out


def test_demo_output_validates_and_writes_artefacts(int8_out):
    report = validate(int8_out)
    assert report.passed, report.table()
    data = json.loads((int8_out / "validation.json").read_text())
    assert data["passed"] and not data["failed"]
    names = {c["name"] for c in data["checks"]}
    assert {"memory_reduction", "forward_rel_error", "t5_rel_error", "psnr", "ssim"} <= names
    for key in ("load_s", "memory_after_load", "peak_memory", "step_s", "transformer_bytes"):
        assert data["quantized"][key] > 0, key
    assert data["quality"]["memory_reduction"] >= 1.5
    # LPIPS needs torchvision and locally cached AlexNet weights (not on a CI machine): measured
    # where they are, else skipped with the reason
    if data["quality"]["lpips"] is None:
        note = data["quality"]["lpips_note"]
        assert note.startswith("skipped") and ("qconvert[lpips]" in note or "AlexNet weights" in note or "32x32" in note)
    else:
        assert 0.0 <= data["quality"]["lpips"] <= 1.0
    for rel in data["samples"]:
        assert (int8_out / rel).stat().st_size > 0
    from PIL import Image

    grid = Image.open(int8_out / "samples" / "grid.png")
    assert grid.size[1] == 2 * grid.size[0] // 2  # two rows (quantized over reference), two prompts


def test_reference_run_is_reused_for_another_output_of_the_source(int8_out, tmp_path):
    """Variants of one source (a release plan) share one reference run in a process."""
    first = validate(int8_out, write=False)
    other = tmp_path / "nf4"
    convert(resolve_source("tiny-flux"), "bnb", "nf4", other, progress=False)
    second = validate(other, write=False)
    assert second.reference is first.reference  # the same measured run
    assert second.quantized.transformer_bytes < first.quantized.transformer_bytes  # measured anew
    third = validate(int8_out, write=False, steps=3)  # other settings: a new reference run
    assert third.reference is not first.reference and third.passed


def _copy(src, dst):
    shutil.copytree(src, dst)
    (dst / "validation.json").unlink(missing_ok=True)
    return dst


def test_scaled_weights_fail_the_forward_check(int8_out, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bad = _copy(int8_out, tmp_path / "scaled")
    f = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    sd = {k: (v * 1.5 if k.endswith("_weight_scale") else v) for k, v in load_file(str(f)).items()}
    save_file(sd, str(f), metadata=meta)
    report = validate(bad)
    assert not report.passed
    failed = {c.name for c in report.checks if not c.passed}
    assert "forward_rel_error" in failed
    with pytest.raises(Exception, match="forward_rel_error"):
        raise_if_failed(report)


def test_swapped_text_encoder_fails(int8_out, tmp_path):
    from transformers import T5Config, T5EncoderModel

    bad = _copy(int8_out, tmp_path / "swapped")
    cfg = {k: v for k, v in T5Config.from_pretrained(bad / "text_encoder_2").to_dict().items() if k != "quantization_config"}
    torch.manual_seed(1234)
    other = T5EncoderModel(T5Config(**cfg)).eval()
    shutil.rmtree(bad / "text_encoder_2")
    other.save_pretrained(bad / "text_encoder_2")
    proc = run_cli("validate", str(bad))
    line = assert_one_line_error(proc, code=4, contains="t5_rel_error")
    assert "validation.json" in line


def test_memory_budget_below_measured_fails_and_an_unmeasurable_lpips_limit_fails(int8_out, tmp_path):
    out = _copy(int8_out, tmp_path / "budget")
    # an empty torch hub folder: no AlexNet weights, so LPIPS cannot be measured on any machine
    proc = invoke("validate", str(out), "--max-memory", "1KB", "--max-lpips", "0.5", env={"TORCH_HOME": str(tmp_path / "th")})
    line = assert_one_line_error(proc, code=4, contains="(+1 more)")
    assert "max_memory" in line or "lpips: not measured" in line
    checks = {c["name"]: c for c in json.loads((out / "validation.json").read_text())["checks"]}
    assert not checks["max_memory"]["passed"] and checks["max_memory"]["value"] > 1000
    # a release gate asking for LPIPS fails loudly where LPIPS cannot be measured, never passes silently
    assert not checks["lpips"]["passed"] and checks["lpips"]["value"] is None
    assert checks["lpips"]["note"].startswith("not measured")


def test_thresholds_layering(tmp_path):
    t = load_thresholds("bnb", "nf4")
    assert t.min_memory_reduction == 3.0
    assert load_thresholds("torchao", "int8wo").min_memory_reduction >= 1.5
    f = tmp_path / "t.toml"
    f.write_text('[default]\nmin_psnr = 5.0\n[bnb.nf4]\nmax_memory = "12GiB"\n')
    t2 = load_thresholds("bnb", "nf4", file=f, overrides={"min_ssim": 0.9})
    assert (t2.min_psnr, t2.max_memory, t2.min_ssim) == (5.0, 12 * 1024**3, 0.9)
    f.write_text("[default]\nmin_psnrr = 1\n")
    with pytest.raises(Exception, match="unknown threshold"):
        load_thresholds("bnb", "nf4", file=f)
    # nothing in a thresholds file is silently ignored or accepted with the wrong type
    for text, message in [
        ("min_psnr = 99\n", "is not a \\[default\\]"),
        ("[torchao]\nmin_psnr = 99\n", "is not a \\[default\\]"),
        ("[torchao.int9]\nmin_psnr = 99\n", "is not a \\[default\\]"),
        ('[default]\nmin_psnr = "x"\n', "must be a non-negative number"),
        ('[default]\nmax_memory = "lots"\n', "is not a size"),
    ]:
        f.write_text(text)
        with pytest.raises(Exception, match=message):
            load_thresholds("bnb", "nf4", file=f)


@pytest.mark.parametrize("args, text", [(["--steps", "0"], "--steps must be at least 2"),
                                        (["--size", "0"], "--size must be a multiple of 16"),
                                        (["--size", "100"], "--size must be a multiple of 16"),
                                        (["--max-memory", "-1GiB"], "not a size")])
def test_out_of_range_settings_are_refused(int8_out, args, text):
    assert_one_line_error(invoke("validate", str(int8_out), *args), code=2, contains=text)


def test_validate_rejects_a_folder_without_manifest(tmp_path):
    proc = run_cli("validate", str(tmp_path))
    assert_one_line_error(proc, code=3, contains="qconvert.json")


def test_threshold_overrides_are_checked_too():
    with pytest.raises(Exception, match="unknown threshold 'min_psrn'"):
        load_thresholds("bnb", "nf4", overrides={"min_psrn": 40.0})


def test_identical_images_give_valid_json(tmp_path):
    """PSNR of identical images is infinite; validation.json stays valid JSON (null + a flag)."""
    from qconvert.validate import Check, RunStats, ValidationReport

    inf = float("inf")
    report = ValidationReport(
        tmp_path, True, [Check("psnr", inf, 22.0, ">=", True)], RunStats(), RunStats(),
        {"psnr": inf, "ssim": 1.0, "identical_images": True}, {}, {}, load_thresholds("torchao", "int8wo"),
    )  # fmt: skip
    text = json.dumps(report.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["quality"]["psnr"] is None and data["quality"]["identical_images"]
    assert data["checks"][0]["value"] is None and data["checks"][0]["passed"]


def test_single_file_reference_without_a_base_names_the_fix(int8_out, tmp_path):
    f = tmp_path / "flux1.safetensors"
    f.write_bytes(b"")
    proc = invoke("validate", str(int8_out), "--reference", str(f))
    assert_one_line_error(proc, code=2, contains="pass a pipeline folder or Hub repo id as --reference")


@pytest.mark.slow
def test_a_bfl_file_of_any_width_validates(tmp_path, tiny_path):
    """diffusers' BFL converter needs width 3072; the reference of a narrower BFL file is read
    through qconvert's own mapping, so its conversion validates instead of crashing."""
    from conftest import export_bfl

    f = export_bfl(tiny_path / "transformer", tmp_path / "flux1-tiny.safetensors")
    out = tmp_path / "out"
    convert(resolve_source(str(f), base="tiny-flux"), "torchao", "int8wo", out, progress=False)
    report = validate(out, write=False)
    assert report.passed, report.table()
    assert report.quality["forward_rel_error"] < 0.05  # the reference holds the file's weights
