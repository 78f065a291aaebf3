"""qconvert push against the local test Hub (tests/hubserver): one commit, idempotent, safe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli, tree_hashes
from qconvert import __version__
from qconvert.errors import AuthError, PublishError, ValidationFailed
from qconvert.publish import push
from test_cards import shared_validated_int8

_OUTPUTS: list[str] = []  # every CLI stdout/stderr of this module, checked for the token at the end


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "tiny-flux-int8wo"
    shutil.copytree(shared_validated_int8(tmp_path_factory), out)
    return out


def _push_cli(*args: str, env: dict | None = None):
    proc = run_cli("push", *args, env=env)
    _OUTPUTS.append(proc.stdout + proc.stderr)
    return proc


def _writes(hub) -> int:
    return sum(hub.count_requests(method=m) for m in ("POST", "PUT", "DELETE", "PATCH")) - hub.count_requests(
        method="POST", substring="/paths-info/"
    )


@pytest.mark.slow
def test_push_download_generate_and_repush(hub, hub_env, int8_out, tmp_path):
    repo = "acme/tiny-int8-push"
    proc = _push_cli(str(int8_out), "--repo-id", repo)
    assert proc.returncode == 0, proc.stderr
    assert "pushed: commit" in proc.stdout
    assert hub.commit_count(repo) == 2  # the initial .gitattributes commit + ONE commit of ours
    files = hub.files(repo)
    local = {p for p in tree_hashes(int8_out)}
    assert local <= set(files) and set(files) - local == {".gitattributes"}
    readme = hub.read_file(repo, "README.md").decode()
    assert f'FluxPipeline.from_pretrained("{repo}"' in readme
    assert f"qconvert {__version__}: torchao int8wo of tiny-flux" == hub.commits(repo)[0]["title"]

    # a user downloads it and generates
    import torch
    from diffusers import FluxPipeline
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo, endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "dl")
    assert tree_hashes(Path(folder)) == {k: v for k, v in tree_hashes(int8_out).items()} | {
        ".gitattributes": tree_hashes(Path(folder))[".gitattributes"]
    }
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0), max_sequence_length=32).images  # fmt: skip
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    # the same output again: nothing to commit, and it says so
    again = push(int8_out, repo, token=hub.token, endpoint=hub.endpoint)
    assert not again.committed and again.up_to_date and not again.uploads
    assert "already up to date" in again.render() and "no commit made" in again.render()
    assert hub.commit_count(repo) == 2


def test_dry_run_changes_nothing(hub, hub_env, int8_out):
    repo = "acme/tiny-int8-dry"
    before_files = tree_hashes(int8_out)
    writes = _writes(hub)
    proc = _push_cli(str(int8_out), "--repo-id", repo, "--dry-run", "--collection", "Dry quants")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"repo: {repo} (public, will be created)" in out
    assert "upload    transformer/diffusion_pytorch_model.safetensors" in out
    assert f"commit message: qconvert {__version__}: torchao int8wo of tiny-flux" in out
    assert "collection: Dry quants" in out and "dry run: nothing was changed" in out
    assert not hub.repo_exists(repo)
    assert _writes(hub) == writes
    assert tree_hashes(int8_out) == before_files  # not even README.md was written


def test_private_repo_and_collection_are_idempotent(hub, hub_env, int8_out):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = "acme/tiny-int8-private"
    res = push(int8_out, repo, token=hub.token, endpoint=hub.endpoint, private=True, collection="Tiny quants")
    assert res.committed and res.private and res.collection_slug
    assert HfApi(endpoint=hub.endpoint, token=hub.token).model_info(repo).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=hub.other_token).model_info(repo)

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    coll = api.get_collection(res.collection_slug)
    assert coll.title == "Tiny quants" and [i.item_id for i in coll.items] == [repo]
    assert coll.items[0].note.startswith("torchao int8wo, ")

    commits = hub.commit_count(repo)
    again = push(int8_out, repo, token=hub.token, endpoint=hub.endpoint, private=True, collection="Tiny quants")
    assert not again.committed and again.up_to_date and again.collection_slug == res.collection_slug
    assert hub.commit_count(repo) == commits
    # (raw GET: the test hub's list answer carries "position", which HfApi.list_collections chokes on)
    import requests

    listed = requests.get(f"{hub.endpoint}/api/collections", params={"owner": "acme"}, timeout=10).json()
    assert [c["title"] for c in listed].count("Tiny quants") == 1
    assert [i.item_id for i in api.get_collection(res.collection_slug).items] == [repo]


def test_bad_tokens_fail_with_one_line(hub, hub_env, int8_out):
    repo = "acme/tiny-int8-badtoken"
    proc = _push_cli(str(int8_out), "--repo-id", repo, env={"HF_TOKEN": "hf_wrongwrongwrongwrong123"})
    line = assert_one_line_error(proc, code=5, contains="token")
    assert "HF_TOKEN" in line and "hf_wrongwrong" not in proc.stderr
    assert not hub.repo_exists(repo)
    with pytest.raises(AuthError, match="read-only"):
        push(int8_out, repo, token=hub.read_token, endpoint=hub.endpoint)
    with pytest.raises(AuthError, match="no Hub token"):
        push(int8_out, repo, token=None, endpoint=hub.endpoint)
    with pytest.raises(PublishError, match="namespace nobody"):
        push(int8_out, "nobody/tiny", token=hub.token, endpoint=hub.endpoint)
    assert not hub.repo_exists(repo)


def test_failed_upload_leaves_no_commit_and_rerun_completes(hub, hub_env, int8_out):
    repo = "acme/tiny-int8-flaky"
    hub.fail_next("/_lfs/", status=507, method="PUT")  # LFS upload fails for good (not retried)
    proc = _push_cli(str(int8_out), "--repo-id", repo)
    assert_one_line_error(proc, code=5, contains="nothing was committed")
    assert hub.commit_count(repo) == 1  # only the initial commit of create_repo

    hub.fail_next("/commit/", status=507)  # the commit POST itself fails for good
    with pytest.raises(PublishError, match="HTTP 507"):
        push(int8_out, repo, token=hub.token, endpoint=hub.endpoint)
    assert hub.commit_count(repo) == 1

    hub.fail_next("/commit/", status="drop")  # a dropped connection: retried, one commit
    res = push(int8_out, repo, token=hub.token, endpoint=hub.endpoint)
    assert res.committed and hub.commit_count(repo) == 2
    assert set(tree_hashes(int8_out)) <= set(hub.files(repo))
    hub.clear_faults()


def test_unvalidated_and_failed_outputs_are_refused(hub, hub_env, int8_out, tmp_path):
    unvalidated = tmp_path / "unvalidated"
    shutil.copytree(int8_out, unvalidated)
    (unvalidated / "validation.json").unlink()
    (unvalidated / "README.md").unlink(missing_ok=True)
    repo = "acme/tiny-int8-unvalidated"
    proc = _push_cli(str(unvalidated), "--repo-id", repo)
    assert_one_line_error(proc, code=4, contains="not validated")
    assert not hub.repo_exists(repo)

    res = push(unvalidated, repo, token=hub.token, endpoint=hub.endpoint, allow_unvalidated=True)
    assert res.committed and res.validated == "not validated"
    card = hub.read_file(repo, "README.md").decode()
    assert "**not validated**" in card and "**Not validated.**" in card

    failed = tmp_path / "failed"
    shutil.copytree(int8_out, failed)
    report = json.loads((failed / "validation.json").read_text())
    report["passed"], report["failed"] = False, ["psnr"]
    (failed / "validation.json").write_text(json.dumps(report))
    with pytest.raises(ValidationFailed, match="failed validation"):
        push(failed, "acme/tiny-int8-failed", token=hub.token, endpoint=hub.endpoint)
    res = push(failed, "acme/tiny-int8-failed", token=hub.token, endpoint=hub.endpoint, allow_unvalidated=True)
    assert res.committed and res.validated == "failed"
    assert "**failed validation** (psnr)" in hub.read_file("acme/tiny-int8-failed", "README.md").decode()


def test_repo_mirrors_the_output(hub, hub_env, int8_out, tmp_path):
    repo = "acme/tiny-int8-mirror"
    push(int8_out, repo, token=hub.token, endpoint=hub.endpoint)
    smaller = tmp_path / "smaller"
    shutil.copytree(int8_out, smaller)
    shutil.rmtree(smaller / "samples")
    plan = push(smaller, repo, token=hub.token, endpoint=hub.endpoint, dry_run=True)
    assert sorted(f.path for f in plan.deletions) == sorted(f"samples/{p.name}" for p in (int8_out / "samples").iterdir())
    kept = push(smaller, repo, token=hub.token, endpoint=hub.endpoint, keep_remote_files=True)
    assert not kept.deletions and [f.path for f in kept.uploads] == ["README.md"]  # no grid to show any more
    assert "samples/grid.png" in hub.files(repo)
    res = push(smaller, repo, token=hub.token, endpoint=hub.endpoint)
    assert res.committed and len(res.deletions) == len(plan.deletions) and not res.uploads
    assert not any(p.startswith("samples/") for p in hub.files(repo))


def test_hand_written_readme_is_published_as_is(hub, hub_env, int8_out, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(int8_out, own)
    (own / "README.md").write_text("---\nlicense: mit\n---\n# my card\n")
    plan = push(own, "acme/tiny-int8-own", token=hub.token, endpoint=hub.endpoint, dry_run=True)
    assert any("hand-written" in n for n in plan.notes)
    assert [f.size for f in plan.files if f.path == "README.md"] == [len("---\nlicense: mit\n---\n# my card\n")]


def test_token_never_leaks(hub, hub_env, int8_out):
    """Runs last: nothing this module printed or wrote holds a token."""
    tokens = [hub.token, hub.read_token, hub.other_token, "hf_wrongwrongwrongwrong123"]
    if not _OUTPUTS:  # run on its own
        proc = run_cli("-v", "push", str(int8_out), "--repo-id", "acme/tiny-int8-leak", "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr
        _OUTPUTS.append(proc.stdout + proc.stderr)
    for text in _OUTPUTS:
        for tok in tokens:
            assert tok not in text
    for p in int8_out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for tok in tokens:
                assert tok.encode() not in data, p


def _hub_env(hub):
    return {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}


@pytest.mark.slow
def test_flux_push_end_to_end_and_never_after_failed_validation(hub, hub_env, tmp_path):
    from conftest import run_cli

    strict = tmp_path / "strict.toml"
    strict.write_text("[default]\nmin_psnr = 1000.0\n")
    failed = run_cli("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                     "--out", str(tmp_path / "bad"), "--thresholds", str(strict), "--push", "--namespace", "acme",
                     env=_hub_env(hub))
    assert failed.returncode == 4, failed.stderr
    assert not hub.repo_exists("acme/bad")  # validation failed: nothing was created or pushed

    ok = run_cli("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                 "--out", str(tmp_path / "tiny-int8"), "--push", "--namespace", "acme",
                 "--collection", "tiny quants", env=_hub_env(hub))
    assert ok.returncode == 0, ok.stderr
    files = hub.files("acme/tiny-int8")
    assert "qconvert.json" in files and "README.md" in files and "validation.json" in files
    assert hub.token not in ok.stdout + ok.stderr


@pytest.mark.slow
def test_revalidated_identical_conversion_makes_no_commit(hub, hub_env, tmp_path):
    """Re-running convert + validate + push on identical weights changes nothing on the Hub."""
    from conftest import run_cli

    args = ("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "fp8wo", "--push",
            "--repo-id", "acme/revalidated", "--collection", "Revalidated quants")
    first = run_cli(*args, "--out", str(tmp_path / "one"), env=_hub_env(hub))
    assert first.returncode == 0, first.stderr
    assert "pushed: commit" in first.stdout and "collection: Revalidated quants (" in first.stdout
    assert "added to it" in first.stdout
    count = hub.commit_count("acme/revalidated")
    published = hub.read_file("acme/revalidated", "validation.json")
    slug = first.stdout.split("collection: Revalidated quants (")[1].split(")")[0]
    note = _collection_note(hub, slug, "acme/revalidated")
    second = run_cli(*args, "--out", str(tmp_path / "two"), env=_hub_env(hub))
    assert second.returncode == 0, second.stderr
    assert hub.commit_count("acme/revalidated") == count
    assert "no commit made" in second.stdout and "already in it, note unchanged" in second.stdout
    assert _collection_note(hub, slug, "acme/revalidated") == note
    # the second run's own timings and memory were not published, and it says so
    if (tmp_path / "two" / "validation.json").read_bytes() != published:
        assert "only measurements differ" in second.stdout and "not published" in second.stdout


def test_published_manifest_and_validation_name_no_local_directories(hub, hub_env, tiny_path, tmp_path):
    """A local source's absolute path stays in the local qconvert.json (validate finds the
    source again) but the Hub gets only the folder's name; re-pushing changes nothing."""
    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    src = tmp_path / "private-dir" / "my-flux"
    shutil.copytree(tiny_path, src)
    out = tmp_path / "out"
    convert(resolve_source(str(src)), "torchao", "int8wo", out, progress=False)
    local = json.loads((out / "qconvert.json").read_text())
    assert local["source"]["path"] == str(src.resolve())
    # a validation.json that records the same identity (as validate writes it)
    (out / "validation.json").write_text(json.dumps({"passed": True, "failed": [], "checks": [],
                                                     "settings": {"reference": local["source"]}}))  # fmt: skip
    from qconvert.cards import render_card

    render_card(out, license="apache-2.0")  # a local folder's license is unknown
    repo = "acme/local-src-int8"
    res = push(out, repo, token=hub.token, endpoint=hub.endpoint)
    assert res.committed
    for name in hub.files(repo):
        assert str(tmp_path) not in hub.read_file(repo, name).decode("utf-8", "replace"), name
    remote = json.loads(hub.read_file(repo, "qconvert.json"))
    assert remote["source"] == {**local["source"], "path": "my-flux"}
    assert json.loads(hub.read_file(repo, "validation.json"))["settings"]["reference"]["path"] == "my-flux"
    again = push(out, repo, token=hub.token, endpoint=hub.endpoint)
    assert not again.committed and again.up_to_date
    # the release's "already published?" check compares against the published identity
    from qconvert.release import Variant, remote_is_current

    v = Variant("int8wo", "torchao", "int8wo", repo, tuple(local["options"]["components"]))
    from qconvert.identity import SourceIdentity

    assert remote_is_current(repo, SourceIdentity.from_dict(local["source"]), v, token=hub.token, endpoint=hub.endpoint)


