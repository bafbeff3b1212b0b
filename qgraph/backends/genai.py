"""onnxruntime-genai model folders: a KV-cache artifact plus the genai_config.json that describes it.

onnxruntime-genai (`og.Model(dir)`, `og.Generator`) reads the decoder graph, its input/output names
and the model's sizes from genai_config.json, and the tokenizer from tokenizer.json beside it. A
qgraph KV-cache artifact already has onnxruntime-genai's names and tokenizer files, so the folder is
the artifact with this one file more. Where the artifact has its fused-attention runtime graph
(model.ort.onnx: GroupQueryAttention writes the cache in place into a max-length buffer), the folder
names that graph and sets past_present_share_buffer, as the model builder does; the unfused graph
grows the cache by Concat, hence past_present_share_buffer false.
"""

from __future__ import annotations

from pathlib import Path

from qgraph.errors import QGraphError

GENAI_CONFIG = "genai_config.json"


def check_genai_source(source: dict, has_cache: bool) -> dict:
    """The decoder description a genai folder needs; QGraphError naming what is missing."""
    if not has_cache:
        raise QGraphError("--format genai needs a KV-cache graph (past_key_values inputs); this one has none",
                          "compile from the Hugging Face directory, .gguf or default model with --kv-cache")
    decoder = source.get("decoder")
    if not decoder:
        raise QGraphError("--format genai needs the model's sizes (layers, heads, vocab), recorded at capture with "
                          "--kv-cache; this graph came without them",
                          "compile from the Hugging Face directory, .gguf or default model with --kv-cache")
    return decoder


def genai_config(decoder: dict, model_file: str = "model.onnx", share_buffer: bool = False) -> dict:
    """genai_config.json for a decoder-only model (greedy search by default; og's set_search_options overrides)."""
    eos = decoder.get("eos_token_id")
    pad = decoder.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": decoder.get("bos_token_id"),
            "context_length": decoder["context_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": decoder["head_size"],
                "hidden_size": decoder["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": decoder["num_attention_heads"],
                "num_hidden_layers": decoder["num_hidden_layers"],
                "num_key_value_heads": decoder["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": decoder.get("model_type", "llama"),
            "vocab_size": decoder["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": decoder["context_length"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(directory: Path, decoder: dict, model_file: str = "model.onnx", share_buffer: bool = False) -> Path:
    from qgraph.artifact import write_json

    path = Path(directory) / GENAI_CONFIG
    write_json(path, genai_config(decoder, model_file, share_buffer))
    return path
