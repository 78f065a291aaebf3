"""qconvert report: the tiny-demo release's comparison page in a real headless browser, the
Markdown table and the cards' cross-links on the local Hub, bad input, unmeasured figures.

The release runs once for the module (three variants, pushed to the test Hub); the browser
test uses one Chromium session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, assert_one_line_error, invoke, run_cli, tree_hashes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VARIANTS = ["int8wo", "fp8wo", "Q8_0"]
REPOS = [f"report-{n}" for n in VARIANTS]  # the release's report is of its collection: repo names
COLLECTION = "tiny-flux report test"


@pytest.fixture(scope="module")
def release(hub, tmp_path_factory):
    """releases/tiny-demo.toml, pushed to the test Hub as acme/report-<name>: the workdir."""
    tmp = tmp_path_factory.mktemp("report-release")
    plan = tmp / "tiny.toml"
    plan.write_text((REPO_ROOT / "releases" / "tiny-demo.toml").read_text()
                    .replace('repo_pattern = "tiny-flux-{name}"', 'repo_pattern = "report-{name}"')
                    .replace('collection = "tiny-flux quantized"', f'collection = "{COLLECTION}"'))  # fmt: skip
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    proc = run_cli("release", str(plan), "--workdir", str(tmp / "work"), "--push", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "report: " in proc.stderr + proc.stdout
    return tmp / "work"


def _validation(work: Path, name: str) -> dict:
    return json.loads((work / name / "validation.json").read_text())


# --- the page in a browser -----------------------------------------------------------------


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright==1.65.2)")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return sync_playwright


def _names(page) -> list[str]:
    return page.eval_on_selector_all("#variants tbody tr.variant", "rows => rows.map(r => r.dataset.name)")


def _sort_and_read(page, label: str) -> list[str]:
    page.locator("#variants th[data-col]", has_text=label).first.click()
    return _names(page)


def test_release_report_works_in_a_headless_browser(release, tmp_path):
    sync_playwright = _browser()
    report = release / "report" / "index.html"
    assert report.is_file()
    peak = {f"report-{n}": _validation(release, n)["quantized"]["peak_memory"] for n in VARIANTS}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert errors == []
        assert _names(page) == REPOS  # one row per variant, in plan (collection) order
        assert page.locator("#variants tbody tr.reference").count() == 1
        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert len(images) == 2 + 2 * 2 * (1 + len(VARIANTS))  # 2 plots; grid + blind: 2 prompts x 4
        assert all(ok for _, ok in images), images
        assert sum(src.startswith("plots/") for src, _ in images) == 2

        assert _sort_and_read(page, "peak memory") == sorted(REPOS, key=peak.get)
        assert _sort_and_read(page, "peak memory") == sorted(REPOS, key=peak.get, reverse=True)
        assert _sort_and_read(page, "variant") == sorted(REPOS, key=str.casefold)  # the browser's collation
        # LPIPS was not measured (no AlexNet weights here): shown as such, never as a number
        lpips = page.eval_on_selector_all("#variants tbody tr.variant td[data-col$=':lpips']", "c => c.map(x => x.textContent)")
        assert lpips == ["not measured"] * 3

        _check_blind_mode(page)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert errors == []
        browser.close()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_blind_mode(page) -> None:
    blinds = page.locator(".blind")
    assert blinds.count() == 2  # one per prompt
    row = blinds.nth(0)
    figures = row.locator("figure")
    labels = sorted(figures.evaluate_all("fs => fs.map(f => f.dataset.label)"))
    assert labels == sorted(["reference", *REPOS])
    first = figures.nth(0)
    caption = first.locator("figcaption")
    assert not caption.is_visible()  # hidden until clicked
    first.click()
    assert caption.is_visible()
    label = first.get_attribute("data-label")
    assert caption.text_content() == label and f"/{label}-0.png" in first.locator("img").get_attribute("src")
    assert not figures.nth(1).locator("figcaption").is_visible()
    page.click("#reveal-all")
    assert all(figures.nth(i).locator("figcaption").is_visible() for i in range(figures.count()))


# --- Markdown, cards and the Hub ----------------------------------------------------------


def test_cards_link_the_other_variants_and_an_unchanged_report_commits_nothing(release, hub_env):
    hub = hub_env
    from huggingface_hub import HfApi

    from qconvert.release import load_plan
    from qconvert.report.release import after_release

    for name in VARIANTS:
        card = hub.read_file(f"acme/report-{name}", "README.md").decode()
        section = card[card.index("## Other variants of this model"):card.index("## How to reproduce")]
        assert f"**[report-{name}](https://huggingface.co/acme/report-{name})** (this one)" in section
        others = [n for n in VARIANTS if n != name]
        assert all(f"| [report-{n}](https://huggingface.co/acme/report-{n}) |" in section for n in others)
        assert "/spaces/acme/tiny-flux-report" in section
        # created, the variant, its cross-links: one commit for the links
        assert hub.commit_count(f"acme/report-{name}") == 3
        assert hub.commits(f"acme/report-{name}")[0]["title"].startswith("qconvert")
    md = (release / "report" / "report.md").read_text()
    assert md.count("| [") == 3 and "| source (float32) |" in md
    assert "(CPU 32²)" in md  # every measured column says where it was measured
    space = hub.files("acme/tiny-flux-report", repo_type="space")
    assert {"index.html", "report.md", "README.md"} <= set(space)
    assert hub.read_file("acme/tiny-flux-report", "README.md", repo_type="space").startswith(b"---\ntitle:")
    coll = next(c for c in HfApi(endpoint=hub.endpoint).list_collections(owner="acme") if c.title == COLLECTION)
    assert "/spaces/acme/tiny-flux-report" in HfApi(endpoint=hub.endpoint).get_collection(coll.slug).description

    counts = {n: hub.commit_count(f"acme/report-{n}") for n in VARIANTS}
    space_commits = hub.commit_count("acme/tiny-flux-report", repo_type="space")
    plan = load_plan(REPO_ROOT / "releases" / "tiny-demo.toml")
    plan.collection = COLLECTION
    logs: list[str] = []
    after_release(plan, release, push=True, token=hub.token, endpoint=hub.endpoint, log=logs.append)
    assert not any("FAILED" in line for line in logs), logs
    assert {n: hub.commit_count(f"acme/report-{n}") for n in VARIANTS} == counts
    assert hub.commit_count("acme/tiny-flux-report", repo_type="space") == space_commits


def test_report_of_a_hub_collection(release, hub_env, tmp_path):
    from huggingface_hub import HfApi

    coll = next(c for c in HfApi(endpoint=hub_env.endpoint).list_collections(owner="acme") if c.title == COLLECTION)
    for spec in (coll.slug, f"acme/{COLLECTION}"):
        out = tmp_path / spec.replace("/", "_")
        proc = invoke("report", spec, "--out", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["variants"] == REPOS
        data = json.loads((out / "report.json").read_text())
        assert [r["repo_id"] for r in data["rows"] if r["kind"] == "variant"] == [f"acme/{n}" for n in REPOS]
        assert len(list((out / "images").rglob("*.png"))) == 2 * (1 + len(VARIANTS))
        assert tree_hashes(out) == tree_hashes(release / "report")  # what the release wrote and published
    proc = invoke("report", "acme/no-such-collection", "--out", str(tmp_path / "none"))
    assert_one_line_error(proc, code=3, contains="there is no collection acme/no-such-collection")
    assert not (tmp_path / "none").exists()


# --- local input: bad input, determinism, settings --------------------------------------------


def _copy_variant(release: Path, name: str, dest: Path, new_name: str) -> Path:
    target = dest / new_name
    shutil.copytree(release / name, target, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    return target


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_input_is_one_line_and_writes_nothing(release, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("report", str(tmp_path / "empty"), "--out", str(out)), code=3, contains="no validation results")
    assert _nothing_written(out)
    other = _copy_variant(release, "int8wo", tmp_path, "other")
    manifest = json.loads((other / "qconvert.json").read_text())
    manifest["source"] = {"kind": "builtin", "name": "tiny-flux-schnell", "builder_version": 1}
    (other / "qconvert.json").write_text(json.dumps(manifest))
    proc = invoke("report", str(release / "fp8wo"), str(other), "--out", str(out))
    assert_one_line_error(proc, code=2, contains="different source models (tiny-flux-schnell vs tiny-flux)")
    assert _nothing_written(out)
    not_a_report = tmp_path / "taken"
    not_a_report.mkdir()
    (not_a_report / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("report", str(release), "--out", str(not_a_report)), code=2, contains="not a qconvert report")
    assert (not_a_report / "notes.txt").read_text() == "mine"


def test_report_of_a_workdir_is_deterministic_and_replaces_an_earlier_report(release, tmp_path):
    out = tmp_path / "r"
    proc = invoke("report", str(release), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["variants"] == VARIANTS  # the workdir's folders, in plan order
    first = tree_hashes(out)
    assert invoke("report", str(release), "--out", str(out)).returncode == 0
    assert tree_hashes(out) == first


def test_gpu_and_cpu_figures_never_share_a_column(release, tmp_path):
    """A variant validated on a GPU at another size gets its own columns; the CPU ones say
    'not measured' for it, and the other way round; nothing unmeasured is shown as 0."""
    from qconvert.report import build_report

    gpu = _copy_variant(release, "Q8_0", tmp_path, "Q8_0-gpu")
    v = json.loads((gpu / "validation.json").read_text())
    v["settings"].update(device="cuda", size=1024)
    v["environment"].update(device="cuda", device_name="NVIDIA H200")
    (gpu / "validation.json").write_text(json.dumps(v))
    result = build_report([release / "int8wo", gpu], tmp_path / "mixed")
    labels = [g.label for g in result.table.groups]
    assert labels == ["CPU, 32×32, 4 steps, float32", "GPU NVIDIA H200, 1024×1024, 4 steps, float32"]
    rows = {r.name: r.cells for r in result.table.rows}
    cpu, cuda = (g.slug for g in result.table.groups)
    assert rows["Q8_0-gpu"][f"{cpu}:peak_memory"].text == "not measured"
    assert rows["int8wo"][f"{cuda}:step_s"].text == "not measured"
    assert rows["Q8_0-gpu"][f"{cuda}:step_s"].sort == v["quantized"]["step_s"]
    assert rows["int8wo"][f"{cpu}:lpips"].text == "not measured" and "torchvision" in rows["int8wo"][f"{cpu}:lpips"].title
    md = result.markdown.read_text()
    assert "peak memory (CPU 32²)" in md and "peak memory (GPU NVIDIA H200 1024²)" in md
    data = json.loads((tmp_path / "mixed" / "report.json").read_text())
    unmeasured = [c for r in data["rows"] for c in r["cells"].values() if c["text"] == "not measured"]
    assert unmeasured and all(c["value"] is None for c in unmeasured)
    assert len(list((tmp_path / "mixed" / "plots").glob("*.png"))) == 4  # two per setting


def test_without_matplotlib_the_page_says_the_plots_were_not_drawn(release, tmp_path, monkeypatch):
    from qconvert.report import build_report, plots

    monkeypatch.setattr(plots, "available", lambda: False)
    result = build_report([release], tmp_path / "r")
    page = result.html.read_text()
    assert "Plots not drawn: matplotlib is not installed (pip install &#39;qconvert[report]&#39;)" in page
    assert not (tmp_path / "r" / "plots").exists() and "<img src=\"plots/" not in page
    assert result.notes == ["Plots not drawn: matplotlib is not installed (pip install 'qconvert[report]')."]


def test_offline_collection_is_one_line(tmp_path):
    # a fresh process: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    proc = run_cli("report", "acme/some collection", "--out", str(tmp_path / "r"), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, code=3, contains="HF_HUB_OFFLINE is set")
    assert not (tmp_path / "r").exists()
