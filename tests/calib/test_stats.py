"""Calibration windows and streamed per-channel statistics."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.backends.onnx_qdq import session_with_outputs
from qgraph.calib.data import TokenWindows, _windows
from qgraph.calib.stats import ChannelStats, collect_stats
from qgraph.errors import QGraphError
from qgraph.ir.regions import find_linears


def test_channel_stats_streaming_equals_whole_batch(rng):
    chunks = [rng.standard_normal((1, 17, 6)).astype(np.float32) * (i + 1) for i in range(5)]
    s = ChannelStats.empty(6)
    for c in chunks:
        s.update(c)
    whole = np.concatenate([c.reshape(-1, 6) for c in chunks])
    np.testing.assert_array_equal(s.min, whole.min(0))
    np.testing.assert_array_equal(s.max, whole.max(0))
    np.testing.assert_allclose(s.abs_mean, np.abs(whole).mean(0), rtol=1e-6)
    assert s.count == 85 and s.tensor_max == whole.max()


def test_windows_are_non_overlapping_and_counted():
    ids = np.arange(10_000)
    w = _windows(ids, "t.txt", 8192, 3, 512, "calibration", "--calib-windows")
    assert w.ids.shape == (3, 512) and w.ids[0, 0] == 8192 and w.ids[2, -1] == 8192 + 3 * 512 - 1
    e = _windows(ids, "t.txt", 0, 16, 512, "evaluation", "--windows")
    assert e.scored_predictions == 8176


def test_text_too_short_says_how_many_fit():
    with pytest.raises(QGraphError, match=r"too short for 8 calibration windows .* 3 fit") as e:
        _windows(np.arange(8192 + 1600), "short.txt", 8192, 8, 512, "calibration", "--calib-windows")
    assert "--calib-windows to 3" in e.value.fix


def test_collect_stats_matches_direct_run(llama_captured):
    model = llama_captured.model
    names = list(dict.fromkeys(l.activation.name for l in find_linears(model)))
    ids = np.random.default_rng(1).integers(0, 256, size=(3, 16), dtype=np.int64)
    stats = collect_stats(model, names, TokenWindows(ids, 0, "x"), progress=False)
    assert set(stats) == set(names)
    assert [o.name for o in model.graph.outputs] == ["logits"]  # extra outputs removed again
    # Check one value against a direct run that exposes it.
    sess = session_with_outputs(model, [names[0]], threads=1, optimize=False)
    acts = np.concatenate([sess.run([names[0]], {"input_ids": r[None]})[0].reshape(-1, 64) for r in ids])
    np.testing.assert_array_equal(stats[names[0]].max, acts.max(0))
    np.testing.assert_array_equal(stats[names[0]].min, acts.min(0))


def test_samples_keep_every_windows_first_positions(rng):
    # Attention-sink tokens (the first positions) carry the largest activations: a search must see them.
    s = ChannelStats.empty(3)
    windows = [rng.standard_normal((1, 64, 3)).astype(np.float32) for _ in range(2)]
    for w in windows:
        s.update(w, sample_stride=16, sink_positions=4)
    expected = np.concatenate([w[0, [0, 1, 2, 3, 8, 24, 40, 56]] for w in windows])
    np.testing.assert_array_equal(s.sample_rows, expected)
