"""flat: FlatQuant-style learned affine transforms, one per linear input, P = P1 (x) P2.

For every activation that block linears read (q/k/v share their norm's output, gate/up theirs,
o_proj and down_proj read their own), y = x P is inserted online as two small MatMuls on the
Kronecker factors (Reshape/MatMul/Transpose, as rotate's online Hadamard) and every linear reading
x takes P^-1 W: the float function is unchanged up to P's conditioning. P1 and P2 start from the
Hadamard factors of the size (a rotation, as QuaRot would apply) and are then trained, per input,
by a short Adam run on calibration samples that minimises |x W - Q_a(x P) Q_w(P^-1 W)|^2 / |x W|^2
with the recipe's activation and weight rounding (straight-through gradients). Training is torch
on CPU; nothing is learned end to end, so each input costs `steps` small steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.calib.fake_quant import round_activation_torch, round_weight_torch
from qgraph.calib.stats import collect_stats
from qgraph.ir.hadamard import hadamard, random_orthogonal
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import LinearLayer, find_linears, weight_array
from qgraph.ir.rewrite import set_linear_weight
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.progress import track


@dataclasses.dataclass(frozen=True)
class FlatOptions:
    """The learned per-input Kronecker transforms."""

    steps: int = option(40, "Adam steps per transformed input (0: keep the Hadamard start)", ge=0)
    lr: float = option(2e-3, "Adam learning rate on the Kronecker factors", gt=0)
    sample_tokens: int = option(256, "calibration tokens per input the loss is measured on", ge=1)
    seed: int = option(0, "seed of the random orthogonal start for factor sizes with no known Hadamard", ge=0)
    step_gradient: bool = option(False, "let the gradient reach the activation step through max|x| (LSQ's form), "
                                        "so narrowing a token's range is rewarded; off: the step is a constant")


def kron_sizes(size: int) -> tuple[int, int]:
    """(a, b) with a * b = size, a <= b and a as close to sqrt(size) as possible."""
    a = int(np.sqrt(size))
    while size % a:
        a -= 1
    return a, size // a


def _start(size: int, seed: int) -> np.ndarray:
    try:
        return hadamard(size)
    except ValueError:
        return random_orthogonal(size, seed)


def train_transform(x: np.ndarray, w: np.ndarray, a0: np.ndarray, b0: np.ndarray, activation: QuantSpec | None,
                    weight: QuantSpec | None, steps: int, lr: float,
                    step_gradient: bool = False) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Kronecker factors (A, B) minimising the quantized output error of x [n, C] @ w [C, N]; errors before and after."""
    import torch

    torch.manual_seed(0)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    a = torch.nn.Parameter(torch.from_numpy(a0.astype(np.float32)))
    b = torch.nn.Parameter(torch.from_numpy(b0.astype(np.float32)))
    n, c = xt.shape
    ma, mb = a.shape[0], b.shape[0]
    ref = xt @ wt
    scale = ref.pow(2).mean()

    def loss_fn():
        xp = torch.einsum("nij,ik,jl->nkl", xt.reshape(n, ma, mb), a, b).reshape(n, c)  # x (A (x) B)
        wp = torch.einsum("ki,lj,ijo->klo", torch.linalg.inv(a), torch.linalg.inv(b),
                          wt.reshape(ma, mb, -1)).reshape(c, -1)  # (A (x) B)^-1 W
        out = round_activation_torch(xp, activation, step_gradient) @ round_weight_torch(wp, weight)
        return (out - ref).pow(2).mean() / scale

    opt = torch.optim.Adam([a, b], lr=lr)
    first, best, best_ab = None, np.inf, (a0, b0)
    for step in range(steps + 1):  # each step's loss scores the factors it started from: the best ones are kept
        opt.zero_grad()
        loss = loss_fn()
        now = float(loss.detach())
        first = now if first is None else first
        if now < best and np.isfinite(now):
            best, best_ab = now, (a.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64))
        if step < steps:
            loss.backward()
            opt.step()
    return best_ab[0], best_ab[1], float(np.sqrt(first)), float(np.sqrt(best))


class FlatTransformPass(ir.passes.InPlacePass):
    """x -> x (P1 (x) P2) before each group of block linears, P^-1 into their weights; P trained per input."""

    function_preserving = True

    def __init__(self, windows, options: FlatOptions = FlatOptions(), *, weight_spec=None, activation_spec=None,
                 progress: bool = True):
        super().__init__()
        self.windows, self.options, self.progress = windows, options, progress
        self.weight_spec, self.activation_spec = weight_spec, activation_spec
        self.inputs: list[dict] = []
        self.refused: list[dict] = []
        self.reason = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.passes.rotate import kron_transform

        groups: dict[int, list[LinearLayer]] = {}
        for layer in find_linears(model):
            if layer.role != "block":
                continue
            x = layer.node.inputs[0]
            if x.producer() is None:
                self.refused.append({"candidate": layer.name, "reason": f"its input {x.name} is a graph input"})
                continue
            groups.setdefault(id(x), []).append(layer)
        if not groups:
            self.reason = "no block linear reads a computed activation"
            return ir.passes.PassResult(model, modified=False)
        names = [g[0].node.inputs[0].name for g in groups.values()]
        o = self.options
        stats = collect_stats(model, names, self.windows, progress=self.progress, sample_tokens=o.sample_tokens)
        graph = model.graph
        for layers in track(list(groups.values()), "learning transforms", enabled=self.progress):
            x = layers[0].node.inputs[0]
            size = layers[0].in_features
            ma, mb = kron_sizes(size)
            w = np.concatenate([weight_array(layer) for layer in layers], axis=1)
            a, b, before, after = train_transform(stats[x.name].sample_rows, w, _start(ma, o.seed), _start(mb, o.seed),
                                                  self.activation_spec, self.weight_spec, o.steps, o.lr, o.step_gradient)
            inv = np.kron(np.linalg.inv(a), np.linalg.inv(b))
            for layer in layers:
                set_linear_weight(graph, layer, inv @ weight_array(layer).astype(np.float64))
            name = f"flat.{layers[0].name}"
            y = kron_transform(graph, x, a, b, name, dense=ma == 1, shared=False)
            for layer in layers:
                layer.node.replace_input_with(0, y)
            self.inputs.append({"input": x.name, "linears": [layer.name for layer in layers], "factors": [ma, mb],
                                "error_start": round(before, 6), "error_trained": round(after, 6)})
        return ir.passes.PassResult(model, modified=True)

    def summary(self) -> dict:
        return {"inputs": self.inputs, "refused": self.refused, "reason": self.reason}


@register("flat", FlatOptions, help="FlatQuant: a learned Kronecker affine transform on every linear input")
def build(options: FlatOptions, ctx: PassContext) -> FlatTransformPass:
    """The transforms for a recipe, trained on its activation and weight rounding."""
    return FlatTransformPass(ctx.windows, options, weight_spec=ctx.weight_spec, activation_spec=ctx.activation_spec,
                             progress=ctx.progress)
