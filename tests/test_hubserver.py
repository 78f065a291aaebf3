"""The local test Hub (tests/hubserver) driven only through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

pytestmark = pytest.mark.usefixtures("hub_env")  # HF_HUB_OFFLINE=0, Xet off, private HF_HOME

BIG = 10 * 1024 * 1024 + 4321  # just above the 10 MiB LFS threshold


@pytest.fixture(scope="module")
def big_bytes() -> bytes:
    return random.Random(1234).randbytes(BIG)


@pytest.fixture
def folder(tmp_path, big_bytes) -> Path:
    d = tmp_path / "upload"
    (d / "weights").mkdir(parents=True)
    (d / "notes.txt").write_text("hello hub\n")
    (d / "weights" / "blob.bin").write_bytes(big_bytes)
    return d


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


@pytest.fixture
def repo_id(request) -> str:
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:80]
    return f"alice/{name}"


def _status(exc: BaseException) -> int:
    return exc.response.status_code  # type: ignore[attr-defined]


def test_whoami(hub):
    me = HfApi(endpoint=hub.endpoint, token=hub.token).whoami()
    assert me["name"] == "alice"
    assert [o["name"] for o in me["orgs"]] == ["acme"]
    assert me["auth"]["accessToken"]["role"] == "write"
    ro = HfApi(endpoint=hub.endpoint, token=hub.read_token).whoami()
    assert ro["auth"]["accessToken"]["role"] == "read"


def test_wrong_token_is_401(hub, api, repo_id):
    bad = HfApi(endpoint=hub.endpoint, token="hf_not_a_token")
    with pytest.raises(HfHubHTTPError) as err:
        bad.whoami()
    assert _status(err.value) == 401
    api.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        bad.model_info(repo_id)
    assert _status(err.value) == 401
    assert not isinstance(err.value, RepositoryNotFoundError)  # a bad token is not "repo not found"


def test_create_repo_visibility_conflicts_and_rights(hub, api, repo_id):
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    assert hub.commit_count(repo_id) == 1  # the Hub's initial .gitattributes commit
    assert api.model_info(repo_id).private is False
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert _status(err.value) == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id

    org_repo = "acme/" + repo_id.split("/")[1]
    api.create_repo(org_repo, private=True)
    assert api.model_info(org_repo).private is True

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("bob/" + repo_id.split("/")[1])  # alice is not bob
    assert _status(err.value) == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=hub.read_token).create_repo(repo_id + "-ro")
    assert _status(err.value) == 403

    api.delete_repo(org_repo)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(org_repo)
    assert not api.repo_exists(org_repo)


def test_upload_folder_lfs_roundtrip(hub, api, repo_id, folder, big_bytes, tmp_path):
    api.create_repo(repo_id)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files")
    assert hub.commit_count(repo_id) == 2  # initial + exactly one for the whole folder
    assert hub.commits(repo_id)[0]["title"] == "add files"
    assert hub.head(repo_id) == info.oid
    stored = hub.files(repo_id)
    assert stored["weights/blob.bin"]["lfs"] and not stored["notes.txt"]["lfs"]

    local = snapshot_download(repo_id, endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "c1")
    assert (Path(local) / "weights" / "blob.bin").read_bytes() == big_bytes
    assert (Path(local) / "notes.txt").read_text() == "hello hub\n"
    assert Path(local).parent.name == "snapshots" and Path(local).name == info.oid
    one = hf_hub_download(repo_id, "notes.txt", endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "c2")
    assert Path(one).read_text() == "hello hub\n"

    meta = api.model_info(repo_id, files_metadata=True)
    sib = {s.rfilename: s for s in meta.siblings}
    assert set(sib) == {".gitattributes", "notes.txt", "weights/blob.bin"}
    assert sib["weights/blob.bin"].lfs.sha256 == hashlib.sha256(big_bytes).hexdigest()
    assert sib["weights/blob.bin"].size == BIG
    assert sib["notes.txt"].lfs is None and sib["notes.txt"].size == 10
    assert meta.sha == info.oid

    tree = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True)}
    assert tree["weights/blob.bin"].lfs.sha256 == hashlib.sha256(big_bytes).hexdigest()
    paths = api.get_paths_info(repo_id, ["notes.txt", "weights/blob.bin", "missing.txt"])
    assert sorted(p.path for p in paths) == ["notes.txt", "weights/blob.bin"]

    # identical push: the client sees equal remote oids and makes no commit, uploads nothing
    puts = hub.count_requests("PUT")
    again = api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert again.oid == info.oid
    assert hub.commit_count(repo_id) == 2
    assert hub.count_requests("PUT") == puts

    # the storage is a plain, valid git repository
    git_dir = hub._repo(repo_id).git.path
    subprocess.run(["git", "--git-dir", str(git_dir), "fsck", "--strict"], check=True, capture_output=True)
    assert hub.errors == []


def test_private_repo_invisible_to_others(hub, api, repo_id, folder, tmp_path):
    hub.seed_repo(repo_id, folder, private=True)
    assert api.model_info(repo_id).private is True
    bob = HfApi(endpoint=hub.endpoint, token=hub.other_token)
    anon = HfApi(endpoint=hub.endpoint, token=False)
    for client in (bob, anon):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info(repo_id)
        assert not client.repo_exists(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, endpoint=hub.endpoint, token=hub.other_token, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "notes.txt", endpoint=hub.endpoint, token=hub.other_token, cache_dir=tmp_path / "c")
    with pytest.raises(HfHubHTTPError):
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert hub.commit_count(repo_id) == 2


def test_read_only_token_cannot_write(hub, api, repo_id):
    api.create_repo(repo_id)
    ro = HfApi(endpoint=hub.endpoint, token=hub.read_token)
    assert ro.model_info(repo_id).id == repo_id
    with pytest.raises(HfHubHTTPError) as err:
        ro.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert _status(err.value) == 403
    assert hub.commit_count(repo_id) == 1


def test_collections_idempotent(hub, api, repo_id):
    api.create_repo(repo_id)
    title = f"Quantized {repo_id.split('/')[1]}"
    coll = api.create_collection(title, namespace="acme", description="d")
    assert coll.slug.startswith("acme/") and coll.title == title and coll.items == []
    with pytest.raises(HfHubHTTPError) as err:
        api.create_collection(title, namespace="acme")
    assert _status(err.value) == 409
    same = api.create_collection(title, namespace="acme", exists_ok=True)
    assert same.slug == coll.slug

    api.add_collection_item(coll.slug, repo_id, "model", note="nf4 build")
    with pytest.raises(HfHubHTTPError) as err:
        api.add_collection_item(coll.slug, repo_id, "model")
    assert _status(err.value) == 409
    again = api.add_collection_item(coll.slug, repo_id, "model", exists_ok=True)
    assert [(i.item_id, i.item_type, i.note) for i in again.items] == [(repo_id, "model", "nf4 build")]
    assert [i.item_id for i in api.get_collection(coll.slug).items] == [repo_id]

    with pytest.raises(HfHubHTTPError) as err:
        api.create_collection("not mine", namespace="bob")
    assert _status(err.value) == 403

    api.delete_collection(coll.slug)
    with pytest.raises(HfHubHTTPError) as err:
        api.get_collection(coll.slug)
    assert _status(err.value) == 404


def test_failed_commit_leaves_no_commit_and_retry_completes(hub, api, repo_id, folder, big_bytes):
    api.create_repo(repo_id)
    fault = hub.fail_next("/commit/", 500)
    with pytest.raises(HfHubHTTPError) as err:  # the commit POST is not retried by the client
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert _status(err.value) == 500 and fault.hits == 1
    assert hub.commit_count(repo_id) == 1
    assert hashlib.sha256(big_bytes).hexdigest() in hub.lfs_objects(repo_id)  # uploaded, not committed

    puts = hub.count_requests("PUT")
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert hub.commit_count(repo_id) == 2
    assert hub.count_requests("PUT") == puts  # the stored LFS object is not sent again
    assert hub.read_file(repo_id, "weights/blob.bin") == big_bytes


def test_failed_lfs_upload_leaves_no_commit_and_retry_completes(hub, api, repo_id, folder, big_bytes):
    api.create_repo(repo_id)
    fault = hub.fail_next("/_lfs/", 507, method="PUT")  # a status the client does not retry
    with pytest.raises(Exception):
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert fault.hits == 1
    assert hub.commit_count(repo_id) == 1
    assert hub.lfs_objects(repo_id) == set()
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert hub.commit_count(repo_id) == 2
    assert hub.read_file(repo_id, "weights/blob.bin") == big_bytes


def test_dropped_lfs_upload_is_retried_by_the_client(hub, api, repo_id, folder, big_bytes):
    api.create_repo(repo_id)
    fault = hub.fail_next("/_lfs/", "drop", method="PUT")  # connection cut mid-body
    api.upload_folder(repo_id=repo_id, folder_path=folder)  # http_backoff retries after ~1 s
    assert fault.hits == 1
    assert hub.commit_count(repo_id) == 2
    assert hub.read_file(repo_id, "weights/blob.bin") == big_bytes


def test_multipart_lfs_upload(hub, api, repo_id, folder, big_bytes, monkeypatch):
    monkeypatch.setattr(hub, "multipart_chunk_size", 4 * 1024 * 1024)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert hub.count_requests("PUT", f"/_lfs/model/{repo_id}/") == 3  # ceil(10.0 MiB / 4 MiB) parts
    assert hub.read_file(repo_id, "weights/blob.bin") == big_bytes


def test_seed_repo_and_env_only_download(hub, repo_id, tmp_path):
    src = tmp_path / "src"
    (src / "transformer").mkdir(parents=True)
    (src / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (src / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00" + b"x" * 100)
    sha = hub.seed_repo(repo_id, src, private=True)
    assert hub.files(repo_id)["transformer/diffusion_pytorch_model.safetensors"]["lfs"]  # .gitattributes rule
    local = Path(snapshot_download(repo_id))  # endpoint, token and cache from hub_env
    assert local.name == sha
    assert (local / "model_index.json").read_text() == '{"_class_name": "FluxPipeline"}'
    meta = HfApi().model_info(repo_id, files_metadata=True)
    sib = {s.rfilename: s for s in meta.siblings}
    body = b"\x08\x00" + b"x" * 100
    assert sib["transformer/diffusion_pytorch_model.safetensors"].lfs.sha256 == hashlib.sha256(body).hexdigest()


def test_invalid_card_metadata_rejected(hub, api, repo_id):
    api.create_repo(repo_id)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\ntags: {a: 1}\n---\n# x\n", path_in_repo="README.md", repo_id=repo_id)
    card = b"---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\nbase_model: black-forest-labs/FLUX.1-dev\nbase_model_relation: quantized\npipeline_tag: text-to-image\ntags: [flux]\n---\n# x\n"
    api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id)
    info = api.model_info(repo_id)
    assert info.card_data["base_model_relation"] == "quantized"
    assert info.pipeline_tag == "text-to-image" and info.tags == ["flux"]
    assert hub.commit_count(repo_id) == 2


def test_server_starts_and_stops_fast(tmp_path):
    from hubserver import HubServer

    t0 = time.monotonic()
    server = HubServer(root=tmp_path / "hub").start()
    try:
        assert HfApi(endpoint=server.endpoint, token=server.token).whoami()["name"] == "alice"
    finally:
        server.stop()
    assert time.monotonic() - t0 < 3
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_branches_copy_between_them_and_delete(hub, api, repo_id, folder, big_bytes, tmp_path):
    """A staging branch: commit to it, read from it, copy its LFS file to main without a
    second upload (CommitOperationCopy: the commit references the stored object), delete it."""
    from huggingface_hub import CommitOperationCopy

    api.create_repo(repo_id)
    api.create_branch(repo_id, branch="staging")
    api.create_branch(repo_id, branch="staging", exist_ok=True)  # 409 absorbed by the client
    puts = hub.count_requests("PUT", "/_lfs/")
    api.upload_folder(repo_id=repo_id, folder_path=folder, revision="staging")
    assert hub.count_requests("PUT", "/_lfs/") == puts + 1
    assert hub.commit_count(repo_id) == 1 and hub.commit_count(repo_id, branch="staging") == 2
    assert "weights/blob.bin" not in hub.files(repo_id)
    got = hf_hub_download(repo_id, "weights/blob.bin", revision="staging", cache_dir=tmp_path / "c")
    assert Path(got).read_bytes() == big_bytes
    assert {s.rfilename for s in api.model_info(repo_id, revision="staging").siblings} >= {"weights/blob.bin", "notes.txt"}

    head = hub.head(repo_id, branch="staging")
    ops = [CommitOperationCopy(p, p, src_revision=head) for p in ("weights/blob.bin", "notes.txt")]
    api.create_commit(repo_id, ops, commit_message="promote")
    assert hub.count_requests("PUT", "/_lfs/") == puts + 1  # nothing uploaded again
    assert hub.files(repo_id)["weights/blob.bin"]["sha256"] == hashlib.sha256(big_bytes).hexdigest()
    assert hub.read_file(repo_id, "notes.txt") == b"hello hub\n"

    api.delete_branch(repo_id, branch="staging")
    assert "staging" not in [b.name for b in api.list_repo_refs(repo_id).branches]
    with pytest.raises(HfHubHTTPError) as e:
        api.delete_branch(repo_id, branch="staging")
    assert _status(e.value) == 404
    with pytest.raises(HfHubHTTPError) as e:
        api.delete_branch(repo_id, branch="main")
    assert _status(e.value) == 403
