"""The verifier: a function-preserving pass must leave the float model's outputs unchanged.

Runs the float graph before and after a pass on the same random and real token inputs, in ONNX
Runtime with graph optimizations off (so ORT's own rewrites do not blur the comparison), and
fails with the pass name and the relative error ||y' - y|| / ||y|| when outputs move beyond
float rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.ir.feeds import token_feeds

DEFAULT_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Verification:
    """The outcome of checking one pass: worst relative output error over the inputs."""

    pass_name: str
    relative_error: float
    inputs: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "relative_error": self.relative_error, "inputs": self.inputs,
                "tolerance": self.tolerance, "ok": self.ok}


def run_float(model: ir.Model, inputs: list[np.ndarray] | list[dict]) -> list[np.ndarray]:
    """First output of the graph for each input, one thread, no ORT graph rewrites."""
    from qgraph.backends.onnx_qdq import session_from_model

    session = session_from_model(model, threads=1, optimize=False)
    first = session.get_outputs()[0].name
    return [session.run([first], token_feeds(session.get_inputs(), x))[0] for x in inputs]


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(candidate, dtype=np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def token_range(model: ir.Model) -> int:
    """How many token ids the model's first input accepts: the row count of the embedding table it gathers.

    A decoder's logits width is its vocabulary, but an encoder's output width is its hidden size,
    so the table itself is the reliable source; 1000 when no constant table reads the input.
    """
    from qgraph.ir.regions import find_embeddings

    ids = model.graph.inputs[0]

    def reads_ids(value: ir.Value | None) -> bool:  # directly, or through a reshape / cast of the ids (GPT-2, OPT)
        for _ in range(4):
            if value is ids:
                return True
            node = value.producer() if value is not None else None
            if node is None or node.op_type not in ("Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity"):
                return False
            value = node.inputs[0]
        return False

    return next((int(node.inputs[0].shape[0]) for _, node in find_embeddings(model) if reads_ids(node.inputs[1])), 1000)


def verification_inputs(vocab: int, real: np.ndarray | None = None, *, random_rows: int = 2, length: int = 64,
                        seed: int = 0) -> list[np.ndarray]:
    """Random token rows plus (optionally) real token windows, each shaped [1, T]."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, vocab, size=(1, length), dtype=np.int64) for _ in range(random_rows)]
    if real is not None:
        rows += [np.asarray(r, dtype=np.int64)[None, :] for r in np.atleast_2d(real)]
    return rows


def tensor_verification_inputs(inputs: list, data=None, *, random_rows: int = 2, seed: int = 0) -> list[dict]:
    """Feeds for a graph that reads tensors: random ones of each input's dtype and shape, then the data's first run.

    Float inputs get standard normal values, integer ones zeros; a dynamic axis takes the data's size
    (1 without data).
    """
    from qgraph.calib.tensors import random_feeds

    rng = np.random.default_rng(seed)
    first = data.batches[0] if data is not None and data.batches else {}

    def size(v, axis: int) -> int:
        return first[v.name].shape[axis] if v.name in first else 1

    return [random_feeds(inputs, size, rng) for _ in range(random_rows)] + ([first] if first else [])


def check_pass(
    pass_: ir.passes.PassBase, model: ir.Model, inputs: list[np.ndarray] | list[dict], *, name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[ir.passes.PassResult, Verification]:
    """Run a function-preserving pass and prove its outputs did not move; raise if they did."""
    name = name or type(pass_).__name__
    before = run_float(model, inputs)
    result = pass_(model)
    after = run_float(result.model, inputs)
    error = max(relative_error(b, a) for b, a in zip(before, after, strict=True))
    verdict = Verification(name, error, len(inputs), tolerance)
    if not verdict.ok:
        raise QGraphError(
            f"pass {name} is meant to preserve the float model but moved its outputs: "
            f"||y' - y|| / ||y|| = {error:.3e} > {tolerance:.0e} over {len(inputs)} inputs",
            "this is a bug in the pass; compile without it (or without --verify to inspect the artifact) and report it",
        )
    return result, verdict
