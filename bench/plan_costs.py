"""What each variant of releases/flux1-dev.toml costs on GitHub's standard runner, from the plan.

    python bench/plan_costs.py [/tmp/flux-headers] [--plan releases/flux1-dev.toml]

Writes a FLUX.1-dev-shaped pipeline whose safetensors files hold real headers (the exact
FLUX.1-dev transformer config, a T5-XXL encoder, CLIP-L and FLUX's VAE, bf16) and *sparse*
data (ftruncate: no disk used, reads give zeros), so the plan -- which reads headers only --
is exactly the full-size one. Then, per variant, :func:`qconvert.costs.estimate` as a staging
job streamed from the Hub on the standard runner. Writes bench/plan_costs.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_full_size import meta_shapes  # noqa: E402

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        n = 2
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def _shapes_of(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from qconvert.tiny import builtin_path

    slim = builtin_path("slim-flux")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(slim, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for comp, name in (("transformer", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        shapes, config = meta_shapes(comp)
        sparse_safetensors(out / comp / f"{name}.safetensors", shapes)
        if comp == "transformer":
            config = {"_class_name": "FluxTransformer2DModel", **{k: v for k, v in config.items() if not k.startswith("_")}}
        (out / comp / "config.json").write_text(json.dumps(config, indent=2, default=list))
    with torch.device("meta"):
        sparse_safetensors(out / "text_encoder" / "model.safetensors", _shapes_of(CLIPTextModel(CLIPTextConfig(**CLIP_L))))
        sparse_safetensors(out / "vae" / "diffusion_pytorch_model.safetensors", _shapes_of(AutoencoderKL(**FLUX_VAE)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default="/tmp/flux-headers", type=Path)
    ap.add_argument("--plan", default=str(Path(__file__).parent.parent / "releases" / "flux1-dev.toml"))
    args = ap.parse_args()
    build(args.folder)
    from qconvert.convert import get_backend, make_plan
    from qconvert.costs import RUNNERS, estimate
    from qconvert.release import load_plan
    from qconvert.sources import resolve_source

    plan = load_plan(args.plan)
    source = resolve_source(str(args.folder))
    rows = []
    for v in plan.variants:
        backend = get_backend(v.backend, v.scheme, **v.options)
        p = make_plan(source, backend, v.components)[0]
        c = estimate(p, backend, streamed=True, staged=True, runner="standard")
        rows.append({"variant": v.name, "backend": v.backend, "scheme": v.scheme, "bytes_in": p.bytes_in,
                     "bytes_out": p.bytes_out, **c.to_dict()})  # fmt: skip
        print(f"{v.name:<10} {c.line()}")
    out = Path(__file__).parent / "plan_costs.json"
    out.write_text(json.dumps({"plan": Path(args.plan).name, "runner": RUNNERS["standard"].__dict__, "variants": rows},
                              indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
