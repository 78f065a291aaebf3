"""bitsandbytes backend: layout, bit-exactness, loading, accuracy and failure modes.

Everything runs on CPU with the built-in ``tiny-flux`` pipeline (float32). The backend casts a
float32 source to the compute dtype (bf16) before quantizing, so the references are the
libraries' own on-the-fly quantization with ``torch_dtype=torch.bfloat16``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bitsandbytes  # noqa: F401  (a dev dependency: a missing one fails, never skips)
import torch

from conftest import tree_hashes

SCHEMES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
FOUR_BIT = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True)}
FILES = {"transformer": "diffusion_pytorch_model.safetensors", "text_encoder_2": "model.safetensors"}


# --- helpers -------------------------------------------------------------------------------


def read_tensors(folder: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bnb_kwargs(scheme: str, compute=None) -> dict:
    if scheme == "int8":
        return {"load_in_8bit": True}
    qt, dq = FOUR_BIT[scheme]
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": qt,
        "bnb_4bit_use_double_quant": dq,
        "bnb_4bit_compute_dtype": compute or torch.bfloat16,
    }


def expected_quantized(name: str, w: "torch.Tensor", scheme: str) -> dict[str, "torch.Tensor"]:
    """What bitsandbytes' functional quantizer gives for one Linear weight (bf16 input)."""
    import bitsandbytes.functional as F

    if scheme == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        prefix = name.removesuffix(".weight")
        return {name: cb, f"{prefix}.SCB": scb, f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    qt, dq = FOUR_BIT[scheme]
    q, st = F.quantize_4bit(w, quant_type=qt, blocksize=64, compress_statistics=dq)
    return {name: q, **{f"{name}.{k}": v for k, v in st.as_dict(packed=True).items()}}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs(source, tmp_path_factory):
    from qconvert.convert import convert

    root = tmp_path_factory.mktemp("bnb-out")
    return {s: convert(source, "bnb", s, root / s, progress=False) for s in SCHEMES}


@pytest.fixture(scope="module")
def references(source, tmp_path_factory):
    """scheme -> folder with the libraries' own quantize-on-load + save_pretrained (bf16)."""
    root = tmp_path_factory.mktemp("bnb-ref")
    cache: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in cache:
            import diffusers
            import transformers

            from qconvert.convert.bnb_cpu import allow_bnb_on_cpu

            with allow_bnb_on_cpu():
                tr = diffusers.FluxTransformer2DModel.from_pretrained(
                    source.root / "transformer",
                    quantization_config=diffusers.BitsAndBytesConfig(**bnb_kwargs(scheme)),
                    torch_dtype=torch.bfloat16,
                )
            tr.save_pretrained(root / scheme / "transformer")
            t5 = transformers.T5EncoderModel.from_pretrained(
                source.root / "text_encoder_2",
                quantization_config=transformers.BitsAndBytesConfig(**bnb_kwargs(scheme)),
                dtype=torch.bfloat16,
            )
            t5.save_pretrained(root / scheme / "text_encoder_2")
            cache[scheme] = root / scheme
        return cache[scheme]

    return get


# --- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tensors_equal_functional_quantizer(scheme, source, outputs):
    """Every written tensor equals bitsandbytes' own quantizer output (or the bf16 source)."""
    from safetensors import safe_open

    from qconvert.convert.base import model_facts

    out = outputs[scheme].out
    for comp_name in ("transformer", "text_encoder_2"):
        comp = source.components[comp_name]
        facts = model_facts(comp)
        written = read_tensors(out / comp_name)
        expected: dict[str, torch.Tensor] = {}
        quantized = 0
        for name, st in comp.tensors.items():
            with safe_open(str(st.segments[0].path), "pt") as h:
                w = h.get_tensor(st.segments[0].key).to(torch.bfloat16)  # fp32 source -> bf16
            is_wo = name.endswith(".wo.weight")
            if name in facts.linear_weights and not is_wo:
                expected.update(expected_quantized(name, w, scheme))
                quantized += 1
            else:
                expected[name] = w
        assert set(written) == set(expected)
        for k, v in expected.items():
            assert written[k].dtype == v.dtype, k
            assert torch.equal(written[k], v), k
        linears = len(facts.linear_weights)
        wo = sum(n.endswith(".wo.weight") for n in facts.linear_weights)
        assert quantized == linears - wo and quantized > 0
        if comp_name == "transformer":
            assert wo == 0  # diffusers quantizes every Linear of Flux
            for m in ("x_embedder", "proj_out", "norm_out.linear"):
                assert written[f"{m}.weight"].dtype in (torch.uint8, torch.int8)
        else:
            assert wo == 2 and written["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.bfloat16
        if scheme != "int8":
            qt, dq = FOUR_BIT[scheme]
            lin = "x_embedder" if comp_name == "transformer" else "encoder.block.0.layer.0.SelfAttention.q"
            meta = json.loads(bytes(written[f"{lin}.weight.quant_state.bitsandbytes__{qt}"].tolist()))
            assert meta["dtype"] == "bfloat16" and meta["blocksize"] == 64
            assert ("nested_offset" in meta) == dq


@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_library_save(scheme, outputs, references):
    """Key sets (and, on CPU, the tensors) equal diffusers'/transformers' own save; config too."""
    import diffusers
    import transformers

    ref = references(scheme)
    out = outputs[scheme].out
    for comp_name, lib in (("transformer", diffusers), ("text_encoder_2", transformers)):
        ours = read_tensors(out / comp_name)
        theirs = read_tensors(ref / comp_name)
        assert set(ours) == set(theirs)
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype, k
            assert torch.equal(ours[k], theirs[k]), k
        ours_cfg = json.loads((out / comp_name / "config.json").read_text())["quantization_config"]
        theirs_cfg = json.loads((ref / comp_name / "config.json").read_text())["quantization_config"]
        assert ours_cfg == theirs_cfg == lib.BitsAndBytesConfig(**bnb_kwargs(scheme)).to_dict()
        assert ours_cfg["quant_method"] == "bitsandbytes"
        assert sorted(p.name for p in (out / comp_name).iterdir()) == ["config.json", FILES[comp_name]]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_estimate_bytes(scheme, outputs):
    """The plan's byte estimate equals the written tensor bytes (double quant: within bytes)."""
    from qconvert.sources import DTYPE_SIZES, read_safetensors_header

    res = outputs[scheme]
    for comp_name in ("transformer", "text_encoder_2"):
        cp = res.plan.component(comp_name)
        header, _ = read_safetensors_header(res.out / comp_name / FILES[comp_name])
        actual = 0
        for e in header.values():
            n = 1
            for d in e.shape:
                n *= d
            actual += n * DTYPE_SIZES[e.dtype]
        slack = 0 if scheme in ("nf4", "fp4", "int8") else 8 * cp.quantized_count
        assert abs(cp.bytes_out - actual) <= slack, (cp.bytes_out, actual)


# --- loading -------------------------------------------------------------------------------


# bitsandbytes has two CPU paths for 4-bit layers: the portable one (dequantize + matmul) and,
# on CPUs with AVX512-BF16, a fused kernel that first repacks the weight. "off" forces the
# portable path; "auto" is what the machine does (the repacked kernel where it can run).
REPACK_MODES = ("off", "auto")


def _generate(pipe) -> "torch.Tensor":
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def _packed_layers(pipe) -> tuple[int, int]:
    """(4-bit layers whose weight bitsandbytes repacked, 4-bit layers) after a forward."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for c in (pipe.transformer, pipe.text_encoder_2) for m in c.modules() if isinstance(m, Linear4bit)]
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers), len(layers)


@pytest.mark.parametrize("repack", REPACK_MODES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_loads_and_generates(scheme, repack, outputs):
    import diffusers
    import transformers
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    from qconvert.convert.bnb_cpu import allow_bnb_on_cpu, cpu_has_repack_kernel, load_pipeline_on_cpu

    out = outputs[scheme].out
    cls = Linear8bitLt if scheme == "int8" else Linear4bit
    with allow_bnb_on_cpu():
        tr, info = diffusers.FluxTransformer2DModel.from_pretrained(out / "transformer", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert isinstance(tr.x_embedder, cls) and isinstance(tr.proj_out, cls)
    del tr
    t5, info = transformers.T5EncoderModel.from_pretrained(out / "text_encoder_2", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, cls)
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear
    del t5

    # A plain load; for nf4 also the way users load it (a float32 T5 would break this one).
    for dtype in (torch.float32, torch.bfloat16) if scheme == "nf4" else (torch.float32,):
        pipe = load_pipeline_on_cpu(out, dtype=dtype, repack=repack)
        image = _generate(pipe)
        assert image.shape == (1, 3, 32, 32)
        assert bool(torch.isfinite(image).all())
        packed, layers = _packed_layers(pipe)
        if scheme != "int8":  # tiny-flux has 4-bit layers wide enough for the repack, and narrow ones
            assert 0 < layers
            assert (packed > 0) == (repack == "auto" and cpu_has_repack_kernel()), (packed, layers)
            assert packed < layers


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "int8"])
def test_repack_guard_matches_bitsandbytes(scheme, outputs):
    """On any CPU: bitsandbytes' own repack succeeds (and inverts exactly) on the layers
    ``can_repack`` admits and raises on the others — the failure AVX512-BF16 machines hit."""
    import copy

    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit

    from qconvert.convert.bnb_cpu import can_repack, load_pipeline_on_cpu

    pipe = load_pipeline_on_cpu(outputs[scheme].out, dtype=torch.float32, repack="off")
    verdicts = {True: 0, False: 0}
    for comp in (pipe.transformer, pipe.text_encoder_2):
        for name, m in comp.named_modules():
            if not isinstance(m, Linear4bit):
                continue
            state, data = copy.deepcopy(m.weight.quant_state), m.weight.data.clone()
            fits = can_repack(state.shape, state.blocksize)
            verdicts[fits] += 1
            if not fits:
                with pytest.raises((RuntimeError, AssertionError)):
                    F._convert_weight_packed_for_cpu(data, state)
                continue
            packed, packed_state = F._convert_weight_packed_for_cpu(data, state)
            back, _ = F._convert_weight_packed_for_cpu_inverse(packed, packed_state)
            assert torch.equal(back.view(torch.uint8), m.weight.data.view(torch.uint8)), name
    assert verdicts[True] > 0 and verdicts[False] > 0, verdicts


def test_narrow_layer_on_the_repack_path_is_the_original_failure(outputs):
    """What `qconvert validate` hit on AVX512-BF16 CPUs, reproduced on any CPU: a 32-wide T5
    layer sent down the repack path fails in bitsandbytes before any kernel runs; the guard
    keeps it off that path whatever the mode."""
    from qconvert.convert.bnb_cpu import configure_cpu_repack, load_pipeline_on_cpu

    pipe = load_pipeline_on_cpu(outputs["nf4"].out, dtype=torch.float32, repack="off")
    layer = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.o  # 32 -> 32
    x = torch.randn(1, 3, layer.in_features)
    del layer.forward  # bitsandbytes' own forward, as it runs on such a CPU
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="is invalid for input of size"):
        layer(x)
    pipe = load_pipeline_on_cpu(outputs["nf4"].out, dtype=torch.float32, repack="auto")
    layer = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.o
    assert layer.support_avx512bf16_for_cpu is False
    plan = configure_cpu_repack(pipe.text_encoder_2, "auto")
    assert plan.reference > 0 and plan.repacked == plan.dequantize == 0  # every tiny T5 layer is narrow
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq", "fp4"])
def test_reference_path_reads_the_blocks_as_written(scheme, source, outputs):
    """Narrow layers dequantize block by block over the flattened weight, as bitsandbytes
    quantized them (and as CUDA reads them): the layer equals a plain Linear on that weight and
    its error against the source stays in the scheme's band (bitsandbytes' per-row C
    dequantizer reads the wrong absmax on such rows: ~2x the error)."""
    from qconvert.convert.bnb_cpu import load_pipeline_on_cpu

    pipe = load_pipeline_on_cpu(outputs[scheme].out, dtype=torch.float32)
    layer = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.o
    assert "forward" in layer.__dict__  # the reference path
    name = "encoder.block.0.layer.0.SelfAttention.o.weight"
    from qconvert.sources import TensorReader

    with TensorReader() as reader:
        w = reader.load(source.components["text_encoder_2"].tensors[name]).to(torch.bfloat16).float()
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        dense = layer(eye).T  # the weight the layer applies, (out, in)
    err = float((dense - w).norm() / w.norm())
    assert err < BANDS[scheme][1] * 1.5, err  # a 32x32 matrix: a small sample of the band


def test_repack_mode_on(outputs, monkeypatch):
    """``on`` runs the repacked kernel on every layer that fits it where the CPU has one, and is
    a one-line device error where it has not (the kernel is the only reader of that layout)."""
    from qconvert.convert.bnb_cpu import REPACK_ENV, cpu_has_repack_kernel, load_pipeline_on_cpu
    from qconvert.errors import DeviceError, UsageError

    monkeypatch.setenv(REPACK_ENV, "on")
    if cpu_has_repack_kernel():
        pipe = load_pipeline_on_cpu(outputs["nf4"].out, dtype=torch.float32)
        assert torch.isfinite(_generate(pipe)).all()
        assert _packed_layers(pipe)[0] > 0
    else:
        with pytest.raises(DeviceError, match="AVX512-BF16"):
            load_pipeline_on_cpu(outputs["nf4"].out, dtype=torch.float32)
    monkeypatch.setenv(REPACK_ENV, "sometimes")
    with pytest.raises(UsageError, match="auto, on, off"):
        load_pipeline_on_cpu(outputs["nf4"].out, dtype=torch.float32)


def test_allow_bnb_on_cpu_restores():
    from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    from qconvert.convert.bnb_cpu import allow_bnb_on_cpu

    before = {c: (c.__dict__["validate_environment"], c.__dict__["update_device_map"])
              for c in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer)}  # fmt: skip
    with pytest.raises(KeyError):
        with allow_bnb_on_cpu():
            for c in before:
                assert c.update_device_map(None, None) == {"": "cpu"}
                assert c.validate_environment(None) is None
            raise KeyError("boom")
    for c, (v, u) in before.items():
        assert c.__dict__["validate_environment"] is v and c.__dict__["update_device_map"] is u
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="No GPU"):
            BnB4BitDiffusersQuantizer.validate_environment(None)


# --- accuracy ------------------------------------------------------------------------------

# Typical relative error on Gaussian weights: nf4 ~0.092, fp4 ~0.122, int8 ~0.0077.
BANDS = {
    "nf4": (0.08, 0.10), "nf4-dq": (0.08, 0.10), "fp4": (0.11, 0.13), "fp4-dq": (0.11, 0.13),
    "int8": (0.004, 0.012),
}  # fmt: skip


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_relative_error(scheme, dtype):
    import bitsandbytes.functional as F

    from qconvert.convert.bnb import BitsAndBytesBackend
    from qconvert.plan import QUANTIZE, TensorPlan

    w = (torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(getattr(torch, dtype))
    backend = BitsAndBytesBackend(scheme)
    plan = TensorPlan("blk.lin.weight", (512, 512), "F32", QUANTIZE, scheme, w.nbytes, 0)
    out = dict(backend.encode("transformer", plan, w))
    if scheme == "int8":
        assert set(out) == {"blk.lin.weight", "blk.lin.SCB", "blk.lin.weight_format"}
        deq = F.int8_vectorwise_dequant(out["blk.lin.weight"], out["blk.lin.SCB"])
    else:
        stats = {k.removeprefix("blk.lin.weight."): v for k, v in out.items() if k != "blk.lin.weight"}
        qs = F.QuantState.from_dict(stats, device="cpu")
        assert qs.dtype == torch.bfloat16  # fp32 input is cast to the compute dtype first
        deq = F.dequantize_4bit(out["blk.lin.weight"], qs)
    ref = w.float()
    rel = float((deq.float() - ref).norm() / ref.norm())
    lo, hi = BANDS[scheme]
    assert lo < rel < hi, rel


@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_chunked_quantization_is_identical(scheme, monkeypatch):
    """Big weights are quantized in row chunks; the bytes equal one quantize call on the whole."""
    from qconvert.convert.bnb import BitsAndBytesBackend
    from qconvert.plan import QUANTIZE, TensorPlan

    for shape in ((512, 512), (333, 77)):  # 77 columns: chunks of 64 rows keep blocks whole
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
        backend = BitsAndBytesBackend(scheme)
        monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 5000)
        plan = TensorPlan("m.weight", shape, "F32", QUANTIZE, scheme, w.nbytes, 0)
        rows = backend.chunk_rows(plan)
        assert rows and rows < shape[0] and (scheme == "int8" or rows * shape[1] % 64 == 0)
        got = dict(backend.encode("transformer", plan, w))
        want = expected_quantized("m.weight", w.to(torch.bfloat16), scheme)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_conversion_is_identical(scheme, source, outputs, tmp_path, monkeypatch):
    """The scheduler's row-chunked reading (chunk_rows/encode_chunk/finish_tensor) writes the same bytes."""
    from qconvert.convert import convert
    from qconvert.convert.bnb import BitsAndBytesBackend

    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 1024)  # several chunks for most Linears
    res = convert(source, "bnb", scheme, tmp_path / "o", progress=False)
    probe = BitsAndBytesBackend(scheme)
    assert sum(bool(probe.chunk_rows(tp)) for tp in res.plan.component("transformer").tensors) >= 5
    for comp_name in ("transformer", "text_encoder_2"):
        got, want = read_tensors(res.out / comp_name), read_tensors(outputs[scheme].out / comp_name)
        assert set(got) == set(want)
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    ok = res.manifest["components"]["transformer"]["files"]
    assert ok == outputs[scheme].manifest["components"]["transformer"]["files"]  # same sha256


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_jobs_do_not_change_the_output(scheme, source, outputs, tmp_path):
    """One worker and several (the default is every core) write the same files."""
    from qconvert.convert import convert

    res = convert(source, "bnb", scheme, tmp_path / "one", progress=False, options={"jobs": 1})
    assert tree_hashes(res.out) == tree_hashes(outputs[scheme].out)
    res = convert(source, "bnb", scheme, tmp_path / "five", progress=False, options={"jobs": 5})
    assert tree_hashes(res.out) == tree_hashes(outputs[scheme].out)


