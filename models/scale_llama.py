"""A ~1.5 B-parameter Llama with seeded random weights, written once as safetensors shards, plus a depth family.

`build()` writes a transformers folder (config.json, sharded safetensors + index, SmolLM2's tokenizer) tensor by
tensor, never holding more than one shard in memory. Every tensor is drawn from its own generator seeded from
(seed, tensor name), so a tensor's values do not depend on the depth of the model it belongs to; `depth_variant()`
therefore makes a shallower model from the same shards (symlinks and a filtered index, no copies), and `family()`
gives the 0.25x / 0.5x / 1x depths. Both are marker-based (`built.json`, written last) and idempotent.
Shards also start at the family depths and at model.norm, so family variants link only whole shards they use.

Not a package: tools import it after `sys.path.insert(0, "<repo>/models")`.

    python models/scale_llama.py [--root DIR] [--layers N ...] [--seed S] [--no-progress]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Container, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE / "llama-1.5b"

FULL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    initializer_range=0.02,
)

FORMAT = 1  # bump when the weight recipe changes: a folder built with another recipe is rebuilt
MARKER = "built.json"
INDEX = "model.safetensors.index.json"
OUTLIER_CHANNELS = 8
OUTLIER_SCALE = 8.0
NORM_MIN = 0.05
# Files this module writes; a folder is only ever deleted when everything in it matches one of these.
_OWN_FILES = (
    "config.json", MARKER, INDEX, "model-*-of-*.safetensors", "tokenizer*.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json", "vocab.*", "merges.txt", "*.tmp",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------------------- sizes


def _cfg(config: Any) -> dict:
    """A plain dict from a dict, a transformers config, or None (FULL)."""
    if config is None:
        return dict(FULL)
    if isinstance(config, dict):
        return dict(config)
    return config.to_dict()


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def tensor_plan(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM parameter, in file order (embed, layer 0 .. L-1, norm, lm_head)."""
    c = _cfg(config)
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_out = c["num_attention_heads"] * _head_dim(c)
    kv_out = c.get("num_key_value_heads", c["num_attention_heads"]) * _head_dim(c)
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    plan.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings", False):
        plan.append(("lm_head.weight", (v, h)))
    return plan


def param_count(config: Any) -> int:
    """Parameters of a LlamaForCausalLM with this config (a dict, a LlamaConfig, or None for FULL)."""
    return sum(math.prod(shape) for _, shape in tensor_plan(config))


def fp32_bytes(folder: Path) -> int:
    """Bytes of the tensors the folder's index lists, at 4 bytes a value (whatever dtype the files hold)."""
    from safetensors import safe_open

    folder = Path(folder)
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    total = 0
    for file, names in by_file.items():
        with safe_open(str(folder / file), framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(n).get_shape()) for n in names)
    return total


