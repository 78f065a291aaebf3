"""The built-in tiny pipeline: deterministic, complete, runnable."""

from __future__ import annotations

import json

import torch

from conftest import tree_hashes
from qconvert import tiny


def test_build_is_byte_identical(tmp_path, tiny_path):
    tiny.build_pipeline(tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == tree_hashes(tiny_path)


def test_tiny_pipeline_generates(tiny_path):
    from diffusers import FluxPipeline

    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    pipe = FluxPipeline.from_pretrained(tiny_path)
    img = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_tokenizers_are_hand_built_and_stable(tiny_path):
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(tiny_path / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny_path / "tokenizer_2")
    ids = clip("a photo of a cat").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert ids == [683, 320, 537, 524, 515, 320, 66, 523, 684]  # fixed by the hand-built vocab
    assert t5("a cat").input_ids == t5("a cat").input_ids
    assert t5("a cat").input_ids[-1] == t5.eos_token_id
