"""The GGUF backend's ``gguf_search`` option: ggml's weighted search (default) or its reference.

The default changes the bytes of exactly the types with a weighted path in ggml
(ggml_weighted.WEIGHTED_TYPES); ``reference`` keeps gguf-py's / kquants' bytes (ggml's
``*_ref``), so llama.cpp's unweighted output can still be reproduced byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from conftest import assert_one_line_error, invoke
from qconvert.convert import gguf as G
from qconvert.convert.ggml_weighted import WEIGHTED_TYPES, quantize_weighted
from qconvert.convert.kquants import quantize_kquant
from qconvert.errors import UsageError

Q = GGMLQuantizationType


def test_tables_agree():
    assert G.WEIGHTED_TYPES == WEIGHTED_TYPES  # gguf.py keeps its own copy: planning imports no numpy
    assert G.GGUFBackend.recorded_defaults == {"gguf_search": "weighted"}


@pytest.mark.parametrize("target", [*WEIGHTED_TYPES, "Q8_0", "F16"])
def test_encode_array_dispatch(target):
    x = np.random.default_rng(4).standard_normal((4, 512), dtype=np.float32)
    raw = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    xf = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    weighted = G.encode_array(raw, "BF16", target)
    reference = G.encode_array(raw, "BF16", target, search="reference")
    if target not in WEIGHTED_TYPES:  # one path only: the option changes nothing
        assert np.array_equal(weighted, reference)
        return
    assert np.array_equal(weighted, quantize_weighted(xf, target))
    want = quantize_kquant(xf, Q[target]) if target.endswith("_K") else quants.quantize(xf, Q[target])
    assert np.array_equal(reference, want)
    assert not np.array_equal(weighted, reference)


def test_option_values():
    assert G.GGUFBackend("Q4_K_S").gguf_search == "weighted"
    assert G.GGUFBackend("Q4_K_S", gguf_search="reference").gguf_search == "reference"
    with pytest.raises(UsageError, match="unknown gguf search 'imatrix'"):
        G.GGUFBackend("Q4_K_S", gguf_search="imatrix")


def _fields(path) -> dict:
    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("qconvert.")}


def _tensor(path, name: str) -> np.ndarray:
    [t] = [t for t in GGUFReader(str(path)).tensors if t.name == name]
    return np.asarray(t.data).reshape(-1)


def test_conversion_records_the_search_and_only_the_blocks_change(source, tmp_path):
    from qconvert.cards.data import reproduce_command
    from qconvert.convert import convert

    out = {}
    for search in ("weighted", "reference"):
        opts = {"layout": "diffusers", "jobs": 1} | ({"gguf_search": search} if search == "reference" else {})
        out[search] = convert(source, "gguf", "Q4_0", tmp_path / search, components=("transformer",),
                              progress=False, options=opts)  # fmt: skip
    for search, res in out.items():
        assert res.manifest["options"]["gguf_search"] == search  # recorded, the default included
        [path] = res.out.glob("*.gguf")
        assert _fields(path)["qconvert.gguf_search"] == search
        assert f"--gguf-search {search}" in reproduce_command(res.manifest, "o")
        words = "weighted quantizers" if search == "weighted" else "reference quantizers"
        assert words in G.GGUFBackend.card_method(res.manifest)
    pw, pr = (next(out[s].out.glob("*.gguf")) for s in ("weighted", "reference"))
    types = {t.out_name: t.target for cp in out["weighted"].plan.components for t in cp.tensors}
    q4 = [n for n, t in types.items() if t == "Q4_0"]
    f32 = [n for n, t in types.items() if t == "F32"]
    assert q4 and f32
    assert all(np.array_equal(_tensor(pw, n), _tensor(pr, n)) for n in f32)
    assert not all(np.array_equal(_tensor(pw, n), _tensor(pr, n)) for n in q4)


def test_cli_flag(tmp_path):
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "gguf", "--scheme", "Q4_0", "--gguf-search", "bogus",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2 and "bogus" in proc.stderr
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "bnb", "--scheme", "nf4", "--gguf-search", "reference",
                  "--dry-run")  # fmt: skip
    assert_one_line_error(proc, code=2, contains="does not take 'gguf_search'")
