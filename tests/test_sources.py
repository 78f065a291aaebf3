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
    assert src.kind == "builtin" and src.identity["name"] == "tiny-flux"
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
    assert a.kind == "local" and a.identity["fingerprint"] == b.identity["fingerprint"]
    # a changed weight changes it
    f = tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes() + b" ")
    assert resolve_source(str(tmp_path / "p")).identity["fingerprint"] != a.identity["fingerprint"]


def test_folder_under_a_cache_directory_is_fingerprinted(tiny_path, tmp_path):
    """A Hub snapshot lives under ~/.cache: its files count; a .cache folder inside does not."""
    import hashlib

    root = tmp_path / ".cache" / "hub" / "snapshot"
    shutil.copytree(tiny_path, root)
    fp = resolve_source(str(root)).identity["fingerprint"]
    assert fp != hashlib.sha256().hexdigest()  # not the hash of nothing
    (root / ".cache").mkdir()
    (root / ".cache" / "download.lock").write_text("x")
    assert resolve_source(str(root)).identity["fingerprint"] == fp


def test_hub_source_downloads_only_pipeline_files(hub, hub_env, tiny_path, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(tiny_path, folder)
    (folder / "flux1-tiny.safetensors").write_bytes(b"not needed")  # like FLUX.1-dev's single file
    (folder / "LICENSE.md").write_text("license text")
    sha = hub.seed_repo("acme/tiny-flux", folder)
    src = resolve_source("acme/tiny-flux", token=hub.token, endpoint=hub.endpoint)
    assert src.identity == {"kind": "hub", "repo_id": "acme/tiny-flux", "revision": sha}
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
        assert resolve_source("acme/tiny-flux", revision="main", token=hub.token, endpoint=hub.endpoint).identity["revision"] == sha
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
    assert src.kind == "bfl" and len(src.identity["sha256"]) == 64
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
    with pytest.raises(errors.UsageError, match="--base"):
        resolve_source(str(slim_bfl_file))


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
