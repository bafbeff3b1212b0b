"""Per-layer SQNR: where did accuracy go? Float vs quantized output of every quantized linear.

Layers are matched by their stable node names (the torch module path given at capture), and
the quantized graph runs as users run it (ORT's fused kernels), so each layer's number
includes the error carried in from the layers before it, like a numeric debugger's trace.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.tensors import TensorFeeds


def _layer_outputs(model: ir.Model, layers: list[str]) -> dict[str, str]:
    """Layer name -> name of the value its node writes."""
    by_node = {node.name: node.outputs[0].name for node in model.graph}
    return {name: by_node[name] for name in layers if name in by_node}


def layer_sqnr(float_model: ir.Model, quant_model: ir.Model, layers: list[str], windows: TokenWindows | TensorFeeds,
               *, max_windows: int = 2) -> dict[str, float]:
    """SQNR in dB, 10 log10(sum y^2 / sum (y - y_q)^2), of each named layer's output."""
    from qgraph.backends.onnx_qdq import session_with_outputs

    f_out = _layer_outputs(float_model, layers)
    q_out = _layer_outputs(quant_model, layers)
    names = [n for n in layers if n in f_out and n in q_out]
    if not names:
        return {}
    f_sess = session_with_outputs(float_model, [f_out[n] for n in names], threads=2, optimize=False)
    q_sess = session_with_outputs(quant_model, [q_out[n] for n in names], threads=2, optimize=True)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feeds in itertools.islice(windows.feeds(f_sess.get_inputs()), max_windows):
        ys = f_sess.run([f_out[n] for n in names], feeds)
        yq = q_sess.run([q_out[n] for n in names], feeds)
        for n, y, q in zip(names, ys, yq, strict=True):
            if y.shape != q.shape:  # widened by split_channels: no channel-for-channel match
                signal[n] = noise[n] = float("nan")
                continue
            y64 = y.astype(np.float64)
            signal[n] += float(np.square(y64).sum())
            noise[n] += float(np.square(y64 - q).sum())
    # A layer whose float output is all zero (a zeroed weight, a dead input) has no signal to lose: no SQNR.
    return {n: (10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else float("inf"))
            for n in names if not math.isnan(noise[n]) and signal[n] > 0}


def write_report_md(path, report: dict, sqnr: dict[str, float], plot_name: str | None) -> None:
    """report.md: the recipe, the passes and the per-layer SQNR, worst layers first."""
    lines = [f"# qgraph compile report: {report.get('recipe')}", "", "## Passes", "",
             "| pass | modified | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {p['pass']} | {p['modified']} | {p['seconds']} |" for p in report.get("passes", [])]
    if sqnr:
        worst = sorted(sqnr.items(), key=lambda kv: kv[1])
        lines += ["", "## Per-layer SQNR (float vs quantized output, dB; higher is better)", ""]
        if plot_name:
            lines += [f"![SQNR per layer]({plot_name})", ""]
        lines += ["Worst layers:", "", "| layer | SQNR dB |", "| --- | ---: |"]
        lines += [f"| {n} | {v:.1f} |" for n, v in worst[:15]]
        lines += ["", f"Median over {len(sqnr)} layers: {float(np.median(list(sqnr.values()))):.1f} dB"]
    path.write_text("\n".join(lines) + "\n")


def plot_sqnr(path, sqnr: dict[str, float], title: str) -> None:
    """A PNG of SQNR per layer in graph order, one colour per layer kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sqnr)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    palette = {k: plt.cm.tab10(i % 10) for i, k in enumerate(dict.fromkeys(kinds))}
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.05), 4), dpi=110)
    ax.bar(range(len(names)), [sqnr[n] for n in names], color=[palette[k] for k in kinds], width=1.0)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, list(palette), ncol=min(7, len(palette)), fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
