"""qgraph: compiler-pass quantization on one ONNX graph.

    import qgraph
    captured = qgraph.load()                       # embedded SmolLM2-135M (or a path / nn.Module)
    compiled = qgraph.compile(captured, recipe="w8a8")
    compiled.save("out/w8a8")
    qgraph.evaluate("out/w8a8")["ppl"]
"""

from qgraph.api import CalibConfig, CompiledModel, Runner, bench, compile, compile_streaming, evaluate, load, open_runner
from qgraph.errors import QGraphError
from qgraph.generate import generate
from qgraph.ir.qspec import QuantSpec
from qgraph.recipes import Recipe, load_recipe

__all__ = [
    "CalibConfig", "CompiledModel", "QGraphError", "QuantSpec", "Recipe", "Runner",
    "bench", "compile", "compile_streaming", "evaluate", "generate", "load", "load_recipe", "open_runner",
]