# --- options -------------------------------------------------------------------------------


def test_compute_dtype_option():
    from qconvert.convert.bnb import BitsAndBytesBackend
    from qconvert.errors import UsageError

    for alias, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("float32", "float32"), (None, "bfloat16")):
        opts = {} if alias is None else {"compute_dtype": alias}
        assert BitsAndBytesBackend("nf4", **opts).compute_dtype == name
    with pytest.raises(UsageError) as e:
        BitsAndBytesBackend("nf4", compute_dtype="nonsense")
    assert "float32" in e.value.one_line() and "bfloat16" in e.value.one_line()
    with pytest.raises(UsageError):
        BitsAndBytesBackend("nf3")
    assert set(BitsAndBytesBackend.schemes) == set(SCHEMES)


def test_float32_compute_and_keep_fp32_option(source, tmp_path):
    """compute_dtype=float32 keeps a float32 source float32; quantize_keep_fp32 quantizes T5 wo."""
    from qconvert.convert import convert

    res = convert(
        source, "bnb", "nf4", tmp_path / "o", components=("text_encoder_2",), progress=False,
        options={"compute_dtype": "fp32", "quantize_keep_fp32": True},
    )  # fmt: skip
    t = read_tensors(res.out / "text_encoder_2")
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert t[wo].dtype == torch.uint8 and f"{wo}.quant_state.bitsandbytes__nf4" in t
    assert json.loads(bytes(t[f"{wo}.quant_state.bitsandbytes__nf4"].tolist()))["dtype"] == "float32"
    assert t["shared.weight"].dtype == torch.float32
    cfg = json.loads((res.out / "text_encoder_2" / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_compute_dtype"] == "float32"
    # the transformer was not asked for: copied unchanged
    assert "quantization_config" not in json.loads((res.out / "transformer" / "config.json").read_text())


# --- command line --------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom qconvert.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )


@pytest.mark.slow
@pytest.mark.parametrize("repack", REPACK_MODES)
def test_cli_converts(repack, tmp_path):
    """Converts and validates on CPU with either bitsandbytes CPU path (the tiny pipeline has
    layers narrower than a 4-bit block, which the repack path cannot take)."""
    from qconvert.convert.bnb_cpu import REPACK_ENV, cpu_has_repack_kernel

    out = tmp_path / "cli-out"
    r = subprocess.run(
        [sys.executable, "-m", "qconvert.cli", "-q", "flux", "--source", "tiny-flux", "--backend", "bnb",
         "--scheme", "nf4-dq", "--compute-dtype", "bf16", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, REPACK_ENV: repack},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["backend"] == "bnb" and manifest["scheme"] == "nf4-dq"
    assert manifest["options"]["compute_dtype"] == "bf16"
    assert "bitsandbytes" in manifest["versions"]
    cfg = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_use_double_quant"] is True and cfg["bnb_4bit_compute_dtype"] == "bfloat16"
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True
    kernels = report["environment"]["bnb_cpu_kernels"]
    assert kernels["avx512_bf16"] is cpu_has_repack_kernel()
    layers = kernels["layers"]
    assert (layers["repacked"] > 0) == (repack == "auto" and cpu_has_repack_kernel())
    assert layers["repacked"] + layers["dequantize"] == 4 and layers["reference"] > 0  # tiny-flux: 4 wide layers


@pytest.mark.parametrize(
    "extra, prelude, code, needle",
    [
        (["--scheme", "nf3"], "", 2, "unknown bnb scheme 'nf3'"),
        (["--scheme", "nf4", "--compute-dtype", "nonsense"], "", 2, "unknown compute dtype 'nonsense'"),
        (["--scheme", "nf4"], "sys.modules['bitsandbytes'] = None", 3, "pip install 'qconvert[bnb]'"),
    ],
    ids=["bad-scheme", "bad-compute-dtype", "no-bitsandbytes"],
)
def test_cli_errors(extra, prelude, code, needle, tmp_path):
    out = tmp_path / "never"
    args = ["flux", "--source", "tiny-flux", "--backend", "bnb", *extra, "--out", str(out)]
    r = run_cli(args, tmp_path, prelude)
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in tmp_path.iterdir())
