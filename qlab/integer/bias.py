"""The int32 bias grid: the one place a float bias is rounded to what an integer kernel adds.

Integer kernels (the integer model, ONNX Runtime's QLinearConv, oneDNN) add an int32 bias to the
int32 accumulator, whose unit is s_in * s_w; fbgemm and a q/dq graph add the float bias. On that
grid, with po2 scales, both add the same number. The eager flow (integer/export.snap_biases),
the PT2E flow (quant/flows/pt2e.snap_graph_biases) and the QDQ ONNX rewrite
(quant/onnx_qdq.int32_biases) all round here, and the integer exporter writes the int32 codes it
gives.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bias_grid(bias: Tensor, scale_in: Tensor | float, scale_w: Tensor | float) -> tuple[Tensor, Tensor]:
    """(codes, step) of `bias` on its accumulator grid, both float64 and shaped like `bias`:
    step = scale_in * scale_w (one scale, or one per output channel), codes = round(bias / step)
    with ties to even, as every engine rounds. codes * step is the bias on the grid."""
    step = torch.as_tensor(scale_in, dtype=torch.float64) * torch.as_tensor(scale_w, dtype=torch.float64)
    step = torch.broadcast_to(step, bias.shape)
    return torch.round(bias.detach().double() / step), step
