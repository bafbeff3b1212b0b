"""Evaluate a model that reads tensors (an image classifier) on data, against its float reference.

`top1_agreement`: the share of samples whose arg-max class equals the reference's; `logit_cosine`:
the mean cosine between the two models' output rows (min beside it); `top1`: accuracy when the
data has labels (a folder per class). The first output is read, its last axis being the classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qgraph.calib.tensors import TensorFeeds, as_tensor_feeds
from qgraph.errors import QGraphError


def _outputs(runner, feeds: TensorFeeds) -> np.ndarray:
    first = runner.session.get_outputs()[0].name
    rows = [runner.run(feed, [first])[0] for feed in feeds.feeds(runner.inputs)]
    out = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim > 2 else r for r in rows])
    if out.ndim != 2:
        raise QGraphError(f"output {first!r} has shape {list(rows[0].shape)}: no class axis to compare",
                          "evaluate a classifier (outputs [batch, classes])")
    return out


def _session_runner(target: Any, threads: int, int8_kernel: str | None):
    from qgraph.runner import open_runner

    runner = open_runner(target, threads=threads, int8_kernel=int8_kernel)
    if runner.session is None:
        raise QGraphError(f"{target!s} does not run in ONNX Runtime here", "evaluate an ONNX Runtime artifact")
    return runner


def evaluate_tensors(target: Any, data: Any, *, reference: Any = None, threads: int = 2,
                     int8_kernel: str | None = None) -> dict:
    """{'samples', 'top1_agreement', 'logit_cosine', 'logit_cosine_min', ['top1', 'reference_top1']}."""
    runner, ref_runner = (None if path is None else _session_runner(path, threads, int8_kernel)
                          for path in (target, reference))
    feeds = as_tensor_feeds(data, runner.inputs)
    if reference is None and feeds.labels is None:
        raise QGraphError("nothing to compare with: no --reference and the data has no labels",
                          "give --reference FLOAT_ARTIFACT, or images in a folder per class")
    got = _outputs(runner, feeds)
    result: dict = {"model": runner.name, "samples": int(got.shape[0]), "data": feeds.source,
                    "int8_kernel": runner.int8_kernel}
    if ref_runner is not None:
        want = _outputs(ref_runner, feeds)
        if want.shape != got.shape:
            raise QGraphError(f"the reference's outputs are {list(want.shape)}, the artifact's {list(got.shape)}",
                              "give the float artifact this one was compiled from")
        cos = np.sum(want * got, axis=1) / np.maximum(np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
        result.update({"reference": ref_runner.name, "top1_agreement": float(np.mean(want.argmax(1) == got.argmax(1))),
                       "logit_cosine": float(cos.mean()), "logit_cosine_min": float(cos.min())})
        if feeds.labels is not None:
            result["reference_top1"] = float(np.mean(want.argmax(1) == feeds.labels))
    if feeds.labels is not None:
        result["top1"] = float(np.mean(got.argmax(1) == feeds.labels))
    return result
