"""sdnq backend: streamed tensors and config equal what sdnq itself saves after quantizing on
load (diffusers' and transformers' from_pretrained with an SDNQConfig); the output converts,
validates and loads with its card's snippet; plans are exact; bytes are deterministic.

tiny-flux is too narrow for sdnq (it skips every Linear under 16,384 values), so the tests
build a 128-wide Flux pipeline with a 2048-wide T5: its projections have 2048 inputs (two
groups of 1024 for int8/float8, as FLUX.1-dev's 3072 have three), its 37-wide feed-forward
groups that fill neither 64 nor 1024 and an odd number of inputs per row for the 4-bit
packing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, assert_one_line_error, invoke, tree_hashes
from qconvert.convert import convert, get_backend, make_plan
from qconvert.sources import resolve_source

SCHEMES = ("int8", "float8_e4m3fn", "uint4", "int4")
COMPONENTS = ("transformer", "text_encoder_2")
WIDE = dict(attention_head_dim=64, num_attention_heads=2, joint_attention_dim=2048, axes_dims_rope=[16, 24, 24])


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory):
    """A Flux pipeline wide enough for sdnq to quantize, bf16 transformer and T5 (FLUX.1-dev's dtype)."""
    from qconvert.tiny import build_pipeline

    src = tmp_path_factory.mktemp("sdnq") / "wide"
    build_pipeline(src, **WIDE)
    for f in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        tensors = load_file(str(src / f))
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(src / f), metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def outs(wide_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdnq-out")
    source = resolve_source(str(wide_src))
    for scheme in SCHEMES:
        convert(source, "sdnq", scheme, root / scheme, progress=False)
    return root


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _library_save(wide_src, scheme, out):
    """What sdnq itself writes: quantize on load, then save_pretrained (both components)."""
    import sdnq
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    config = lambda: sdnq.SDNQConfig(weights_dtype=scheme)  # noqa: E731  (it fills its lists in)
    FluxTransformer2DModel.from_pretrained(wide_src / "transformer", quantization_config=config(),
                                           dtype=torch.bfloat16).save_pretrained(out / "transformer")  # fmt: skip
    T5EncoderModel.from_pretrained(wide_src / "text_encoder_2", quantization_config=config(),
                                   dtype=torch.bfloat16).save_pretrained(out / "text_encoder_2")  # fmt: skip


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_tensor_and_the_config_equal_sdnqs_own_save(scheme, outs, wide_src, tmp_path):
    _library_save(wide_src, scheme, tmp_path)
    for comp in COMPONENTS:
        ours, theirs = _tensors(outs / scheme / comp), _tensors(tmp_path / comp)
        assert set(ours) == set(theirs), comp
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
            # bytes, not values: float8 and packed 4-bit compared as raw storage
            assert torch.equal(ours[k].reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8)), k
        assert any(k.endswith(".scale") for k in ours), f"sdnq quantized nothing in {comp}"
        if comp == "text_encoder_2":  # grouped: (out, groups, 1) scales with groups > 1
            assert ours["encoder.block.0.layer.0.SelfAttention.q.scale"].shape[1] > 1
        q_ours = json.loads((outs / scheme / comp / "config.json").read_text())["quantization_config"]
        q_theirs = json.loads((tmp_path / comp / "config.json").read_text())["quantization_config"]
        assert q_ours["modules_to_not_convert"] == sorted(q_ours["modules_to_not_convert"])
        for key in ("modules_to_not_convert", "modules_to_not_use_matmul"):  # sdnq's order is a set's
            q_ours[key], q_theirs[key] = sorted(q_ours[key]), sorted(q_theirs[key])
        assert q_ours == q_theirs, comp


@pytest.mark.parametrize("scheme", SCHEMES)
def test_plan_predicts_the_written_bytes(scheme, outs, wide_src):
    plan, _ = make_plan(resolve_source(str(wide_src)), get_backend("sdnq", scheme), COMPONENTS)
    for comp in COMPONENTS:
        written = 0
        for shard in (outs / scheme / comp).glob("*.safetensors"):
            with safe_open(str(shard), "pt") as h:
                written += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
        assert plan.component(comp).bytes_out == written, comp
        quantized = {t.name for t in plan.component(comp).tensors if t.action == "quantize"}
        scaled = {k.removesuffix(".scale") + ".weight" for k in _tensors(outs / scheme / comp) if k.endswith(".scale")}
        assert quantized == scaled and quantized, comp


def test_row_chunks_jobs_and_reruns_do_not_change_the_bytes(outs, wide_src, tmp_path, monkeypatch):
    """uint4 (odd 37-input rows: chunks are cut at even rows) and int8 in chunks of a few rows
    on 3 threads: the files of the whole-tensor conversion."""
    source = resolve_source(str(wide_src))
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 200)
    for scheme in ("uint4", "int8"):
        convert(source, "sdnq", scheme, tmp_path / scheme, progress=False, options={"jobs": 3})
        assert tree_hashes(tmp_path / scheme) == tree_hashes(outs / scheme), scheme


