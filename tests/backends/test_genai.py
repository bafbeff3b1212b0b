"""`--format genai`: the artifact is an onnxruntime-genai model folder that generates qgraph's tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qgraph
from qgraph.backends.genai import GENAI_CONFIG
from qgraph.calib.data import TokenWindows
from qgraph.errors import QGraphError

og = pytest.importorskip("onnxruntime_genai")
PROMPT = [5, 17, 99, 3, 42, 8]


def og_greedy(folder, prompt: list[int], new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    from tests.conftest import tiny_llama, word_tokenizer

    d = tmp_path_factory.mktemp("untied_llama")
    tiny_llama(tie=False).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("recipe", ["fp32", "w8a8", "w4a16"])
def test_onnxruntime_genai_generates_the_tokens_of_qgraph_generate(untied_dir, tmp_path, recipe):
    captured = qgraph.load(untied_dir, progress=False, kv_cache=True)
    windows = TokenWindows(np.random.default_rng(0).integers(1, 250, size=(4, 32), dtype=np.int64), 0, "random")
    folder = qgraph.compile(captured, recipe, calib=windows, progress=False).save(tmp_path / recipe, progress=False,
                                                                                   genai=True)
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["vocab_size"] == 256
    ours = qgraph.generate(folder, PROMPT, max_new_tokens=20, eos_token_id=None).new_ids
    assert og_greedy(folder, PROMPT, 20) == ours and len(set(ours)) > 4


def test_genai_needs_a_cache_graph(llama_captured, tmp_path):
    compiled = qgraph.compile(llama_captured, "fp32", progress=False)
    with pytest.raises(QGraphError, match="needs a KV-cache graph"):
        compiled.save(tmp_path / "x", genai=True)
    assert not (tmp_path / "x").exists()
