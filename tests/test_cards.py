"""Model cards: metadata, license, determinism, and a usage snippet that really runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli, tree_hashes
from qconvert.cards import CARD_MARKER, USAGE_MARKER, card_text, extract_usage, render_card
from qconvert.identity import hub_repo_from_path
from qconvert.errors import InputError, UsageError

TAGS = ["quantized", "torchao", "int8wo", "flux", "qconvert"]


def shared_validated_int8(tmp_path_factory) -> Path:
    """tiny-flux -> torchao int8wo, converted and validated once per session (test_publish too)."""
    base = tmp_path_factory.getbasetemp() / "shared-tiny-flux-torchao-int8wo"
    if not (base / "validation.json").is_file():
        from qconvert.convert import convert
        from qconvert.sources import resolve_source
        from qconvert.validate import validate

        work = base.with_name(f"{base.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        convert(resolve_source("tiny-flux"), "torchao", "int8wo", work / "out", progress=False)
        report = validate(work / "out", device="cpu", steps=2, prompts=["a photo of a cat"])
        assert report.passed, report.table()
        if not base.exists():
            os.rename(work / "out", base)
        shutil.rmtree(work, ignore_errors=True)
    return base


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cards") / "tiny-flux-int8wo"
    shutil.copytree(shared_validated_int8(tmp_path_factory), out)
    return out


@pytest.fixture(scope="module")
def local_source(tmp_path_factory, tiny_path) -> Path:
    """tiny-flux as a local pipeline folder, i.e. a source qconvert does not know the license of."""
    src = tmp_path_factory.mktemp("src") / "my-flux"
    shutil.copytree(tiny_path, src)
    for p in list(src.glob("README*")) + list(src.glob("LICENSE*")):
        p.unlink()
    return src


def _convert(source: str, backend: str, scheme: str, out: Path, **options) -> Path:
    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    convert(resolve_source(source), backend, scheme, out, progress=False, options=options or None)
    return out


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def test_tiny_demo_card_metadata(int8_out):
    from huggingface_hub import ModelCard

    path = render_card(int8_out)
    assert path == int8_out / "README.md"
    text = path.read_text()
    meta = _front_matter(text)
    assert meta == {
        "library_name": "diffusers",
        "license": "apache-2.0",
        "pipeline_tag": "text-to-image",
        "tags": TAGS,
    }
    # huggingface_hub reads back exactly that (the Hub's own parser)
    assert ModelCard(text).data.to_dict() == meta
    assert CARD_MARKER in text and USAGE_MARKER in text

    with_base = card_text(int8_out, base_model="black-forest-labs/FLUX.1-dev")
    meta = _front_matter(with_base)
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["base_model_relation"] == "quantized"
    assert ModelCard(with_base).data.to_dict() == meta
    with pytest.raises(UsageError):
        card_text(int8_out, base_model="not a repo id")


def test_a_hand_written_readme_is_not_overwritten(int8_out, tmp_path):
    out = tmp_path / "own-card"
    shutil.copytree(int8_out, out)
    (out / "README.md").write_text("# my own card\n")
    with pytest.raises(UsageError, match="not written by qconvert"):
        render_card(out)
    assert (out / "README.md").read_text() == "# my own card\n"


def test_card_body_reports_conversion_and_validation(int8_out):
    text = card_text(int8_out)
    manifest = json.loads((int8_out / "qconvert.json").read_text())
    report = json.loads((int8_out / "validation.json").read_text())
    from qconvert.plan import human_bytes

    t = manifest["components"]["transformer"]
    assert "| `transformer` | int8 weight-only" in text
    assert human_bytes(t["bytes_in"]) in text and human_bytes(t["bytes_out"]) in text
    assert 'pip install "diffusers>=0.42.1"' in text and '"torchao==' in text
    assert "**Passed**" in text and "not validated" not in text
    assert f"{report['quality']['psnr']:.2f} dB" in text
    assert "SSIM" in text and "forward error" in text and "peak memory" in text
    assert "Measured on cpu" in text and "torch " in text
    assert "![Samples" in text and "(samples/grid.png)" in text
    assert "qconvert flux --source tiny-flux --backend torchao --scheme int8wo" in text
    assert "Apache License 2.0" in text
    lpips = report["quality"]["lpips"]  # measured only where torchvision and AlexNet's weights are
    row = f"— |  | {report['quality']['lpips_note']}" if lpips is None else f"{lpips:.4f} |  | measured (no limit set)"
    assert f"| LPIPS vs reference (AlexNet) | {row} |" in text


def test_card_shows_identical_images_as_infinite_psnr(int8_out, tmp_path):
    out = tmp_path / "same"
    shutil.copytree(int8_out, out)
    v = json.loads((out / "validation.json").read_text())
    v["quality"].update(psnr=None, identical_images=True)
    for c in v["checks"]:
        if c["name"] == "psnr":
            c["value"] = None
    (out / "validation.json").write_text(json.dumps(v))
    assert "| PSNR vs reference | ∞ (identical images) |" in card_text(out)


def test_card_reports_a_measured_lpips(int8_out, tmp_path):
    out = tmp_path / "lpips"
    shutil.copytree(int8_out, out)
    v = json.loads((out / "validation.json").read_text())
    v["quality"].update(lpips=0.0123, lpips_note="")
    (out / "validation.json").write_text(json.dumps(v))
    assert "| LPIPS vs reference (AlexNet) | 0.0123 |  | measured (no limit set) |" in card_text(out)
    v["checks"].append({"name": "lpips", "value": 0.0123, "limit": 0.3, "op": "<=", "passed": True, "note": ""})
    (out / "validation.json").write_text(json.dumps(v))
    text = card_text(out)
    assert "| LPIPS vs reference (AlexNet) | 0.0123 | ≤ 0.3000 | pass |" in text
    assert text.count("LPIPS") == 1


def test_rendering_is_deterministic(int8_out, tmp_path):
    first = render_card(int8_out).read_bytes()
    assert render_card(int8_out).read_bytes() == first  # re-render over its own output
    # with a repo id the card does not depend on where the folder lives
    other = tmp_path / "elsewhere"
    shutil.copytree(int8_out, other)
    a = card_text(int8_out, repo_id="acme/tiny-flux-int8wo")
    b = card_text(other, repo_id="acme/tiny-flux-int8wo")
    assert a == b and a.encode() != first
    assert str(tmp_path) not in a and str(int8_out) not in a


def test_license_is_required_for_an_unknown_base(local_source, tmp_path):
    out = _convert(str(local_source), "torchao", "int8wo", tmp_path / "out")
    with pytest.raises(InputError, match="no license found"):
        render_card(out)
    assert not (out / "README.md").exists()

    proc = run_cli("card", str(out))
    assert_one_line_error(proc, code=3, contains="--license")

    text = render_card(out, license="mit", base_model="acme/my-flux").read_text()
    meta = _front_matter(text)
    assert meta["license"] == "mit" and meta["base_model"] == "acme/my-flux"
    assert meta["base_model_relation"] == "quantized"
    # not validated: the card says so, loudly
    assert "**not validated**" in text and "**Not validated.**" in text
    # re-rendering without the flags keeps what was chosen (push re-renders this way)
    assert _front_matter(card_text(out)) == meta


def test_base_card_license_and_license_file_come_along(local_source, tmp_path):
    src = tmp_path / "licensed"
    shutil.copytree(local_source, src)
    (src / "README.md").write_text(
        "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\nlicense_link: LICENSE.md\n"
        "tags:\n- text-to-image\n---\n\n# Some Flux\n"
    )
    (src / "LICENSE.md").write_text("Non-commercial license text.\n")
    out = _convert(str(src), "torchao", "int8wo", tmp_path / "out")
    assert (out / "LICENSE.md").read_text() == "Non-commercial license text.\n"  # convert copies it
    meta = _front_matter(render_card(out).read_text())
    assert meta["license"] == "other"
    assert meta["license_name"] == "flux-1-dev-non-commercial-license"
    assert meta["license_link"] == "LICENSE.md"  # relative link: the file is in the output
    text = (out / "README.md").read_text()
    assert "[LICENSE.md](LICENSE.md)" in text
    # issue 14 item 9: the license paragraph links the included file once, not twice
    paragraph = text.split("## License", 1)[1]
    assert paragraph.count("](LICENSE.md)") == 1 and text.count("](LICENSE.md)") == 1
    # a license that lives elsewhere is linked once too
    (out / "LICENSE.md").unlink()
    elsewhere = card_text(out, license="other", license_name="some-license", license_link="https://example.org/l")
    assert elsewhere.split("## License", 1)[1].count("](https://example.org/l)") == 1


def test_hub_cache_paths_name_their_repo():
    p = "/root/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-dev/snapshots/0ef5fff/"
    assert hub_repo_from_path(p) == "black-forest-labs/FLUX.1-dev"
    assert hub_repo_from_path("/data/models/flux") is None


def test_hub_source_card_uses_the_base_repo(hub, hub_env, local_source, tmp_path):
    """A Hub source: base_model is the repo, the license comes from its README front matter."""
    src = tmp_path / "seed"
    shutil.copytree(local_source, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# base\n")
    (src / "LICENSE").write_text("Apache License 2.0\n")
    hub.seed_repo("acme/tiny-base-for-card", src)
    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    source = resolve_source("acme/tiny-base-for-card", token=hub.token, endpoint=hub.endpoint)
    out = tmp_path / "out"
    convert(source, "torchao", "int8wo", out, progress=False)
    text = card_text(out, token=hub.token, endpoint=hub.endpoint)
    meta = _front_matter(text)
    assert meta["base_model"] == "acme/tiny-base-for-card"
    assert meta["base_model_relation"] == "quantized" and meta["license"] == "apache-2.0"
    assert (out / "LICENSE").is_file()
    assert "--source acme/tiny-base-for-card --revision " in text
    assert hub.token not in text


def _run_snippets(paths: list[Path], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run snippet files one after the other in ONE fresh interpreter (imports paid once)."""
    quiet = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    env = {**os.environ, **quiet, **(env or {})}
    runner = "import runpy, sys\nfor p in sys.argv[1:]:\n    runpy.run_path(p, run_name='__main__')\n"
    return subprocess.run(
        [sys.executable, "-c", runner, *map(str, paths)], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )


