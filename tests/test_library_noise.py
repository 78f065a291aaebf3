"""A user sees qconvert's own lines only; the libraries' logs and progress bars with -vv (issue 14).

The noise came from bitsandbytes' logger (its CPU backend, imported by diffusers and
transformers for every command: "Failed to load CPU gemm_4bit_forward from kernels-community";
"MatMul8bitLt: inputs will be cast" per 8-bit layer call), torchao's logger at import
("Failed to load …_C_mxfp8…"), and transformers' GGUF loader, which draws its own tqdm bar
("Converting and de-quantizing GGUF tensors") when validation loads a GGUF T5.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import run_cli

# What qconvert itself writes to stderr during `flux` (State.info lines and its own bar)
QCONVERT_LINES = (
    re.compile(r"resolving source \S+"),
    re.compile(r"validating \(load as a user would, generate, compare with the source\)"),
    re.compile(r"converting: .*"),  # its own progress bar (tqdm, cleared with leave=False)
)

CASES = {
    "gguf": ("--backend", "gguf", "--scheme", "Q8_0", "--layout", "diffusers"),
    "torchao": ("--backend", "torchao", "--scheme", "int8wo"),
    "bnb": ("--backend", "bnb", "--scheme", "int8"),
}


def foreign_lines(stderr: str) -> list[str]:
    """Lines (and progress-bar redraws, split at carriage returns) that are not qconvert's."""
    pieces = [p.strip() for p in re.split(r"[\r\n]", stderr)]
    return [p for p in pieces if p and not any(rx.fullmatch(p) for rx in QCONVERT_LINES)]


@pytest.mark.parametrize("backend", sorted(CASES))
def test_a_conversion_prints_only_qconvert_lines(backend, tmp_path):
    proc = run_cli("flux", "--source", "tiny-flux", *CASES[backend], "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert foreign_lines(proc.stderr) == [], proc.stderr
    assert "resolving source tiny-flux" in proc.stderr and "validating" in proc.stderr


def test_library_messages_come_back_with_vv(tmp_path):
    proc = run_cli("-vv", "flux", "--source", "tiny-flux", *CASES["gguf"], "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "Converting and de-quantizing GGUF tensors" in proc.stderr


# Runs the CLI in a fresh interpreter, then prints which of the heavy libraries it imported.
IMPORTED = """
import sys
from qconvert.cli import main
code = main(sys.argv[1:])
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
sys.exit(code)
"""


def _imported(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run([sys.executable, "-c", IMPORTED, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip
    return proc, (proc.stdout.strip().splitlines() or [""])[-1]


def test_bad_input_fails_without_importing_the_libraries(tmp_path):
    """The libraries are quieted by post-import hooks, not imported to quiet them (~3 s)."""
    proc, imported = _imported("flux", "--source", str(tmp_path / "missing"), "--backend", "gguf", "--scheme",
                               "Q8_0", "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode != 0 and "not found" in proc.stderr, proc.stderr
    assert imported == "[]", proc.stdout


def test_a_gguf_conversion_with_cached_facts_never_imports_diffusers(tmp_path, tiny_path):
    """The second conversion of a model reads its model facts from the cache: diffusers' model
    classes (~3 s of imports) are not needed to write a GGUF."""
    env = {"QCONVERT_CACHE": str(tmp_path / "cache")}
    args = ("flux", "--source", str(tiny_path), "--backend", "gguf", "--scheme", "Q8_0", "--components",
            "transformer", "--no-validate", "-q")  # fmt: skip
    first, imported_first = _imported(*args, "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr
    assert "diffusers" in imported_first  # built the facts from the model class
    second, imported_second = _imported(*args, "--out", str(tmp_path / "b"), env=env)
    assert second.returncode == 0, second.stderr
    assert imported_second == "['torch']", second.stdout
    assert foreign_lines(second.stderr) == []
    for a in sorted((tmp_path / "a").rglob("*.gguf")):  # the same bytes either way
        assert a.read_bytes() == (tmp_path / "b" / a.relative_to(tmp_path / "a")).read_bytes()
    assert list((tmp_path / "a").rglob("*.gguf"))