def _remeasured(out: Path, dest: Path, memory_after_load: int) -> Path:
    """A copy of ``out`` as a re-validation leaves it: same weights, new measurements, old card."""
    shutil.copytree(out, dest)
    report = json.loads((dest / "validation.json").read_text())
    report["quantized"]["memory_after_load"] = memory_after_load
    (dest / "validation.json").write_text(json.dumps(report))
    return dest


def _collection_note(hub, slug: str, repo: str) -> str | None:
    from huggingface_hub import HfApi

    items = HfApi(endpoint=hub.endpoint, token=hub.token).get_collection(slug).items
    return next(i.note for i in items if i.item_id == repo)


def test_measurement_only_change_keeps_card_repo_and_collection_note_in_agreement(hub, hub_env, int8_out, tmp_path):
    """Issue 14 item 6: no commit -> the collection note keeps showing the published numbers."""
    from qconvert.plan import human_bytes

    repo, title = "acme/tiny-int8-remeasured", "Remeasured quants"
    first = push(int8_out, repo, token=hub.token, endpoint=hub.endpoint, collection=title)
    assert first.committed
    published_note = _collection_note(hub, first.collection_slug, repo)
    published_card = hub.read_file(repo, "README.md")
    assert published_note and published_note.startswith("torchao int8wo, ")

    new_memory = 987_654_321_000  # far from any real figure: it cannot show up by chance
    again = _remeasured(int8_out, tmp_path / "remeasured", new_memory)
    commits = hub.commit_count(repo)
    res = push(again, repo, token=hub.token, endpoint=hub.endpoint, collection=title)
    assert not res.committed
    assert hub.commit_count(repo) == commits and hub.read_file(repo, "README.md") == published_card
    # the collection shows what the repo shows, not the unpublished run
    note = _collection_note(hub, res.collection_slug, repo)
    assert note == published_note and human_bytes(new_memory) not in note
    assert first.collection_action == "added" and res.collection_action == "unchanged" and res.measurements_kept
    text = res.render()
    assert "not published" in text and "already in it, note unchanged" in text

    # a real change (new weights' manifest) is published, and then the note follows it
    changed = tmp_path / "changed"
    shutil.copytree(again, changed)
    manifest = json.loads((changed / "qconvert.json").read_text())
    manifest["options"]["note_for_test"] = "changed"  # a manifest change: a new conversion
    (changed / "qconvert.json").write_text(json.dumps(manifest, indent=2))
    res = push(changed, repo, token=hub.token, endpoint=hub.endpoint, collection=title)
    assert res.committed and not res.measurements_kept and res.collection_action == "note updated"
    assert human_bytes(new_memory) in _collection_note(hub, res.collection_slug, repo)
    assert human_bytes(new_memory) in hub.read_file(repo, "README.md").decode()


def test_push_cli_says_what_it_did_with_the_collection(hub, hub_env, int8_out, tmp_path):
    repo, title = "acme/tiny-int8-collection-cli", "CLI quants"
    proc = _push_cli(str(int8_out), "--repo-id", repo, "--collection", title)
    assert proc.returncode == 0, proc.stderr
    assert f"collection: {title} (" in proc.stdout and "added to it" in proc.stdout
    proc = _push_cli(str(int8_out), "--repo-id", repo, "--collection", title)
    assert proc.returncode == 0, proc.stderr
    assert "already in it, note unchanged" in proc.stdout and "no commit made" in proc.stdout
    again = _remeasured(int8_out, tmp_path / "remeasured", 123_456_789_000)
    proc = _push_cli(str(again), "--repo-id", repo, "--collection", title)
    assert proc.returncode == 0, proc.stderr
    assert "not published" in proc.stdout and "already in it, note unchanged" in proc.stdout