@pytest.mark.parametrize("scheme", ("uint4",))  # the packed layout; int8 loads the same way (tensors above)
def test_flux_converts_validates_and_the_cards_snippet_generates(scheme, tmp_path, monkeypatch):
    # float32 like the demo, and a 512-wide T5: in a 128-wide model the layers sdnq keeps (the
    # T5-wide context_embedder, in bf16) weigh too much for the 4-bit memory floor, which is
    # set for FLUX.1-dev (uint4: 3.2x)
    from qconvert.tiny import build_pipeline

    src = tmp_path / "wide32"
    build_pipeline(src, **{**WIDE, "joint_attention_dim": 512})
    out = tmp_path / "out"
    proc = invoke("flux", "--source", str(src), "--backend", "sdnq", "--scheme", scheme, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"], report
    assert invoke("card", str(out), "--license", "apache-2.0").returncode == 0
    from qconvert.cards import CPU_USAGE_MARKER, extract_usage

    text = (out / "README.md").read_text()
    code = extract_usage(text)
    assert code.startswith("import sdnq") and "FluxPipeline.from_pretrained(" in code
    # A local (non-demo) source gets FLUX.1-dev's 1024x1024 settings: run the loading code with
    # the card's CPU generation call, as its "On a CPU" section says
    code = code.split("image = pipe(")[0] + extract_usage(text, CPU_USAGE_MARKER)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "card_snippet.py", "exec"), namespace)  # the card's code, as a user runs it
    assert (tmp_path / f"flux-{scheme}.png").is_file()
    pipe = namespace["pipe"]
    assert hasattr(pipe.transformer.transformer_blocks[0].attn.to_q, "sdnq_dequantizer")
    assert hasattr(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, "sdnq_dequantizer")


def test_tiny_flux_is_refused_before_converting_unless_not_validated(tmp_path):
    out = tmp_path / "x"
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "sdnq", "--scheme", "int8", "--out", str(out))
    line = assert_one_line_error(proc, contains="--no-validate")
    assert "sdnq quantizes none" in line and not out.exists()
    assert invoke("flux", "--source", "tiny-flux", "--backend", "sdnq", "--scheme", "int8", "--out", str(out),
                  "--no-validate").returncode == 0  # fmt: skip


def test_missing_library_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['sdnq'] = None  # sdnq not installed\n"
        "from qconvert.cli import main\n"
        f"sys.exit(main(['flux', '--source', 'tiny-flux', '--backend', 'sdnq', '--scheme', 'int8', "
        f"'--out', {str(tmp_path / 'x')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    line = assert_one_line_error(proc, contains="pip install 'qconvert[sdnq]'")
    assert "sdnq" in line
    assert not (tmp_path / "x").exists()


def test_a_release_plan_names_the_backend(wide_src, tmp_path, monkeypatch):
    from qconvert.release import load_plan, matrix

    plan = tmp_path / "plan.toml"
    plan.write_text(f'[release]\nsource = "{wide_src.as_posix()}"\nnamespace = "acme"\n\n'
                    '[[variant]]\nname = "sdnq-int8"\nbackend = "sdnq"\nscheme = "int8"\n\n'
                    '[[variant]]\nname = "sdnq-uint4"\nbackend = "sdnq"\nscheme = "uint4"\n')  # fmt: skip
    assert [v["name"] for v in matrix(load_plan(plan))] == ["sdnq-int8", "sdnq-uint4"]
    monkeypatch.chdir(tmp_path)
    proc = invoke("release", str(plan), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "sdnq int8" in proc.stdout and "sdnq uint4" in proc.stdout
