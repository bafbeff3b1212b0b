"""Record calibrated [min, max] ranges on every statically quantized activation."""

from __future__ import annotations

import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import ChannelStats, collect_stats
from qgraph.ir.qspec import annotation_of, range_of, set_range
from qgraph.ir.rewrite import values_by_name


class CalibrateRangesPass(ir.passes.InPlacePass):
    """Run the float graph on calibration windows; store each static activation's min/max.

    Values whose range an earlier pass already fixed (QSM sets [-qmax, qmax]) keep it.
    """

    def __init__(self, windows: TokenWindows, *, progress: bool = True):
        super().__init__()
        self.windows = windows
        self.progress = progress
        self.stats: dict[str, ChannelStats] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = {}
        produced = values_by_name(model.graph)
        for node in model.graph:
            note = annotation_of(node)
            if note is not None and note.activation is not None and note.activation.static:
                for value in (node.inputs[0], produced.get(note.output) if note.output else None):
                    if value is not None and range_of(value) is None:
                        values[value.name] = value
        if not values:
            return ir.passes.PassResult(model, modified=False)
        self.stats = collect_stats(model, list(values), self.windows, progress=self.progress)
        for name, value in values.items():
            s = self.stats[name]
            set_range(value, s.tensor_min, s.tensor_max)
        return ir.passes.PassResult(model, modified=True)

    def summary(self) -> dict:
        return {"values": len(self.stats), "windows": self.windows.count, "ctx": self.windows.ctx}
