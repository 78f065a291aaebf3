"""A user sees qconvert's own lines only; the libraries' logs and progress bars with -vv (issue 14).

The noise came from bitsandbytes' logger (its CPU backend, imported by diffusers and
transformers for every command: "Failed to load CPU gemm_4bit_forward from kernels-community";
"MatMul8bitLt: inputs will be cast" per 8-bit layer call), torchao's logger at import
("Failed to load …_C_mxfp8…"), and transformers' GGUF loader, which draws its own tqdm bar
("Converting and de-quantizing GGUF tensors") when validation loads a GGUF T5.
"""

from __future__ import annotations

import re

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
