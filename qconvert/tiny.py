"""Built-in Flux pipelines with random weights, made locally (no network).

* ``tiny-flux``: a complete, runnable FluxPipeline a few MB in size. The README demo source
  and the main test fixture. 2 denoising steps at 32x32 run in well under a second on CPU.
* ``tiny-flux-schnell``: ``tiny-flux`` shaped like FLUX.1 [schnell] (no guidance embedder:
  ``guidance_in`` / ``time_text_embed.guidance_embedder`` absent).
* one per other family, declared by its module (``Family.builtins``): ``tiny-flux-kontext``
  (FluxKontextPipeline), ``tiny-flux-fill`` (FluxFillPipeline: 12 input channels, the tiny
  VAE's 4 latent + 4 masked-image + 4 mask), ``tiny-flux-control`` (FluxControlPipeline: 8),
  ``tiny-chroma`` (ChromaPipeline: ChromaTransformer2DModel and T5 only).
* ``slim-flux``: a *width-3072* Flux transformer (24 heads x 128, 1 double + 1 single block,
  joint_attention_dim 4096) with small text encoders and VAE, ~1.2 GB in bf16. diffusers'
  converter for Black Forest Labs single files hard-codes width 3072, so tests of the BFL
  layout and of bounded-memory conversion use this one.

Both are deterministic: the same builder version writes byte-identical files. They are built
once into the cache folder (``$QCONVERT_CACHE`` or ``~/.cache/qconvert``) and reused.
Tokenizers are built from hand-written vocabularies because tokenizer trainers are not
deterministic run to run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the built files would change: the cache key includes it.
BUILDER_VERSION = 1

SEED = 0

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 4, 8],
)

SLIM_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

# Flux's VAE constants, so the pipeline's latent scaling code runs unchanged.
_VAE_SCALING = dict(scaling_factor=1.5035, shift_factor=0.0609)

_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

def _builtins() -> dict[str, tuple[str, dict[str, Any]]]:
    """Built-in name -> (family, transformer config changes), from the family modules."""
    from .families import all_families

    table = {name: (fam.name, changes) for fam in all_families() for name, changes in fam.builtins.items()}
    table["slim-flux"] = ("flux", {"slim": True})
    return table


BUILTINS = _builtins()
BUILTIN_SOURCES = tuple(BUILTINS)


def cache_root() -> Path:
    env = os.environ.get("QCONVERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qconvert"


def builtin_path(name: str, cache_dir: Path | None = None) -> Path:
    """Return the folder of a built-in pipeline, building it on first use."""
    if name not in BUILTIN_SOURCES:
        raise ValueError(f"unknown built-in source {name!r}")
    root = cache_dir or cache_root()
    target = root / f"{name}-v{BUILDER_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        family, changes = BUILTINS[name]
        build_pipeline(tmp, family=family, **changes)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: keep theirs.
            if not (target / "model_index.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- tokenizers ---------------------------------------------------------------------------

_WORDS = (
    "a an the of and in on with at to for from by is cat dog photo portrait painting "
    "of sitting red blue green yellow black white small large city forest mountain river "
    "sky sun moon night day house car tree flower woman man child bird fish robot "
    "astronaut horse riding detailed high quality"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    # Merge each demo word letter by letter, left to right, so common prompts tokenize
    # into whole words. Order is fixed by _WORDS, hence deterministic ids.
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return tok, len(vocab)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for i, word in enumerate(_WORDS):
        pieces.append(("\u2581" + word, -1.0 - i * 0.01))
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"):
        pieces.append((ch, -5.0 - i * 0.01))
        pieces.append(("\u2581" + ch, -6.0 - i * 0.01))
    pieces.append(("\u2581", -7.0))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return tok, len(pieces)


# --- models -------------------------------------------------------------------------------


def _save(model: Any, folder: Path, dtype: Any) -> None:
    model.eval()
    model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)


def build_pipeline(out: Path, *, family: str = "flux", slim: bool = False, **changes: Any) -> None:
    """Write a complete pipeline folder of ``family`` with seeded random weights to ``out``:
    tiny-flux's shapes (``slim``: slim-flux's) with the transformer config ``changes``."""
    import torch

    from .families import family as family_named

    fam = family_named(family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**fam.tiny_transformer_config(SLIM_TRANSFORMER if slim else TINY_TRANSFORMER), **changes}
    # The tiny pipeline is float32 so that a bare ``FluxPipeline.from_pretrained(out)`` (which
    # loads diffusers models in float32 but transformers models in their saved dtype) runs.
    # The slim one is bf16 like the real FLUX.1-dev checkpoint.
    dtype = torch.bfloat16 if slim else torch.float32
    t5_folder, t5_tokenizer = fam.text_encoder
    clip = "text_encoder" in fam.components and t5_folder != "text_encoder"
    # Each model from its own seed, in this order: the files depend on it.
    torch.manual_seed(SEED)
    _save(fam.transformer_type()(**cfg), out / "transformer", dtype)
    if clip:
        torch.manual_seed(SEED + 1)
        _save(_clip_model(cfg, slim), out / "text_encoder", dtype)
    torch.manual_seed(SEED + 2)
    _save(_t5_model(cfg), out / t5_folder, dtype)
    torch.manual_seed(SEED + 3)
    _save(_vae(slim), out / "vae", dtype)
    _save_rest(out, fam, clip=clip)


def _clip_model(cfg: dict[str, Any], slim: bool) -> Any:
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_config(cfg, _clip_tokenizer()[1], slim))


def _t5_model(cfg: dict[str, Any]) -> Any:
    from transformers import T5EncoderModel

    return T5EncoderModel(_t5_config(cfg, _t5_tokenizer()[1]))


def _vae(slim: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4,), latent_channels=16 if slim else 1, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, **_VAE_SCALING)  # fmt: skip


def _save_rest(out: Path, fam: Any, *, clip: bool) -> None:
    """Scheduler, tokenizers and model_index.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**_SCHEDULER).save_pretrained(out / "scheduler")
    if clip:
        _clip_tokenizer()[0].save_pretrained(out / "tokenizer")
    _t5_tokenizer()[0].save_pretrained(out / fam.text_encoder[1])
    model_index = _model_index(fam, clip=clip)
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")


def _clip_config(cfg: dict[str, Any], vocab: int, slim: bool) -> Any:
    """CLIP-L stand-in; slim: one layer as wide as the 768-wide pooled projection Flux expects
    (CLIPTextModel pools the hidden state)."""
    from transformers import CLIPTextConfig

    width = {"hidden_size": cfg["pooled_projection_dim"], "num_hidden_layers": 1} if slim else {
        "hidden_size": 32, "num_hidden_layers": 2, "projection_dim": cfg["pooled_projection_dim"]}  # fmt: skip
    return CLIPTextConfig(vocab_size=vocab, intermediate_size=37, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **width)  # fmt: skip


def _t5_config(cfg: dict[str, Any], vocab: int) -> Any:
    from transformers import T5Config

    return T5Config(vocab_size=vocab, d_model=cfg["joint_attention_dim"], d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)  # fmt: skip


def _model_index(fam: Any, *, clip: bool) -> dict[str, Any]:
    import diffusers

    t5_folder, t5_tokenizer = fam.text_encoder
    index: dict[str, Any] = {
        "_class_name": fam.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        t5_folder: ["transformers", "T5EncoderModel"],
        t5_tokenizer: ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", fam.transformer_class],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if clip:
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    return index