# ------------------------------------------------------------------------------------------------------- weights


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, name) with a stable hash, so values do not depend on the process or depth."""
    digest = hashlib.sha256(f"scale_llama:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def outlier_channels(seed: int, hidden_size: int) -> torch.Tensor:
    """The fixed channels (sorted) whose layer-norm weights are scaled by OUTLIER_SCALE in every layer."""
    perm = torch.randperm(hidden_size, generator=_generator(seed, "outlier_channels"))
    return perm[: min(OUTLIER_CHANNELS, hidden_size)].sort().values


def make_tensor(name: str, shape: tuple[int, ...], cfg: dict, seed: int, outliers: torch.Tensor) -> torch.Tensor:
    """One parameter, fp32: normal(0, initializer_range) for matrices; 1 + 0.1 * normal, >= NORM_MIN, for norms."""
    g = _generator(seed, name)
    if name.endswith("norm.weight"):
        w = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1.0, generator=g).mul_(0.1).add_(1.0)
        w.clamp_(min=NORM_MIN)
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            w[outliers] *= OUTLIER_SCALE
        return w
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, cfg["initializer_range"], generator=g)


def _cut_points(cfg: dict) -> set[str]:
    """Tensors that start a new shard regardless of size: the first tensor of each family depth's first unused
    layer, and model.norm. A family variant then links whole shards holding only tensors it uses, so
    transformers loads it with no unexpected keys (other depths load fine too, reporting the extra layers
    in the last linked layer shard as unexpected)."""
    full = cfg["num_hidden_layers"]
    cuts = {f"model.layers.{n}.input_layernorm.weight" for n in family_layers(full).values() if n < full}
    return cuts | {"model.norm.weight"}


def _shards(plan: list[tuple[str, tuple[int, ...]]], shard_bytes: int,
            cut_before: Container[str] = ()) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the plan in order: a new shard when adding the next tensor would pass shard_bytes (or at a cut)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = 4 * math.prod(shape)
        if shards[-1] and (size + nbytes > shard_bytes or name in cut_before):
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


# --------------------------------------------------------------------------------------------------- folders


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clear(folder: Path) -> None:
    """Remove a folder this module wrote (partial or stale); refuse when it holds anything else."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RuntimeError(f"{folder} exists and is not a directory; remove it or pick another root")
    if not folder.exists():
        return
    foreign = [p.name for p in folder.iterdir()
               if (p.is_dir() and not p.is_symlink()) or not any(fnmatch.fnmatch(p.name, pat) for pat in _OWN_FILES)]
    if foreign:
        raise RuntimeError(f"{folder} has no valid {MARKER} but holds files this builder did not write "
                           f"({', '.join(sorted(foreign)[:5])}); remove it or pick another root")
    shutil.rmtree(folder)


def _files_present(folder: Path) -> bool:
    index = _read_json(folder / INDEX)
    if not index or not (folder / "config.json").is_file():
        return False
    return all((folder / f).is_file() for f in set(index["weight_map"].values()))  # is_file follows symlinks


@cache
def _tokenizer() -> Any:
    """SmolLM2's tokenizer (vocab 49152) from the embedded GGUF; loaded once per process (~5 s)."""
    from qgraph.ir.capture import default_model_location, load_tokenizer

    d, g = default_model_location()
    return load_tokenizer(d, g)


