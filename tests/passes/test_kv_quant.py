"""kv_quant: KIVI's key (per channel, token groups) and value (per token) rounding, against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qgraph.backends.dynamic_rounding import fake_quantize
from qgraph.backends.onnx_qdq import session_from_model, session_with_outputs
from qgraph.ir.attention import find_attention
from qgraph.passes.kv_quant import KVQuantOptions, KVQuantPass


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 8)),
                elements=st.floats(-100, 100, width=32)),
       group=st.integers(1, 16), bits=st.sampled_from([2, 4, 8]), axis=st.integers(0, 2))
def test_fake_quantize_stays_in_each_group_and_within_half_a_step(x, group, bits, axis):
    y = fake_quantize(x, axis, group, bits)
    assert y.shape == x.shape
    xt, yt = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    for start in range(0, xt.shape[-1], group):
        xg, yg = xt[..., start:start + group], yt[..., start:start + group]
        lo, hi = xg.min(axis=-1, keepdims=True), xg.max(axis=-1, keepdims=True)
        step = (hi - lo) / (2**bits - 1)
        assert np.all(np.abs(yg - xg) <= step / 2 + 1e-4 * (np.abs(hi) + np.abs(lo) + 1))
        assert np.all(yg >= lo - 1e-4 * (np.abs(lo) + 1)) and np.all(yg <= hi + 1e-4 * (np.abs(hi) + 1))
        for row_x, row_y in zip(xg.reshape(-1, xg.shape[-1]), yg.reshape(-1, yg.shape[-1]), strict=True):
            assert len(np.unique(row_y)) <= 2**bits
            if np.all(row_x == row_x[0]):  # a constant group comes back exactly
                assert np.all(row_y == row_x)


@pytest.mark.parametrize("tokens, group", [(12, 8), (16, 8), (9, 32)])  # partial last group, whole groups, one group
def test_graph_rounding_equals_the_reference_on_k_and_v(llama_captured, tokens, group):
    model = llama_captured.model.clone()
    blocks, _ = find_attention(model)
    names = [t.value.name for b in blocks for t in (b.key, b.value)]
    ids = (np.arange(tokens, dtype=np.int64)[None] * 7) % 256
    p = KVQuantPass(KVQuantOptions(bits=4, group_size=group))
    assert p(model).modified
    dq_names = []
    for name in names:  # the rounding's last node (after the Slice / inverse Transpose it may need)
        v = next(n for n in model.graph if n.name == f"{name}.kivi.dq_groups").outputs[0]
        while (users := [u for u, _ in v.uses()]) and len(users) == 1 and users[0].name.startswith(f"{name}.kivi."):
            v = users[0].outputs[0]
        dq_names.append(v.name)
    # Both sides from the quantized graph: a block's K already depends on the earlier blocks' rounding.
    outs = session_with_outputs(model, names + dq_names).run(names + dq_names, {"input_ids": ids})
    before, after = outs[: len(names)], outs[len(names):]
    for b in blocks:
        for t, axis, g in ((b.key, b.key.token_axis, group), (b.value, b.value.channel_axis, min(group, 16))):
            i = names.index(t.value.name)
            ref = fake_quantize(before[i], axis, g, 4)
            np.testing.assert_allclose(after[i], ref, rtol=1e-5, atol=1e-5 * np.abs(before[i]).max())
            assert not np.allclose(after[i], before[i])  # it did round


def test_more_bits_less_error_and_a_report_per_block(llama_captured):
    ids = (np.arange(24, dtype=np.int64)[None] * 5) % 256
    ref = session_from_model(llama_captured.model).run(None, {"input_ids": ids})[0]
    errors = {}
    for bits in (8, 4, 2):
        model = llama_captured.model.clone()
        p = KVQuantPass(KVQuantOptions(bits=bits, group_size=8))
        p(model)
        got = session_from_model(model).run(None, {"input_ids": ids})[0]
        errors[bits] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        s = p.summary()
        assert len(s["blocks"]) == 2 and s["refused"] == []
        assert s["blocks"][0]["key"]["spec"] == f"uint{bits} block(axis=2,size=8) asym dynamic"
        # 2 layers x (K + V) x 2 KV heads x 16 channels, bits each, plus a float16 step and minimum per 8.
        assert s["cache_bytes_per_token"] == 2 * 2 * (32 * bits / 8 + 32 / 8 * 4)
    assert errors[8] < 0.01 < errors[4] < errors[2], errors


def test_keys_only_leaves_values_alone(llama_captured):
    model = llama_captured.model.clone()
    p = KVQuantPass(KVQuantOptions(values=False))
    p(model)
    assert all("value" not in b and "key" in b for b in p.summary()["blocks"])


def test_a_graph_without_attention_is_left_alone_with_the_reason():
    import onnx_ir as ir

    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 8]))
    node = ir.node("Relu", [x], name="relu")
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21}), ir_version=10)
    p = KVQuantPass()
    assert not p(model).modified
    assert p.summary()["reason"].startswith("no attention block") and p.summary()["blocks"] == []
