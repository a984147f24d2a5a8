"""What the shared stages need to know about an anomaly scorer: the metric its INT8 search is judged
by, and the part of its graph that stays fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..quantize import Metric
from .metrics import NORMALISED_THRESHOLD, auroc


def _same_decision(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return (reference >= NORMALISED_THRESHOLD) == (candidate >= NORMALISED_THRESHOLD)


def score_metric(anomalous: np.ndarray) -> Metric:
    """AUROC on the validation images and the same decision as fp32 (the side of the threshold).

    Without defective validation images AUROC is undefined: the score is then a constant, the drop
    budget judges nothing (the metric's name says so) and the decision agreement does the work."""
    if anomalous.all() or not anomalous.any():
        return Metric("auroc (undefined: val holds one kind of part only)", lambda s, y: 1.0, _same_decision)
    return Metric("auroc", lambda s, y: auroc(s, y.astype(bool)), _same_decision)


def float_nodes(onnx_path: Path) -> list[str]:
    """Everything after the backbone: every node no backbone convolution needs. That is the patch
    head (border cut, neighbourhood averaging, concatenation, centring), the distances to the bank,
    the minimum, the map and the score. ‖p‖² − 2·p·Bᵀ + ‖b‖² subtracts large numbers: in INT8 the
    nearest-patch distance, which is the whole signal, would be rounded away; re-rounding the
    averaged and centred features adds noise right where a score sits near its threshold (and NNCF
    cannot place a quantizer on a graph output at all). The backbone's convolutions are INT8."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}

    def ancestors(roots: list[onnx.NodeProto]) -> set[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(producer[i] for i in node.input if i in producer)
        return seen

    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    backbone_convs = [n for n in graph.node if n.op_type == "Conv" and n.name in ancestors(matmuls)]
    needed = ancestors(backbone_convs)
    return [n.name for n in graph.node if n.name not in needed]


__all__ = ["float_nodes", "score_metric"]
