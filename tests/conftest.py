import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, _TESTS_DIR)

# Local HTTP Hub: fixtures `hub` (session) and `hub_env` (function); see tests/hubserver/.
from hubserver.fixtures import hub, hub_env  # noqa: E402,F401

import hashlib  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Built-in pipelines are built once per checkout (ignored folder), shared by subprocesses.
os.environ.setdefault("QCONVERT_CACHE", str(REPO_ROOT / ".cache" / "qconvert"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from qconvert.tiny import builtin_path

    return builtin_path("tiny-flux")


@pytest.fixture(scope="session")
def source():
    """The built-in tiny pipeline as a resolved qconvert Source."""
    from qconvert.sources import resolve_source

    return resolve_source("tiny-flux")


@pytest.fixture(scope="session")
def slim_path() -> Path:
    from qconvert.tiny import builtin_path

    return builtin_path("slim-flux")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `qconvert` entry point in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "qconvert.cli", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *, code: int | None = None, contains: str = "") -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert contains.lower() in errors[0].lower(), errors[0]
    return errors[0]


def export_bfl(transformer_dir: Path, out_file: Path) -> Path:
    """Write a diffusers Flux transformer as a Black Forest Labs single file (test helper)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qconvert.families import flux
    from qconvert.sources import describe_files

    files = sorted(Path(transformer_dir).glob("*.safetensors"))
    tensors = describe_files(files)
    recipes = flux.diffusers_to_bfl({k: t.shape for k, t in tensors.items()})
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    out = {}
    for bfl, recipe in recipes.items():
        parts = []
        for seg in recipe:
            src = tensors[seg.key].segments[0]
            parts.append(handles[src.path].get_tensor(src.key)[seg.start : seg.stop])
        out[bfl] = torch.cat(parts, 0).contiguous()
    save_file(out, str(out_file))
    return out_file


@pytest.fixture(scope="session")
def slim_bfl_file(slim_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bfl(slim_path / "transformer", tmp_path_factory.mktemp("bfl") / "flux1-slim.safetensors")


def invoke(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI's `main()` in this process (fast: libraries stay imported), capturing output."""
    import contextlib
    import io

    from qconvert.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