def _small(code: str) -> str:
    """What a user trying it on a CPU changes: 2 steps at 32x32."""
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)
    return re.sub(r"(height|width)=\d+", r"\1=32", code)


@pytest.mark.slow
def test_usage_snippets_run(int8_out, tmp_path):
    """The card's snippet, extracted and executed: pipeline folder (from a clone) and GGUF."""
    repo_id = "acme/tiny-flux-int8wo"
    proc = run_cli("card", str(int8_out), "--repo-id", repo_id)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(int8_out / "README.md")
    code = extract_usage((int8_out / "README.md").read_text())
    assert f'FluxPipeline.from_pretrained("{repo_id}"' in code
    # a user who cloned the repo passes the clone's path instead of the repo id
    clone = tmp_path / "clone"
    shutil.copytree(int8_out, clone)
    before = tree_hashes(clone)
    (tmp_path / "pipeline_snippet.py").write_text(_small(code.replace(json.dumps(repo_id), json.dumps(str(clone)))))

    gguf = _convert("tiny-flux", "gguf", "Q8_0", tmp_path / "gguf", layout="diffusers")
    text = render_card(gguf).read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "gguf" and meta["tags"] == ["quantized", "gguf", "Q8_0", "flux", "qconvert"]
    assert "**Not validated.**" in text and '"gguf>=' in text
    gcode = extract_usage(text)
    assert "FluxTransformer2DModel.from_single_file(" in gcode and "GGUFQuantizationConfig(" in gcode
    assert 'subfolder="transformer"' in gcode and "gguf_file=" in gcode
    # with a repo id the GGUF snippet downloads the file from the repo
    assert 'hf_hub_download(repo, "flux1-tiny-flux-Q8_0.gguf")' in card_text(gguf, repo_id="acme/tiny-gguf")
    (tmp_path / "gguf_snippet.py").write_text(_small(gcode))

    proc = _run_snippets([tmp_path / "pipeline_snippet.py", tmp_path / "gguf_snippet.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "flux-int8wo.png").size == (32, 32)
    assert Image.open(tmp_path / "flux-Q8_0.png").size == (32, 32)
    assert tree_hashes(clone) == before


def test_gguf_card_for_a_hub_repo_names_a_local_base_by_folder_name_only(local_source, tmp_path):
    out = _convert(str(local_source), "gguf", "Q8_0", tmp_path / "gguf", layout="diffusers")
    local = extract_usage(card_text(out, license="apache-2.0"))
    assert json.dumps(local_source.resolve().as_posix()) in local  # runs here, as written
    hub = card_text(out, license="apache-2.0", repo_id="acme/my-flux-gguf")
    assert str(local_source.parent) not in hub and '"./my-flux"' in extract_usage(hub)


def test_full_size_cards_say_what_to_run_on_a_cpu(local_source, int8_out, tmp_path):
    """Issue 14: 1024x1024 x 28 steps is unusable on a CPU; the card says what to run instead."""
    from qconvert.cards import CPU_USAGE_MARKER

    out = _convert(str(local_source), "torchao", "int8wo", tmp_path / "int8")
    text = card_text(out, license="apache-2.0", repo_id="acme/my-flux-int8")
    main, cpu = extract_usage(text), extract_usage(text, CPU_USAGE_MARKER)
    assert "num_inference_steps=28" in main and "height=1024" in main
    assert "### On a CPU\n" in text and "far too slow" in text and "9 minutes" in text
    assert "num_inference_steps=4" in cpu and "height=256" in cpu and "width=256" in cpu
    assert "1/16 of the image tokens" in text
    # the demo's snippet already suits a CPU: no CPU part
    demo = card_text(int8_out)
    assert "### On a CPU" not in demo and CPU_USAGE_MARKER not in demo

    # bnb: diffusers refuses it without a GPU; the CPU part loads through qconvert, CPU-sized
    nf4 = _convert(str(local_source), "bnb", "nf4", tmp_path / "nf4")
    text = card_text(nf4, license="apache-2.0", repo_id="acme/my-flux-nf4")
    assert "### On a CPU-only machine" in text and "No GPU found" in text and "`pip install qconvert`" in text
    assert "far too slow" in text and "needs a CUDA GPU" not in text
    cpu = extract_usage(text, CPU_USAGE_MARKER)
    assert cpu.startswith("import torch\nfrom qconvert.convert.bnb_cpu import load_pipeline_on_cpu\n")
    assert 'pipe = load_pipeline_on_cpu("acme/my-flux-nf4", dtype=torch.bfloat16)' in cpu
    assert "num_inference_steps=4" in cpu and "height=256" in cpu
    assert 'pipe.to("cuda")' in extract_usage(text)  # the main snippet stays the GPU one


@pytest.mark.slow
def test_bnb_card_cpu_snippet_runs_on_a_cpu(tmp_path):
    """bnb cards: diffusers refuses bnb without a GPU; the card's CPU code loads it anyway."""
    from qconvert.cards import CPU_USAGE_MARKER

    out = _convert("tiny-flux", "bnb", "nf4", tmp_path / "nf4")
    text = render_card(out).read_text()
    assert "### On a CPU-only machine" in text and "No GPU found" in text and "`pip install qconvert`" in text
    code = extract_usage(text, CPU_USAGE_MARKER)
    assert "from qconvert.convert.bnb_cpu import load_pipeline_on_cpu" in code
    assert f"pipe = load_pipeline_on_cpu({json.dumps(out.resolve().as_posix())}, dtype=torch.float32)" in code
    (tmp_path / "bnb_cpu_snippet.py").write_text(code)
    proc = _run_snippets([tmp_path / "bnb_cpu_snippet.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "flux-nf4.png").size == (32, 32)


@pytest.mark.slow
def test_gguf_snippet_runs_against_hf_endpoint(hub, hub_env, local_source, tmp_path):
    """Issue 14: from_single_file takes only huggingface.co URLs, so the GGUF snippet downloads
    through hf_hub_download; pushed to the test Hub and run with HF_ENDPOINT pointing at it."""
    from qconvert.convert import convert
    from qconvert.publish import push
    from qconvert.sources import resolve_source

    base_dir = tmp_path / "base"
    shutil.copytree(local_source, base_dir)
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# base\n")
    base, repo = "acme/tiny-base-for-gguf-snippet", "acme/tiny-gguf-snippet"
    hub.seed_repo(base, base_dir)
    out = tmp_path / "gguf"
    convert(resolve_source(base, token=hub.token, endpoint=hub.endpoint), "gguf", "Q8_0", out,
            progress=False, options={"layout": "diffusers"})  # fmt: skip
    res = push(out, repo, token=hub.token, endpoint=hub.endpoint, allow_unvalidated=True)
    assert res.committed
    code = extract_usage(hub.read_file(repo, "README.md").decode())
    assert 'hf_hub_download(repo, "flux1-' in code and f'base = "{base}"' in code
    assert f'repo = "{repo}"' in code and "https://" not in code
    (tmp_path / "gguf_hub_snippet.py").write_text(_small(code))
    fresh = tmp_path / "user-home"  # a user's empty cache: everything comes from HF_ENDPOINT
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(fresh), "HF_HUB_CACHE": str(fresh / "hub"), "HF_TOKEN": ""}  # fmt: skip
    before = hub.count_requests(method="GET", substring=f"/{repo}/resolve/")
    proc = _run_snippets([tmp_path / "gguf_hub_snippet.py"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "flux-Q8_0.png").size == (32, 32)
    assert hub.count_requests(method="GET", substring=f"/{repo}/resolve/") > before  # it came from the test Hub
    assert (fresh / "hub" / f"models--{repo.replace('/', '--')}").is_dir()
