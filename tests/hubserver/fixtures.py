"""pytest fixtures for the test Hub (imported by tests/conftest.py).

``hub`` (session): a running ``HubServer`` on a free 127.0.0.1 port. Attributes used by
tests: ``endpoint``, ``token`` (write token of user ``alice``, member of org ``acme``),
``read_token`` (alice, read-only), ``other_token`` (user ``bob``, no org),
``seed_repo(repo_id, folder, private=False, repo_type="model", message=...) -> commit id``,
``commit_count(repo_id, repo_type="model", branch="main") -> int`` (1 right after
create_repo: the initial .gitattributes commit), ``commits(repo_id)``, ``files(repo_id)``,
``read_file(repo_id, path)``, ``lfs_objects(repo_id)``, ``head(repo_id)``,
``fail_next(path_substring, status=500 | "drop", times=1, method=None) -> Fault``,
``clear_faults()``, ``count_requests(method=None, substring="")``, ``requests``, ``errors``
(server-side tracebacks; the fixture fails at session end if any), ``create_repo(...)`` and
``delete_repo(...)`` (server-side, no token), ``multipart_chunk_size`` (monkeypatch it to make
LFS uploads above that size multipart).
The server is shared by the whole session: use a fresh repo name per test
(``unique_repo``-style, e.g. ``f"alice/{request.node.name}"``).

``hub_env`` (function): points huggingface_hub at the server for code that does not take an
``endpoint=``: sets ``HF_ENDPOINT``, ``HF_TOKEN`` (alice's write token), ``HF_HUB_DISABLE_XET=1``,
``HF_HUB_OFFLINE=0``, ``HF_HOME`` (a fresh temp dir) and friends, and because
huggingface_hub reads those at import it also patches ``huggingface_hub.constants`` and the
module-level ``HfApi`` used by the top-level helper functions. Yields the ``hub``. Other
libraries that copy these settings at import (transformers, diffusers) still see them only
through huggingface_hub's functions, which is how they download.
"""

from __future__ import annotations

import os

import pytest

from .server import HubServer


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    server = HubServer(root=tmp_path_factory.mktemp("testhub")).start()
    try:
        yield server
    finally:
        server.stop()
    # an exception inside the server is a bug of the test Hub, not of the code under test
    assert not server.errors, "test hub raised:\n" + "\n".join(server.errors)


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf_home")
    hub_cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": hub.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_TOKEN", "HF_HUB_ETAG_TIMEOUT", "HF_XET_CACHE",
                "HF_ASSETS_CACHE", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(key, raising=False)

    try:
        from huggingface_hub import constants, hf_api
    except ImportError:  # pragma: no cover - huggingface_hub is a hard dependency
        yield hub
        return
    patches = {
        "ENDPOINT": hub.endpoint,
        # built from ENDPOINT at import; hf_hub_url() only swaps in an explicit endpoint= when
        # this template starts with constants.ENDPOINT, so both must move together
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # top-level helpers (huggingface_hub.create_repo, upload_folder, ...) are bound methods of
    # one HfApi built at import, with the endpoint of that moment
    if hasattr(hf_api, "api"):
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    os.makedirs(hub_cache, exist_ok=True)
    try:
        yield hub
    finally:
        hub.clear_faults()  # a fault a test scheduled but never triggered must not leak
