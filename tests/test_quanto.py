"""optimum-quanto backend: streamed tensors equal what diffusers and quanto themselves save;
the output converts, validates and loads with its card's snippet; plans are exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, assert_one_line_error, invoke, tree_hashes
from qconvert.convert import convert, get_backend, make_plan
from qconvert.sources import resolve_source

SCHEMES = ("int8", "int4", "int2", "fp8")
WEIGHTS_DTYPE = {"int8": "int8", "int4": "int4", "int2": "int2", "fp8": "float8"}  # QuantoConfig's names
QTYPE = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "fp8": "qfloat8"}


@pytest.fixture(scope="module")
def bf16_src(tiny_path, tmp_path_factory):
    """tiny-flux with bf16 transformer and T5 (FLUX.1-dev's dtype: scales are in the weights' dtype)."""
    src = tmp_path_factory.mktemp("quanto") / "tiny-bf16"
    shutil.copytree(tiny_path, src)
    for f in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        tensors = load_file(str(src / f))
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(src / f), metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def outs(bf16_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("quanto-out")
    source = resolve_source(str(bf16_src))
    for scheme in SCHEMES:
        convert(source, "quanto", scheme, root / scheme, progress=False)
    return root


def _tensors(folder, pattern):
    out = {}
    for shard in sorted(folder.glob(pattern)):
        out.update(load_file(str(shard)))
    return out


def _assert_same_tensors(ours, theirs):
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        # bytes, not values: float8 and packed uint8 compared as raw storage
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformer_equals_diffusers_quantoconfig_save(scheme, outs, bf16_src, tmp_path):
    from diffusers import FluxTransformer2DModel, QuantoConfig

    ref = FluxTransformer2DModel.from_pretrained(
        bf16_src / "transformer", quantization_config=QuantoConfig(weights_dtype=WEIGHTS_DTYPE[scheme]),
        dtype=torch.bfloat16,
    )
    ref.save_pretrained(tmp_path / "ref")
    ours = _tensors(outs / scheme / "transformer", "*.safetensors")
    _assert_same_tensors(ours, _tensors(tmp_path / "ref", "*.safetensors"))
    assert any(k.endswith(".weight._scale") for k in ours)
    cfg = json.loads((outs / scheme / "transformer" / "config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_t5_equals_quantos_own_transformers_save(scheme, outs, bf16_src, tmp_path):
    """transformers cannot save (or load) quanto models: the reference is quanto's
    QuantizedTransformersModel.save_pretrained, whose layout the T5 is written in."""
    import optimum.quanto as quanto
    from optimum.quanto import QuantizedTransformersModel
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(bf16_src / "text_encoder_2", dtype=torch.bfloat16)
    QuantizedTransformersModel.quantize(model, weights=getattr(quanto, QTYPE[scheme])).save_pretrained(tmp_path / "ref")
    t5 = outs / scheme / "text_encoder_2"
    _assert_same_tensors(_tensors(t5, "*.safetensors"), _tensors(tmp_path / "ref", "*.safetensors"))
    assert json.loads((t5 / "quanto_qmap.json").read_text()) == json.loads((tmp_path / "ref" / "quanto_qmap.json").read_text())
    assert "quantization_config" not in json.loads((t5 / "config.json").read_text())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_plan_predicts_the_written_bytes(scheme, outs, bf16_src):
    plan, _ = make_plan(resolve_source(str(bf16_src)), get_backend("quanto", scheme), ("transformer", "text_encoder_2"))
    for comp in ("transformer", "text_encoder_2"):
        written = 0
        for shard in (outs / scheme / comp).glob("*.safetensors"):
            with safe_open(str(shard), "pt") as h:
                written += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
        assert plan.component(comp).bytes_out == written, comp


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(64, 256), (48, 160), (37, 32)])
def test_codec_equals_quantos_frozen_qlinear(scheme, shape, monkeypatch):
    """Shapes tiny-flux lacks: groups of 128 (bf16 on a CPU: freeze() goes through torch's
    int4 tinygemm packing and back), of 32, and per row; in chunks of 4 rows (37 rows end in a
    1-row chunk), against quanto's own QLinear.freeze() state dict."""
    import optimum.quanto as quanto
    from optimum.quanto import QLinear

    from qconvert.convert.quanto import QuantoBackend
    from qconvert.plan import QUANTIZE, TensorPlan

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).mul(0.02).to(torch.bfloat16)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
    linear.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    ref = QLinear.from_module(linear, weights=getattr(quanto, QTYPE[scheme]))
    ref.freeze()
    theirs = {f"m.{k}": v for k, v in ref.state_dict().items()}
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 5 * shape[1])
    plan = TensorPlan("m.weight", shape, "BF16", QUANTIZE, scheme, w.numel() * 2, 0)
    ours = dict(QuantoBackend(scheme).encode("transformer", plan, w))
    _assert_same_tensors(ours, theirs)


