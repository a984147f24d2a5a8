"""QDQ graph edits that make one explicit-QDQ file mean the same to every runtime, and let the search
keep chosen layers in fp32.

"Keep layer L in fp32" means the same thing whichever tool quantized: L's weights are fp32 and L
reads fp32 activations. Tools disagree on the second half (ONNX Runtime leaves the Q/DQ pair that
the *producer* of L's input asked for, so excluding L alone would not remove the rounding of its
input), so `keep_fp32` rewires L's inputs past their Q→DQ pairs after the tool has run. The other
edits: float biases onto their accumulator grid (`snap_biases`) and unsigned zero-point-0 activations
re-expressed as signed INT8 (`signed_activations`, for TensorRT).

Pure graph surgery on `onnx.ModelProto`: no quantizer, no runtime, no measurement.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

#: quantizable compute nodes: the "layers" that the accuracy budget may keep in fp32
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: ops whose output carries its input's quantization grid unchanged (data movement, max, clamps):
#: an fp32 twin of one of them fed by fp32 tensors removes rounding that a Q→DQ pair put *before* it
TRANSPARENT_OPS = frozenset({"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                             "Identity", "Concat", "Split", "Slice", "Gather", "Pad"})


def quantized_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op_type) of compute nodes that read at least one dequantized tensor, in graph order."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type in COMPUTE_OPS and n.name and any(i in dq_outputs for i in n.input)]


def keep_fp32(model: onnx.ModelProto, layers: Collection[str], reference: onnx.ModelProto) -> None:
    """Make each named layer read fp32 tensors, in place.

    An input that arrives through QuantizeLinear → DequantizeLinear is rewired to the tensor before
    the pair. Where that tensor comes out of a quantization-transparent op (Relu, MaxPool, Reshape...)
    that itself read a Q→DQ pair, an fp32 twin of the op is added, so the rounding done upstream of it
    is bypassed too. Where a quantizer removed an activation and let a Q's clamp stand in for it
    (ONNX Runtime folds Relu/Clip that way), the activation is restored from `reference`, the fp32
    model. Pairs left without a consumer are pruned.
    """
    import onnx

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    ref_producer = {o: n for n in reference.graph.node for o in n.output}
    twins: dict[str, str] = {}
    added: list[onnx.NodeProto] = []

    def clone(node: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{node.name}_fp32" if node.name else ""
        del twin.input[:]
        twin.input.extend(inputs)
        del twin.output[:]
        twin.output.extend(f"{o}_fp32" if o else "" for o in node.output)
        added.append(twin)
        twins.update({o: t for o, t in zip(node.output, twin.output) if o})
        return twin

    def fp32(name: str) -> str:
        if not name or name in twins:
            return twins.get(name, name)
        node = producer.get(name)
        result = name
        if node is not None and node.op_type == "DequantizeLinear":
            source = producer.get(node.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                result = fp32(source.input[0])
        elif node is not None and node.op_type in TRANSPARENT_OPS:
            inputs = [fp32(i) for i in node.input]
            if inputs != list(node.input):
                clone(node, inputs)
                result = twins[name]
        elif node is not None and name in ref_producer and ref_producer[name].op_type != node.op_type \
                and ref_producer[name].op_type in TRANSPARENT_OPS:
            activation = ref_producer[name]
            for extra in activation.input[1:]:
                _copy_constant(model, reference, extra)
            result = clone(activation, [name, *activation.input[1:]]).output[0]
        twins[name] = result
        return result

    wanted = set(layers)
    for node in list(graph.node):
        if node.name in wanted:
            rewired = [fp32(i) for i in node.input]
            del node.input[:]
            node.input.extend(rewired)
    graph.node.extend(added)
    toposort(graph)
    prune(graph)


def snap_biases(model: onnx.ModelProto) -> None:
    """Round every float bias of a quantized Conv/Gemm to its integer accumulator grid (s_x · s_w).

    Why: a float bias is one number to an emulating runtime and another to an integer kernel.
    ONNX Runtime's fused QLinearConv rounds it to int32 in units of s_x · s_w; the same file run op
    by op (ONNX Runtime without graph optimizations) or by OpenVINO keeps it exact. The difference is
    a fraction of an output step, enough to move ~1 % of the values next to a rounding midpoint to
    the other side at every layer: on the demo's EfficientNet-Lite0 (NNCF, float biases) ONNX
    Runtime disagreed with itself across optimization levels on the same file (min logit cosine
    0.983). On the grid the bias means the same to every runtime (0.9997); it moves by at most half
    a step of s_x · s_w, far below the quantization error itself. Biases already int32 (ONNX
    Runtime's quantizer with `bias: int32`) and layers on float inputs are left alone.
    """
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def dq_scale(tensor: str) -> np.ndarray | None:
        node = producer.get(tensor)
        # through ops that move or select grid values without making new ones (a MaxPool between the
        # DequantizeLinear and the layer keeps its input on that grid; a Clip bound need not be on it)
        while node is not None and node.op_type in TRANSPARENT_OPS - {"Clip", "Concat"}:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)

    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        s_x, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
        bias = numpy_helper.to_array(inits[node.input[2]])
        if s_x is None or s_w is None or bias.dtype != np.float32:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        # a per-channel input scale maps onto output channels only in a depthwise convolution
        if s_x.size > 1 and not (node.op_type == "Conv" and groups == bias.size == s_x.size):
            continue
        if s_w.size not in (1, bias.size):
            continue
        step = s_x * s_w
        if not np.all(step > 0):
            continue
        snapped = (np.rint(bias.astype(np.float64) / step) * step).astype(np.float32)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(snapped, node.input[2]))


def _copy_constant(model: onnx.ModelProto, reference: onnx.ModelProto, name: str) -> None:
    """Make constant `name` of the fp32 model (an initializer or a Constant node's output) exist in `model`."""
    graph = model.graph
    if not name or name in {i.name for i in graph.initializer} or any(name in n.output for n in graph.node):
        return
    for init in reference.graph.initializer:
        if init.name == name:
            graph.initializer.append(init)
            return
    for node in reference.graph.node:
        if node.op_type == "Constant" and name in node.output:
            graph.node.append(node)
            return


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its producers, keeping the existing order where it is free."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[name] for name in n.input if name in producer} for n in nodes]
    consumers: dict[int, list[int]] = {}
    for i, producers in enumerate(needs):
        for p in producers:
            consumers.setdefault(p, []).append(i)
    waiting = [len(p) for p in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for c in consumers.get(i, []):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    del graph.node[:]
    graph.node.extend(order)


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | {i for n in graph.node for i in n.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def signed_activations(model: onnx.ModelProto) -> None:
    """Re-express unsigned zero-point-0 quantizers as signed INT8, zero point 0, covering the same range.

    NNCF's symmetric preset quantizes non-negative tensors (after Relu) as UINT8 with zero point 0,
    but TensorRT — the reason for a symmetric scheme — runs only signed INT8 Q/DQ. The range
    [0, 255·s] becomes [-128·s', 127·s'] with s' = 255·s / 127: one bit of resolution is spent,
    exactly as ONNX Runtime's symmetric QInt8 activations spend it.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    converted: dict[tuple[str, str], tuple[str, str]] = {}
    requantized: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zero is None or zero.data_type != TensorProto.UINT8 or numpy_helper.to_array(zero).any():
            continue
        key = (scale.name, zero.name)
        if key not in converted:
            s = numpy_helper.to_array(scale).astype(np.float32) * np.float32(255.0 / 127.0)
            z = np.zeros(numpy_helper.to_array(zero).shape, dtype=np.int8)
            names = (f"{scale.name}_int8", f"{zero.name}_int8")
            model.graph.initializer.extend([numpy_helper.from_array(s, names[0]), numpy_helper.from_array(z, names[1])])
            converted[key] = names
        node.input[1], node.input[2] = converted[key]
        if node.op_type == "QuantizeLinear":
            requantized.add(node.output[0])
    for info in model.graph.value_info:  # NNCF records the UINT8 type of each Q output
        if info.name in requantized:
            info.type.tensor_type.elem_type = TensorProto.INT8
    prune(model.graph)


__all__ = ["COMPUTE_OPS", "TRANSPARENT_OPS", "keep_fp32", "prune", "quantized_layers", "signed_activations",
           "snap_biases", "toposort"]
