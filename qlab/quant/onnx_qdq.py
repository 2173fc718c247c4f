"""ONNX QDQ graphs from a PT2E INT8 program, made what ONNX Runtime runs as integer kernels.

The exporter writes each quantized convolution as DequantizeLinear(x), DequantizeLinear(w) ->
Conv(.., float bias). ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv only when every
input of the Conv comes from a DequantizeLinear, the bias as int32 with scale s_x * s_w and zero
point 0; a float bias keeps the convolution in float between the q/dq pairs. The biases of a
qlab INT8 model already lie on that grid (snapped at convert), so writing them as int32 is exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qlab.errors import QlabError
from qlab.integer.bias import bias_grid

_LAYERS = ("Conv", "Gemm")


def int32_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model with every float bias of a Conv/Gemm whose input and weight are dequantized
    written as DequantizeLinear(int32 bias, s_x * s_w, 0). Returns the model and how many
    biases changed. Refuses a bias that is not on its grid (the model was not snapped)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1

    def dq_scale(name: str) -> np.ndarray | None:
        node = made_by.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)

    changed = 0
    new_nodes = []
    for node in graph.node:
        if node.op_type in _LAYERS and len(node.input) == 3 and node.input[2] in inits:
            s_x, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
            bias_name = node.input[2]
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
            if s_x is not None and s_w is not None and bias.dtype.kind == "f" \
                    and s_x.size == 1 and users[bias_name] == 1:
                q, step = (t.numpy() for t in bias_grid(*map(torch.from_numpy, (bias, s_x, s_w))))
                if not np.array_equal(q * step, bias):
                    raise QlabError(f"{node.name or node.op_type}: bias {bias_name} is not on its "
                                    f"int32 grid s_x * s_w; convert with qlab (it snaps biases).")
                if np.abs(q).max(initial=0) >= 2**31:
                    raise QlabError(f"{bias_name}: bias does not fit int32 at scale s_x * s_w.")
                stem = f"{bias_name}_int32"
                graph.initializer.remove(inits[bias_name])
                graph.initializer.extend([
                    numpy_helper.from_array(q.astype(np.int32).reshape(-1), stem),
                    numpy_helper.from_array(step.astype(np.float32).reshape(-1), f"{stem}_scale"),
                    numpy_helper.from_array(np.zeros(step.size, np.int32), f"{stem}_zero_point")])
                dq = helper.make_node("DequantizeLinear",
                                      [stem, f"{stem}_scale", f"{stem}_zero_point"],
                                      [f"{stem}_dequantized"], name=f"{stem}_dq", axis=0)
                new_nodes.append(dq)
                node.input[2] = f"{stem}_dequantized"
                changed += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    return model, changed
