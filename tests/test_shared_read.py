"""qconvert.convert.shared_read: several variants from one read, byte-identical to single runs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import assert_one_line_error, invoke  # noqa: E402

from qconvert.convert import convert
from qconvert.convert.shared_read import SharedReader, Variant, convert_many
from qconvert.sources import TensorReader, resolve_source

VARIANTS = [("bnb", "nf4"), ("bnb", "int8"), ("torchao", "int8wo"), ("gguf", "Q8_0")]
COMPONENTS = ("transformer", "text_encoder_2")


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """Each variant converted alone, as `qconvert flux` does."""
    root = tmp_path_factory.mktemp("singles")
    src = resolve_source("tiny-flux")
    return {
        (b, s): _digests(convert(src, b, s, root / f"{b}-{s}", components=COMPONENTS, progress=False).out)
        for b, s in VARIANTS
    }


def test_convert_many_equals_single_runs_and_reads_less(tmp_path, singles):
    src = resolve_source("tiny-flux")
    variants = [Variant(b, s, tmp_path / f"{b}-{s}") for b, s in VARIANTS]
    results, reads = convert_many(src, variants, components=COMPONENTS)
    for (b, s), r in zip(VARIANTS, results):
        assert not isinstance(r, BaseException), r
        assert _digests(r.out) == singles[(b, s)], f"{b} {s}"
    weights = sum(src.components[c].nbytes for c in COMPONENTS)
    # every variant asked for every planned tensor; the source was read about once
    assert reads["bytes_served"] >= len(VARIANTS) * weights * 0.9
    # GGUF reads the BFL layout (q/k/v fused from rows of three stored tensors): shared too
    assert reads["bytes_read"] <= 1.1 * weights
    assert reads["bytes_read"] < reads["bytes_served"] / 3


def test_a_failing_variant_leaves_the_others_whole(tmp_path, singles):
    src = resolve_source("tiny-flux")
    variants = [Variant("bnb", "nf4", tmp_path / "a"), Variant("torchao", "int4wo", tmp_path / "b")]  # int4wo needs CUDA
    results, _ = convert_many(src, variants, components=COMPONENTS)
    assert _digests(results[0].out) == singles[("bnb", "nf4")]
    assert isinstance(results[1], Exception)
    assert not (tmp_path / "b").exists()


def test_budget_bounds_what_is_held():
    """Over budget, a tensor is read uncached rather than held: memory stays bounded."""
    src = resolve_source("tiny-flux")
    tensors = list(src.components["transformer"].tensors.values())
    with TensorReader() as base:
        shared = SharedReader(base, budget=1)
        a, b = shared.view(0), shared.view(1)
        a.expect(tensors)
        b.expect(tensors)
        for t in tensors:
            assert a.load(t).equal(b.load(t))
        assert shared._held == 0
        assert shared.bytes_read == 2 * sum(t.nbytes for t in tensors if t.nbytes > 0)


def test_tensors_are_dropped_when_every_reader_finished():
    src = resolve_source("tiny-flux")
    tensors = list(src.components["transformer"].tensors.values())[:5]
    with TensorReader() as base:
        shared = SharedReader(base)
        a, b = shared.view(0), shared.view(1)
        a.expect(tensors)
        b.expect(tensors)
        for t in tensors:
            a.load(t)
        assert shared._held == sum(t.nbytes for t in tensors)
        for t in tensors:
            b.load(t, rows=(0, t.shape[0]) if t.shape else None)
        assert shared._held == 0
        assert shared.bytes_read == sum(t.nbytes for t in tensors)


def test_cli_several_schemes_one_read(tmp_path, singles):
    """`qconvert flux --scheme a,b`: one folder per scheme under --out, as single runs write them."""
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "bnb", "--scheme", "nf4,int8",
                  "--out", str(tmp_path), "--no-validate")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "GB of source for" in proc.stderr
    for scheme in ("nf4", "int8"):
        assert _digests(tmp_path / f"tiny-flux-bnb-{scheme}") == singles[("bnb", scheme)]


@pytest.mark.parametrize(
    "extra, contains",
    [(("--scheme", "nf4,nf4"), "names a scheme twice"), (("--scheme", "nf4,int8", "--dry-run"), "--dry-run takes one"),
     (("--scheme", "nf4,int8", "--push", "--repo-id", "me/x"), "--repo-id takes one"), (("--scheme", ","), "is empty")],
)  # fmt: skip
def test_cli_several_schemes_bad_input(tmp_path, extra, contains):
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "bnb", "--out", str(tmp_path / "o"), *extra)
    assert_one_line_error(proc, code=2, contains=contains)
    assert not (tmp_path / "o").exists()


def test_outputs_that_do_not_fit_together_are_converted_one_at_a_time(tmp_path, singles, monkeypatch):
    """All outputs exist at once in one read; when the disk cannot hold them all, run_many
    converts them one after the other (each checked on its own) with the same bytes."""
    import shutil as real_shutil
    from collections import namedtuple

    from qconvert import output
    from qconvert.job import Job, fit_together, plan_of, run_many

    jobs = [Job("tiny-flux", b, s, out=tmp_path / s, validate=False, components=COMPONENTS) for b, s in VARIANTS[:2]]
    src = resolve_source("tiny-flux")
    assert fit_together(jobs, src) is None
    one = max(plan_of(j, src).bytes_out for j in jobs)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage(0, 0, int(one * 1.5)))
    assert "not enough free disk" in fit_together(jobs, src)
    events = []
    results = run_many(jobs, on_event=lambda i, kind, value: events.append((kind, value)))
    monkeypatch.setattr(output.shutil, "disk_usage", real_shutil.disk_usage)
    assert any(k == "info" and "one output at a time" in v for k, v in events)
    for (b, s), r in zip(VARIANTS[:2], results):
        assert _digests(r.out) == singles[(b, s)]
