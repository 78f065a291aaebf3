"""Write a FLUX.1-dev-shaped pipeline with seeded random weights, streaming.

    python bench/make_full_size.py /data/flux-full [--components transformer,text_encoder_2]

* transformer: the exact FLUX.1-dev config (11.9B params, bf16, 3 shards like the real repo);
* text_encoder_2: a T5-XXL-shaped encoder (4.7B params, bf16, 2 shards);
* CLIP, tokenizers, scheduler: copied from the built-in ``slim-flux`` (CLIP pooled width 768
  fits the full transformer), so the folder is a runnable pipeline;
* VAE: a 4-channel AutoencoderKL with FLUX's 16 latent channels and four blocks, so its
  scale factor is 8 like FLUX's: a 1024^2 image is 4096 image tokens, as with the real model
  (slim-flux's one-block VAE has scale factor 1: 1024^2 would be 262,144 tokens).

``--layers D,S`` writes D double and S single blocks instead of 19 and 38 (a mid-size model
for the load-everything comparison: ``--layers 3,6`` is 1.9B params, 3.8 GB).

Weights are N(0, 0.02^2), generated per tensor from a seed derived from its name, in row
chunks, and written with qconvert's streaming shard writer: peak memory is one chunk, not the
model. Deterministic: the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)  # fmt: skip
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, dense_act_fn="gelu_new",
    is_gated_act=True, pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def write_random(
    folder: Path, shapes: dict[str, tuple[int, ...]], base_name: str, shard_bytes: int, device: str = "cpu"
) -> int:
    """Write N(0, 0.02^2) bf16 tensors (ones for norm scales); ``device="cuda"`` draws them on the GPU."""
    import torch

    from qconvert.convert.writers import ShardedSafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(folder, base_name, shard_bytes)
    total = 0
    for name in sorted(shapes):
        shape = shapes[name]
        g = torch.Generator(device=device).manual_seed(_seed(name))
        if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "layer_norm.weight",
                          "norm_added_q.weight", "norm_added_k.weight", "final_layer_norm.weight")):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        writer.add_group([(name, t)])
        total += t.numel()
        del t
    writer.finish({"format": "pt"})
    return total


def meta_shapes(kind: str, flux_config: dict | None = None) -> tuple[dict[str, tuple[int, ...]], dict]:
    import torch

    with torch.device("meta"):
        if kind == "transformer":
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(**(flux_config or FLUX_DEV))
            config = dict(model.config)
        else:
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**T5_XXL))
            config = model.config.to_dict()
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if kind == "text_encoder_2":
        shapes.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, as transformers saves it
    return shapes, config


def write_vae(folder: Path) -> None:
    """A tiny AutoencoderKL with FLUX's latent channels, scaling and scale factor 8."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    vae.to(torch.bfloat16).save_pretrained(folder)


def build(
    out: Path, components: list[str], device: str = "cpu", log=print, layers: tuple[int, int] | None = None
) -> dict:
    """Write the full-size pipeline folder; returns params and seconds per component."""
    from qconvert.tiny import builtin_path

    slim = builtin_path("slim-flux")
    out.mkdir(parents=True, exist_ok=True)
    for comp in ("text_encoder", "tokenizer", "tokenizer_2", "scheduler"):
        if not (out / comp).exists():
            shutil.copytree(slim / comp, out / comp)
    if not (out / "vae").exists():
        write_vae(out / "vae")
    shutil.copyfile(slim / "model_index.json", out / "model_index.json")
    flux_config = dict(FLUX_DEV)
    if layers:
        flux_config.update(num_layers=layers[0], num_single_layers=layers[1])
    report = {}
    for comp in components:
        t0 = time.perf_counter()
        shapes, config = meta_shapes(comp, flux_config)
        if comp == "transformer":
            n = write_random(out / comp, shapes, "diffusion_pytorch_model", 10 * 10**9, device)
            import diffusers

            config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__, **flux_config}
        else:
            n = write_random(out / comp, shapes, "model", 5 * 10**9, device)
            config["architectures"] = ["T5EncoderModel"]
            config["dtype"] = "bfloat16"
        (out / comp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        report[comp] = {"params": n, "seconds": round(time.perf_counter() - t0, 1)}
        log(json.dumps({comp: report[comp]}))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--components", default="transformer,text_encoder_2")
    ap.add_argument("--device", default="cpu", help="draw the random weights here (cuda is much faster)")
    ap.add_argument("--layers", default=None, help="D,S: double and single blocks [19,38]")
    a = ap.parse_args(argv)
    layers = tuple(int(x) for x in a.layers.split(",")) if a.layers else None
    build(a.out, a.components.split(","), a.device, log=lambda m: print(m, flush=True), layers=layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
