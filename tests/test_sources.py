"""Sources: built-in, local folder, Hub (local HTTP Hub), single BFL file; bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from qconvert import errors
from qconvert.sources import TensorReader, read_safetensors_header, resolve_source


def test_builtin_source_describes_components_lazily(tiny_path):
    src = resolve_source("tiny-flux")
    assert src.kind == "builtin" and src.identity.label == "tiny-flux"
    t = src.components["transformer"]
    assert t.tensors and t.nbytes == sum(x.nbytes for x in t.tensors.values())
    with TensorReader() as r:
        w = r.load(t.tensors["proj_out.weight"])
        rows = r.load(t.tensors["proj_out.weight"], rows=(1, 3))
    assert torch.equal(w[1:3], rows)


def test_local_folder_identity_is_a_fingerprint(tiny_path, tmp_path):
    shutil.copytree(tiny_path, tmp_path / "p")
    a = resolve_source(str(tmp_path / "p"))
    b = resolve_source(str(tmp_path / "p"))
    assert a.kind == "local" and a.identity.fingerprint == b.identity.fingerprint
    # a changed weight changes it
    f = tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes() + b" ")
    assert resolve_source(str(tmp_path / "p")).identity.fingerprint != a.identity.fingerprint


def test_folder_under_a_cache_directory_is_fingerprinted(tiny_path, tmp_path):
    """A Hub snapshot lives under ~/.cache: its files count; a .cache folder inside does not."""
    import hashlib

    root = tmp_path / ".cache" / "hub" / "snapshot"
    shutil.copytree(tiny_path, root)
    fp = resolve_source(str(root)).identity.fingerprint
    assert fp != hashlib.sha256().hexdigest()  # not the hash of nothing
    (root / ".cache").mkdir()
    (root / ".cache" / "download.lock").write_text("x")
    assert resolve_source(str(root)).identity.fingerprint == fp


def test_hub_source_downloads_only_pipeline_files(hub, hub_env, tiny_path, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(tiny_path, folder)
    (folder / "flux1-tiny.safetensors").write_bytes(b"not needed")  # like FLUX.1-dev's single file
    (folder / "LICENSE.md").write_text("license text")
    sha = hub.seed_repo("acme/tiny-flux", folder)
    src = resolve_source("acme/tiny-flux", token=hub.token, endpoint=hub.endpoint)
    assert src.identity.to_dict() == {"kind": "hub", "repo_id": "acme/tiny-flux", "revision": sha}
    assert not (src.root / "flux1-tiny.safetensors").exists()
    assert (src.root / "LICENSE.md").exists()
    assert set(src.components["transformer"].tensors) == set(resolve_source("tiny-flux").components["transformer"].tensors)

    # offline (HF_HUB_OFFLINE=1): the cached snapshot resolves to the same commit, no request made
    from huggingface_hub import constants

    requests = hub.count_requests()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert resolve_source("acme/tiny-flux", token=hub.token, endpoint=hub.endpoint).identity == src.identity
        # a branch name (release plans say revision = "main"): the cached snapshot, no ref needed
        assert resolve_source("acme/tiny-flux", revision="main", token=hub.token, endpoint=hub.endpoint).identity.revision == sha
        with pytest.raises(errors.InputError, match="not in the local Hub cache and HF_HUB_OFFLINE"):
            resolve_source("acme/never-downloaded", token=hub.token, endpoint=hub.endpoint)
    assert hub.count_requests() == requests
    proc = run_cli("flux", "--source", "acme/never-downloaded", "--backend", "torchao", "--scheme", "int8wo",
                   "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, code=3, contains="HF_HUB_OFFLINE")


def test_hub_missing_repo_is_a_clear_error(hub, hub_env):
    with pytest.raises(errors.SourceNotFound, match="not found"):
        resolve_source("acme/does-not-exist", token=hub.token, endpoint=hub.endpoint)


@pytest.mark.slow
def test_bfl_single_file_maps_to_diffusers_names(slim_path, slim_bfl_file):
    src = resolve_source(str(slim_bfl_file), base="slim-flux")
    assert src.kind == "bfl" and len(src.identity.sha256) == 64
    comp = src.components["transformer"]
    ref = resolve_source("slim-flux").components["transformer"]
    assert set(comp.tensors) == set(ref.tensors)
    with TensorReader() as r:
        for name in ("single_transformer_blocks.0.proj_mlp.weight", "norm_out.linear.weight",
                     "transformer_blocks.0.attn.add_v_proj.bias"):
            assert torch.equal(r.load(comp.tensors[name]), r.load(ref.tensors[name])), name
            part = r.load(comp.tensors[name], rows=(5, 9))
            assert torch.equal(part, r.load(ref.tensors[name])[5:9])


def test_bfl_file_without_base_asks_for_it(slim_bfl_file):
    with pytest.raises(errors.UsageError, match="add `base=<pipeline folder or Hub id>`") as e:
        resolve_source(str(slim_bfl_file))
    from qconvert.cli import cli_wording

    assert "add --base <pipeline folder or Hub id> to supply" in e.value.one_line(cli_wording)


def test_not_a_flux_pipeline_names_the_architecture(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(errors.NotAFluxModel, match="Stable Diffusion XL"):
        resolve_source(str(tmp_path))


def test_truncated_safetensors_is_reported(tiny_path, tmp_path):
    shutil.copytree(tiny_path, tmp_path / "p")
    f = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(errors.CorruptCheckpoint, match="truncated"):
        resolve_source(str(tmp_path / "p"))
    with pytest.raises(errors.CorruptCheckpoint):
        read_safetensors_header(tmp_path / "p" / "model_index.json")


def test_pickle_and_missing_sources_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(errors.InputError, match="pickle"):
        resolve_source(str(tmp_path / "model.ckpt"))
    with pytest.raises(errors.SourceNotFound):
        resolve_source(str(tmp_path / "nope"))


def test_lora_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(errors.NotAFluxModel, match="LoRA"):
        resolve_source(str(tmp_path / "l.safetensors"), base="tiny-flux")


def test_unreachable_hub_is_an_input_error_naming_the_fix(tmp_path):
    proc = run_cli("flux", "--source", "acme/tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--dry-run",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)})
    assert_one_line_error(proc, code=3, contains="check the network or HF_ENDPOINT")


# --- identities -------------------------------------------------------------------------------

_HUB = {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-dev", "revision": "abc", "requested_revision": "main"}
_CACHED = {"kind": "local", "path": "/c/models--acme--flux/snapshots/0123", "fingerprint": "f"}
IDENTITIES = [
    # recorded identity, label, short name, reproduce args, resolve args
    ({"kind": "builtin", "name": "tiny-flux", "builder_version": 1}, "tiny-flux", "tiny-flux",
     ["--source", "tiny-flux"], {"spec": "tiny-flux", "revision": None}),
    (_HUB, "black-forest-labs/FLUX.1-dev", "FLUX.1-dev",
     ["--source", "black-forest-labs/FLUX.1-dev", "--revision", "abc"], {"spec": "black-forest-labs/FLUX.1-dev", "revision": "abc"}),
    ({"kind": "local", "path": "/data/My_Flux", "fingerprint": "f"}, "My_Flux", "My_Flux",
     ["--source", "./My_Flux"], {"spec": "/data/My_Flux", "revision": None}),
    (_CACHED, "0123", "0123", ["--source", "acme/flux", "--revision", "0123"], {"spec": _CACHED["path"], "revision": None}),
    ({"kind": "bfl", "file": "flux1-dev.safetensors", "path": "/w/flux1-dev.safetensors", "sha256": "s", "base": _HUB},
     "flux1-dev.safetensors", "flux1-dev",
     ["--source", "flux1-dev.safetensors", "--base", "black-forest-labs/FLUX.1-dev", "--revision", "abc"],
     {"spec": "/w/flux1-dev.safetensors", "base": "black-forest-labs/FLUX.1-dev", "revision": "abc"}),
]


@pytest.mark.parametrize("data, label, short, reproduce, resolve", IDENTITIES, ids=lambda x: None)
def test_an_identity_answers_every_question_of_its_kind(data, label, short, reproduce, resolve):
    from qconvert.identity import SourceIdentity

    ident = SourceIdentity.from_dict(data)
    assert ident.to_dict() == data and ident.kind == data["kind"]  # the manifest's JSON, unchanged
    assert (ident.label, ident.short_name) == (label, short)
    assert ident.reproduce_args() == reproduce and ident.resolve_args() == resolve
    public = ident.public().to_dict()
    assert "/" not in str(public.get("path", "")) and "/" not in str((public.get("base") or {}).get("path", ""))


def test_identity_facts_and_unknown_kinds():
    from qconvert.identity import SourceIdentity, UnknownSource

    bfl = SourceIdentity.from_dict(IDENTITIES[4][0])
    assert (bfl.hub_repo, bfl.revision, bfl.base.label, bfl.pipeline is bfl.base) == ("black-forest-labs/FLUX.1-dev", "abc", bfl.base.label, True)
    cached = SourceIdentity.from_dict(_CACHED)
    assert (cached.hub_repo, cached.revision, cached.local_path) == ("acme/flux", "0123", _CACHED["path"])
    assert SourceIdentity.from_dict(IDENTITIES[0][0]).builtin == "tiny-flux" and cached.builtin is None
    # a kind (or a key) this version does not know: kept as it is, published without paths
    odd = {"kind": "s3", "path": "/secret/x", "bucket": "b"}
    ident = SourceIdentity.from_dict(odd)
    assert isinstance(ident, UnknownSource) and ident.to_dict() == odd
    assert ident.public().to_dict() == {"kind": "s3", "path": "x", "bucket": "b"}
    assert isinstance(SourceIdentity.from_dict({**_HUB, "extra": 1}), UnknownSource)
    with pytest.raises(errors.InputError, match="unknown source kind 's3'"):
        ident.resolve_args()


def test_resolve_again_gives_the_same_identity(tiny_path, tmp_path):
    from qconvert.sources import resolve_again

    shutil.copytree(tiny_path, tmp_path / "p")
    for spec in ("tiny-flux", str(tmp_path / "p")):
        src = resolve_source(spec)
        assert resolve_again(src.identity).identity == src.identity