def test_row_chunks_and_jobs_do_not_change_the_bytes(tmp_path, monkeypatch):
    """int8 and int4 in chunks of a few rows (T5's 37-row wi ends in a 1-row chunk; int4 packs
    the joined values) on 3 and 4 threads: the files of one whole-tensor, one-thread conversion."""
    src = resolve_source("tiny-flux")
    for scheme in ("int8", "int4"):
        convert(src, "quanto", scheme, tmp_path / f"{scheme}-whole", progress=False, options={"jobs": 1})
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 64)
    convert(src, "quanto", "int8", tmp_path / "int8-chunked", progress=False, options={"jobs": 3})
    convert(src, "quanto", "int4", tmp_path / "int4-chunked", progress=False, options={"jobs": 4})
    assert tree_hashes(tmp_path / "int8-whole") == tree_hashes(tmp_path / "int8-chunked")
    assert tree_hashes(tmp_path / "int4-whole") == tree_hashes(tmp_path / "int4-chunked")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_flux_converts_validates_and_the_cards_snippet_generates(scheme, tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "quanto", "--scheme", scheme, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"], report
    assert invoke("card", str(out)).returncode == 0
    from qconvert.cards import extract_usage

    code = extract_usage((out / "README.md").read_text())
    assert "requantize(text_encoder_2" in code and "text_encoder_2=text_encoder_2" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "card_snippet.py", "exec"), namespace)  # the card's code, as a user runs it
    assert (tmp_path / f"flux-{scheme}.png").is_file()
    pipe = namespace["pipe"]
    assert type(pipe.transformer.proj_out).__name__ == "QLinear"
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__.startswith("Weight")


def test_transformer_only_output_loads_with_plain_from_pretrained(tmp_path):
    from diffusers import FluxPipeline

    from qconvert.cards import card_text, extract_usage

    out = tmp_path / "out"
    convert(resolve_source("tiny-flux"), "quanto", "fp8", out, components=("transformer",), progress=False)
    code = extract_usage(card_text(out))
    assert "requantize" not in code and "FluxPipeline.from_pretrained(" in code
    pipe = FluxPipeline.from_pretrained(out)
    assert type(pipe.transformer.proj_out.weight).__name__ == "WeightQBytesTensor"
    img = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert torch.isfinite(img).all()


def test_missing_library_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['optimum'] = None  # optimum-quanto not installed\n"
        "from qconvert.cli import main\n"
        f"sys.exit(main(['flux', '--source', 'tiny-flux', '--backend', 'quanto', '--scheme', 'int8', "
        f"'--out', {str(tmp_path / 'x')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    line = assert_one_line_error(proc, contains="pip install 'qconvert[quanto]'")
    assert "optimum.quanto" in line
    assert not (tmp_path / "x").exists()