def _release_memory() -> None:
    """Give freed shard memory back to the OS (glibc keeps heap-allocated tensors under its mmap threshold)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _progress(enabled: bool, total: int, label: str):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)
    return bar, bar.add_task(label, total=total)


def _spec(config_overrides: dict | None) -> dict:
    spec = {**FULL, **(config_overrides or {})}
    return json.loads(json.dumps(spec))  # as it reads back from built.json


def build(root: Path = DEFAULT_ROOT, *, config_overrides: dict | None = None, seed: int = 0,
          shard_bytes: int = 1 << 30, progress: bool = True) -> Path:
    """Write the model folder once (config, shards + index, tokenizer, then built.json); return root.

    A folder whose built.json matches (config, seed, recipe) is returned as is; a partial or stale one is
    removed and rebuilt. At most one shard's tensors are in memory at a time.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    root = Path(root).absolute()
    spec = _spec(config_overrides)
    marker = _read_json(root / MARKER)
    if (marker and marker.get("format") == FORMAT and marker.get("config") == spec and marker.get("seed") == seed
            and _files_present(root)):
        return root
    _clear(root)
    root.mkdir(parents=True)

    config = LlamaConfig(**spec)
    config.architectures = ["LlamaForCausalLM"]
    config_dict = config.to_dict()
    config_dict["dtype"] = config_dict["torch_dtype"] = "float32"  # transformers 5 reads dtype, 4.x torch_dtype
    (root / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    cfg = config.to_dict()
    plan = tensor_plan(spec)
    shards = _shards(plan, shard_bytes, _cut_points(spec))
    n = len(shards)
    outliers = outlier_channels(seed, spec["hidden_size"])
    total = sum(4 * math.prod(shape) for _, shape in plan)
    weight_map: dict[str, str] = {}
    bar, task = _progress(progress, total, f"{root.name} ({n} shards)")
    start = time.perf_counter()
    with bar:
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{n:05d}.safetensors"
            bar.update(task, description=f"{root.name} shard {k}/{n}")
            tensors: dict[str, torch.Tensor] = {}
            for name, shape in shard:
                tensors[name] = make_tensor(name, shape, cfg, seed, outliers)
                weight_map[name] = file
                bar.advance(task, 4 * math.prod(shape))
            save_file(tensors, str(root / file), metadata={"format": "pt"})
            del tensors
            _release_memory()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _tokenizer().save_pretrained(str(root))  # after the weights: its load does not add to the shards' peak
    built = {
        "format": FORMAT, "config": spec, "seed": seed, "param_count": param_count(spec), "fp32_bytes": total,
        "shards": n, "shard_bytes": shard_bytes, "outlier_channels": outliers.tolist(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (root / MARKER).write_text(json.dumps(built, indent=2) + "\n")
    return root


def _variant_path(root: Path, layers: int) -> Path:
    return root.parent / f"{root.name}-l{layers}"


def depth_variant(root: Path, layers: int) -> Path:
    """`<root>-l{layers}`: the first `layers` layers of root (built), sharing its shards through relative symlinks."""
    root = Path(root).absolute()
    source = _read_json(root / MARKER)
    if not source or not _files_present(root):
        raise FileNotFoundError(f"{root} is not a built model folder (no {MARKER}); run build() first")
    full_layers = source["config"]["num_hidden_layers"]
    if not 1 <= layers <= full_layers:
        raise ValueError(f"layers must be in 1..{full_layers}, got {layers}")
    out = _variant_path(root, layers)
    want = {"format": FORMAT, "source": root.name, "layers": layers, "source_marker": source}
    marker = _read_json(out / MARKER)
    if marker == want and _files_present(out):
        return out
    _clear(out)
    out.mkdir(parents=True)

    config = json.loads((root / "config.json").read_text())
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists some configs carry: keep them in step
        if isinstance(config.get(key), list):
            config[key] = config[key][:layers]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    skip = {"config.json", MARKER, INDEX}
    for p in root.iterdir():
        if p.is_file() and p.name not in skip and not fnmatch.fnmatch(p.name, "model-*-of-*.safetensors"):
            shutil.copy2(p, out / p.name)  # tokenizer files

    index = json.loads((root / INDEX).read_text())

    def used(name: str) -> bool:
        m = _LAYER.match(name)
        return m is None or int(m.group(1)) < layers

    weight_map = {name: file for name, file in index["weight_map"].items() if used(name)}
    plan = tensor_plan({**source["config"], "num_hidden_layers": layers})
    if set(weight_map) != {name for name, _ in plan}:
        raise RuntimeError(f"{root / INDEX} does not list the tensors a {layers}-layer model needs")
    for file in sorted(set(weight_map.values())):
        (out / file).symlink_to(os.path.relpath(root / file, out))
    total = sum(4 * math.prod(shape) for _, shape in plan)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / MARKER).write_text(json.dumps(want, indent=2) + "\n")
    return out


def family_layers(full_layers: int) -> dict[str, int]:
    return {"0.25x": max(1, full_layers // 4), "0.5x": max(1, full_layers // 2), "1x": full_layers}


def family(root: Path = DEFAULT_ROOT) -> dict[str, Path]:
    """{"0.25x": <root>-l7, "0.5x": <root>-l14, "1x": root} for FULL; builds root (defaults) and variants if missing."""
    root = Path(root).absolute()
    marker = _read_json(root / MARKER)
    if not marker or not _files_present(root):
        build(root)
        marker = _read_json(root / MARKER)
    full_layers = marker["config"]["num_hidden_layers"]
    return {k: root if n == full_layers else depth_variant(root, n) for k, n in family_layers(full_layers).items()}


def _describe(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {"path": str(folder), "layers": config["num_hidden_layers"], "params": param_count(config),
            "fp32_bytes": fp32_bytes(folder)}


def _iter_cli(args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    root = build(args.root, seed=args.seed, progress=not args.no_progress)
    if args.layers:
        yield "full", root
        for n in args.layers:
            yield f"l{n}", depth_variant(root, n)
    else:
        yield from family(root).items()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"model folder (default {DEFAULT_ROOT})")
    ap.add_argument("--layers", type=int, nargs="+", help="depth variants to build (default: the 0.25x/0.5x family)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = {key: _describe(path) for key, path in _iter_cli(args)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
