"""Per-tensor policy as data: unit tests on key lists alone (no weights)."""

from __future__ import annotations

from qconvert.plan import CAST, KEEP, QUANTIZE, Plan, ComponentPlan, Policy, Rule, TensorPlan, human_bytes

KEYS = [
    ("transformer_blocks.0.attn.to_q.weight", (64, 64), True),
    ("transformer_blocks.0.attn.to_q.bias", (64,), False),
    ("transformer_blocks.0.attn.norm_q.weight", (16,), False),
    ("single_transformer_blocks.0.proj_out.weight", (64, 128), True),
    ("x_embedder.weight", (64, 4), True),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", (32, 37), True),
]


def decide_all(policy):
    return {n: policy.decide(n, s, is_linear_weight=lin).action for n, s, lin in KEYS}


def test_default_policy_quantizes_linear_weights_only():
    p = Policy((Rule(r"\.weight$", QUANTIZE, "int8wo", when=("linear",)),))
    got = decide_all(p)
    assert got["transformer_blocks.0.attn.to_q.weight"] == QUANTIZE
    assert got["transformer_blocks.0.attn.to_q.bias"] == KEEP
    assert got["transformer_blocks.0.attn.norm_q.weight"] == KEEP  # a weight, but not a Linear
    assert got["x_embedder.weight"] == QUANTIZE


def test_first_matching_rule_wins():
    p = Policy(
        (
            Rule(r"(^|\.)wo\.weight$", CAST, "F32", when=("linear",), reason="kept in fp32 by transformers"),
            Rule(r"\.weight$", QUANTIZE, "nf4", when=("linear",)),
        )
    )
    got = decide_all(p)
    assert got["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == CAST
    assert got["single_transformer_blocks.0.proj_out.weight"] == QUANTIZE


def test_conditions_on_shape():
    p = Policy((Rule(r"", CAST, "F32", when=("1d",)), Rule(r"", CAST, "F32", when=("small",)), Rule(r"", QUANTIZE, "Q8_0")))
    assert p.decide("a.bias", (3072,), is_linear_weight=False).action == CAST
    assert p.decide("a.weight", (32, 32), is_linear_weight=True).action == CAST  # 1024 elements
    assert p.decide("a.weight", (32, 33), is_linear_weight=True).action == QUANTIZE


def test_plan_totals_and_render():
    t = TensorPlan("a.weight", (4, 4), "BF16", QUANTIZE, "nf4", 32, 8)
    cp = ComponentPlan("transformer", "quantize", "nf4", [t], 32, 8)
    copy = ComponentPlan("vae", "copy", None, [], 100, 100)
    plan = Plan("bnb", "nf4", {"kind": "builtin"}, [cp, copy])
    assert (plan.bytes_in, plan.bytes_out) == (132, 108)
    text = plan.render(verbose=True)
    assert "a.weight" in text and "transformer" in text and "vae" in text
    d = plan.to_dict()
    assert d["components"][0]["quantized"] == 1
    assert human_bytes(1_500_000) == "1.50 MB"