def test_a_release_plan_names_the_backend(tmp_path, monkeypatch):
    from qconvert.release import load_plan, matrix

    plan = tmp_path / "plan.toml"
    plan.write_text('[release]\nsource = "tiny-flux"\nnamespace = "acme"\n\n'
                    '[[variant]]\nname = "quanto-int8"\nbackend = "quanto"\nscheme = "int8"\n\n'
                    '[[variant]]\nname = "quanto-fp8"\nbackend = "quanto"\nscheme = "fp8"\n')  # fmt: skip
    assert [v["name"] for v in matrix(load_plan(plan))] == ["quanto-int8", "quanto-fp8"]
    monkeypatch.chdir(tmp_path)
    proc = invoke("release", str(plan), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "quanto int8" in proc.stdout and "quanto fp8" in proc.stdout


# The slim T5's attention projection (32, 4096), where `qconvert validate --device cpu` of a
# slim-flux int8 output segfaulted: saved by quanto itself (bf16 scale and 0-d activation scales
# before the int8 data, so the data lies at a 4 mod 16 file offset), loaded as the card does.
_CPU_INT8_SCRIPT = """
import sys, tempfile, torch
from optimum.quanto import freeze, qint8, quantization_map, quantize, requantize
from safetensors.torch import load_file, save_file
from qconvert.convert.quanto import realign_int8_weights
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4096, 32, bias=False)).to(torch.bfloat16)
quantize(model, weights=qint8); freeze(model)
path = tempfile.mkdtemp() + "/model.safetensors"
save_file(model.state_dict(), path)
with torch.device("meta"):
    loaded = torch.nn.Sequential(torch.nn.Linear(4096, 32, bias=False)).to(torch.bfloat16)
requantize(loaded, load_file(path), quantization_map(model), device=torch.device("cpu"))
print("offset", loaded[0].weight._data.data_ptr() % 16, flush=True)
if sys.argv[1] == "realign":
    realign_int8_weights(loaded)
x = torch.randn(1, 512, 4096, dtype=torch.bfloat16)
with torch.no_grad():
    y = loaded(x)  # quanto -> torch._weight_int8pack_mm (bf16 activations, in_features % 4 == 0)
    ref = model(x)
print("max_diff", (y.float() - ref.float()).abs().max().item())
"""


def _run_cpu_int8(mode):
    return subprocess.run([sys.executable, "-c", _CPU_INT8_SCRIPT, mode], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)  # fmt: skip


def test_int8_weights_loaded_from_safetensors_run_on_cpu_once_realigned():
    fixed = _run_cpu_int8("realign")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "offset 0" not in fixed.stdout  # the weight did lie unaligned, as loaded
    assert "max_diff 0.0" in fixed.stdout  # the same kernel, the same result as quanto's own model
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        # The crash itself (torch 2.13's AVX512 kernel), in its own process.
        crashed = _run_cpu_int8("as-loaded")
        assert crashed.returncode == -11, (crashed.returncode, crashed.stderr[-2000:])


def test_int8_validation_on_cpu_realigns_and_refuses_what_the_kernel_cannot_run():
    from optimum.quanto import QTensor, freeze, qint8, quantize

    from qconvert.convert.quanto import check_int8_cpu_runnable, realign_int8_weights
    from qconvert.errors import DeviceError

    # in_features 64 (int8pack, aligned rows), 40 (int8pack, 40-byte rows: crashes however the
    # data is placed) and 37 (not a multiple of 4: quanto's plain matmul)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 37), torch.nn.Linear(37, 8))
    model.to(torch.bfloat16)
    quantize(model, weights=qint8)
    freeze(model)
    realign_int8_weights(model)
    assert all(isinstance(m.weight, QTensor) and m.weight._data.data_ptr() % 16 == 0 for m in model)
    check_int8_cpu_runnable(model[0], "transformer", torch.bfloat16)
    check_int8_cpu_runnable(model[2], "transformer", torch.bfloat16)
    check_int8_cpu_runnable(model, "transformer", torch.float32)  # float32: quanto's plain matmul
    with pytest.raises(DeviceError) as err:
        check_int8_cpu_runnable(model, "transformer", torch.bfloat16)
    assert "in_features 40" in str(err.value) and "\n" not in str(err.value)


def test_int4_plan_refuses_a_bf16_layer_quanto_could_not_load(bf16_src, tmp_path):
    """The slim T5's d_ff of 37 (out_features % 16 != 0, in_features 4096: groups of 128)."""
    from transformers import T5Config, T5EncoderModel

    src = tmp_path / "src"
    shutil.copytree(bf16_src, src)
    cfg = T5Config(vocab_size=64, d_model=256, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    shutil.rmtree(src / "text_encoder_2")
    T5EncoderModel(cfg).to(torch.bfloat16).save_pretrained(src / "text_encoder_2")
    args = ("flux", "--source", str(src), "--backend", "quanto", "--scheme", "int4", "--out", str(tmp_path / "o"))
    proc = invoke(*args, "--dry-run")
    line = assert_one_line_error(proc, contains="--components transformer")
    assert "37x256" in line and "out_features" in line
    assert invoke(*args, "--dry-run", "--components", "transformer").returncode == 0
