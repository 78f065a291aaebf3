"""bench/: the GPU check runs end to end (on CPU, tiny model), and the benchmark VAE has
FLUX's scale factor, so "--size 1024" means FLUX's 4,096 image tokens there."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))


def test_benchmark_vae_has_flux_scale_factor(tmp_path):
    from diffusers import AutoencoderKL
    from make_full_size import write_vae

    write_vae(tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)).sample
    assert tuple(image.shape) == (1, 3, 64, 64)


def test_gpu_check_script_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path), "--model", "tiny",
         "--size", "32", "--skip-bnb", "--variants", "torchao:int8wo,gguf:Q8_0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["image_tokens"] == 256  # tiny VAE: scale factor 1
    for variant in ("torchao-int8wo", "gguf-Q8_0"):
        step = result["steps"][f"validate_{variant}"]
        assert step["status"] == "ok" and step["result"]["passed"], step
    table = (tmp_path / "gpu_check.txt").read_text()
    assert "bf16 (ref)" in table and "torchao-int8wo" in table
    assert (tmp_path / "grid-torchao-int8wo.png").stat().st_size > 0
