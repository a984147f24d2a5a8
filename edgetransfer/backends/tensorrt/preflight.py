"""Will this ONNX model build as a TensorRT engine for this target? Answered without TensorRT.

Engines are built on the device, so a model that cannot build is otherwise discovered on the factory
floor. The preflight reads the ONNX file against the operator table of the target's TensorRT major
version and against what TensorRT's explicit quantization accepts:

- operators: every (domain, op type) with its count and whether the parser imports it;
- opset: within the parser's range (TensorRT 8.5 stops at 17, so a default opset-18 export is refused
  with the command that re-exports it);
- shapes: one 4-D float input whose only free dimension is the batch, and a batch range the model and
  the target agree on (DLA needs a static one);
- INT8: Q/DQ types and zero points TensorRT runs (signed INT8, zero point 0, constant scales,
  per-tensor activations), and every DequantizeLinear whose consumer TensorRT will not fuse — that
  layer runs in float and the Q/DQ pair only costs a reformat; layers left in float are listed.

Errors mean the build fails (exit 1); warnings mean it builds but runs less INT8 than the QDQ model says.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...errors import IntegrityError
from ...fsutil import sha256_file
from .ops import OperatorTable, operator_table

Level = Literal["error", "warning", "info"]

#: layers that only move or view data: a DQ passes through them to the layer that computes
_VIEW_OPS = frozenset({"Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
#: layers whose weights are quantized per output channel on axis 0 (ConvTranspose: axis 1)
_WEIGHTED = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}
_EXAMPLES = 3


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str                      # operators | opset | shapes | int8 | dla | model
    message: str
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OperatorRow:
    op: str
    domain: str
    count: int
    status: str                     # supported | unsupported | unknown
    note: str = ""


@dataclass
class PreflightReport:
    target: str
    tensorrt: str
    model: str
    model_sha256: str
    opset: int | None
    operators: list[OperatorRow]
    findings: list[Finding]
    int8: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "tensorrt": self.tensorrt, "model": self.model,
                "model_sha256": self.model_sha256, "opset": self.opset, "passed": self.passed,
                "operators": [asdict(r) for r in self.operators],
                "findings": [{**asdict(f), "nodes": list(f.nodes)} for f in self.findings], "int8": self.int8}

    def to_markdown(self) -> str:
        verdict = "builds" if self.passed else "**cannot build**"
        lines = [f"# TensorRT preflight: {self.target}", "",
                 f"`{self.model}` (opset {self.opset}) against TensorRT {self.tensorrt}: {verdict}.", ""]
        if self.int8:
            lines += [f"INT8: {self.int8['int8_layers']} of {self.int8['weighted_layers']} weighted layers run INT8; "
                      f"in float: {', '.join(self.int8['float_layers']) or 'none'}.", ""]
        lines += ["| level | check | finding | nodes |", "|---|---|---|---|"]
        for f in self.findings or [Finding("info", "-", "nothing to report")]:
            lines.append(f"| {f.level} | {f.check} | {f.message} | {', '.join(f.nodes[:_EXAMPLES])}"
                         f"{' …' if len(f.nodes) > _EXAMPLES else ''} |")
        lines += ["", "| operator | count | TensorRT | restriction |", "|---|---:|---|---|"]
        for r in self.operators:
            name = r.op if r.domain in ("", "ai.onnx") else f"{r.domain}::{r.op}"
            lines.append(f"| {name} | {r.count} | {r.status} | {r.note} |")
        return "\n".join(lines) + "\n"


def preflight(onnx_path: Path, target: Any) -> PreflightReport:
    """Check `onnx_path` against `target`'s TensorRT version, batch range and DLA setting."""
    import onnx

    spec = target.tensorrt
    table = operator_table(spec.major)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise IntegrityError(f"not a readable ONNX model ({exc})", path=onnx_path) from exc
    findings: list[Finding] = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        findings.append(Finding("error", "model", f"the ONNX checker rejects the model: {str(exc).splitlines()[0]}"))
    opset = _opset(model)
    findings += _check_opset(opset, table, spec.tensorrt)
    operators, op_findings = _check_operators(model, table, spec.tensorrt)
    findings += op_findings
    findings += _check_shapes(model, target)
    int8: dict[str, Any] = {}
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        q_findings, int8 = _check_int8(model, table)
        findings += q_findings
    elif target.precision == "int8":
        findings.append(Finding("warning", "int8", "no Q/DQ nodes: this is the fp32 model; run `edgetransfer "
                                "quantize` first, then check again for the INT8 checks"))
    findings.sort(key=lambda f: ("error", "warning", "info").index(f.level))
    return PreflightReport(target=target.name, tensorrt=spec.tensorrt, model=Path(onnx_path).name,
                           model_sha256=sha256_file(onnx_path), opset=opset, operators=operators,
                           findings=findings, int8=int8)


def _opset(model: Any) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_opset(opset: int | None, table: OperatorTable, version: str) -> list[Finding]:
    if opset is None:
        return [Finding("error", "opset", "the model imports no default-domain opset")]
    if opset > table.opset.max:
        return [Finding("error", "opset", f"opset {opset} is newer than TensorRT {version}'s parser reads "
                        f"({table.opset.min}–{table.opset.max}); re-export with "
                        f"`edgetransfer export RUN --opset {table.opset.max}`")]
    if opset < table.opset.min:
        return [Finding("error", "opset", f"opset {opset} is older than TensorRT {version}'s parser reads "
                        f"({table.opset.min}–{table.opset.max}); re-export with a newer --opset")]
    return []


def _check_operators(model: Any, table: OperatorTable, version: str) -> tuple[list[OperatorRow], list[Finding]]:
    counts = Counter((n.domain or "", n.op_type) for n in model.graph.node)
    nodes = defaultdict(list)
    for n in model.graph.node:
        nodes[(n.domain or "", n.op_type)].append(n.name or n.op_type)
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    rows, findings = [], []
    for (domain, op), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][1])):
        if domain not in ("", "ai.onnx"):
            rows.append(OperatorRow(op, domain, count, "unsupported", "custom domain: needs a TensorRT plugin"))
            findings.append(Finding("error", "operators", f"{domain}::{op} is not an ONNX operator; TensorRT "
                                    "needs a plugin for it", tuple(nodes[(domain, op)])))
            continue
        status = table.status(op)
        rows.append(OperatorRow(op, domain, count, status, table.supported.get(op) or ""))
        if status == "unsupported":
            findings.append(Finding("error", "operators", f"{op} is not supported by TensorRT {version}'s ONNX parser",
                                    tuple(nodes[(domain, op)])))
        elif status == "unknown":
            findings.append(Finding("warning", "operators", f"{op} is not in the TensorRT {table.tensorrt_major} "
                                    f"operator table ({table.reference}); check your release's support list",
                                    tuple(nodes[(domain, op)])))
        elif "axes must" in (table.supported.get(op) or ""):
            dynamic = [n.name or op for n in model.graph.node if n.op_type == op and _dynamic_axes(n, constants)]
            if dynamic:
                findings.append(Finding("error", "operators", f"{op}: {table.supported[op]}, here it is computed "
                                        "at run time", tuple(dynamic)))
    return rows, findings


def _dynamic_axes(node: Any, constants: set[str]) -> bool:
    """Whether the node's `axes` input (Slice: 4th, others: 2nd) exists and is not a constant."""
    index = 3 if node.op_type == "Slice" else 1
    return len(node.input) > index and bool(node.input[index]) and node.input[index] not in constants


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _check_shapes(model: Any, target: Any) -> list[Finding]:
    from onnx import TensorProto

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return [Finding("error", "shapes", f"{len(inputs)} inputs; edgetransfer builds single-input image models",
                        tuple(i.name for i in inputs))]
    [inp] = inputs
    out: list[Finding] = []
    elem = inp.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        out.append(Finding("error", "shapes", f"input {inp.name!r} is {TensorProto.DataType.Name(elem)}; "
                           "expected float32 NCHW", (inp.name,)))
    dims = _dims(inp)
    if len(dims) != 4:
        return out + [Finding("error", "shapes", f"input {inp.name!r} has shape {dims}; expected N×C×H×W", (inp.name,))]
    free = [f"{axis}={d}" for axis, d in zip("CHW", dims[1:]) if not isinstance(d, int) or d <= 0]
    if free:
        out.append(Finding("error", "shapes", f"input {inp.name!r} has dynamic {', '.join(free)}: the optimisation "
                           "profile varies only the batch; export at a fixed image size", (inp.name,)))
    batch = target.batch
    if isinstance(dims[0], int) and dims[0] > 0 and not batch.min == batch.max == dims[0]:
        out.append(Finding("error", "shapes", f"input {inp.name!r} has a fixed batch of {dims[0]} but the target "
                           f"asks for {batch.min}–{batch.max}; re-export with a dynamic batch (`edgetransfer export`)",
                           (inp.name,)))
    if target.tensorrt.use_dla and batch.min != batch.max:
        out.append(Finding("error", "dla", f"DLA engines take a static batch; the target's batch range is "
                           f"{batch.min}–{batch.max}: set batch min = opt = max"))
    return out


def _check_int8(model: Any, table: OperatorTable) -> tuple[list[Finding], dict[str, Any]]:
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    allowed = {getattr(TensorProto, t.upper()) for t in table.quantized_types}
    issues: dict[tuple[Level, str], list[str]] = defaultdict(list)

    def constant(name: str) -> bool:
        return name in inits or (name in producer and producer[name].op_type == "Constant")

    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = n.name or n.output[0]
        scale = inits.get(n.input[1])
        zero = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            issues[("error", "scales must be constants (initializers) for TensorRT")].append(label)
        qtype = zero.data_type if zero is not None else TensorProto.UINT8  # ONNX default without a zero point
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            qtype = inits[n.input[0]].data_type
        if qtype not in allowed:
            name = TensorProto.DataType.Name(qtype)
            hint = {"UINT8": "quantize with `activations: symmetric` (signed INT8)",
                    "INT32": "quantized biases: set `quantization.bias: float` in the target profile"}.get(name, "")
            issues[("error", f"{name} Q/DQ: TensorRT {table.tensorrt_major} quantizes to "
                    f"{'/'.join(t.upper() for t in table.quantized_types)} only" + (f"; {hint}" if hint else ""))
                   ].append(label)
        if zero is not None and numpy_helper.to_array(zero).any():
            issues[("error", "non-zero zero point: TensorRT quantization is symmetric "
                    "(`activations: symmetric` in the target profile)")].append(label)
        if scale is not None and not constant(n.input[0]) and numpy_helper.to_array(scale).size > 1:
            issues[("error", "per-channel scales on an activation: TensorRT quantizes activations "
                    "per tensor")].append(label)

    layers = {"int8": [], "float": [], "partial": []}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and not constant(n.input[0]):
            for consumer in _compute_consumers(n.output[0], consumers):
                if consumer.op_type not in table.int8_layers:
                    issues[("warning", f"DequantizeLinear feeds {consumer.op_type}, which TensorRT does not fuse "
                            "with it: that layer runs in float and the Q/DQ pair only adds a reformat")
                           ].append(consumer.name or consumer.op_type)
        if n.op_type in _WEIGHTED:
            quantized = [_from_dq(i, producer) for i in n.input[:2]]
            kind = "int8" if all(quantized) else ("partial" if any(quantized) else "float")
            layers[kind].append(n.name or n.op_type)
            axis = _WEIGHTED[n.op_type]
            dq = producer.get(n.input[1]) if len(n.input) > 1 else None
            if axis is not None and dq is not None and dq.op_type == "DequantizeLinear":
                got = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                scale = inits.get(dq.input[1])
                if scale is not None and numpy_helper.to_array(scale).size > 1 and got != axis:
                    issues[("error", f"{n.op_type} weights quantized per channel on axis {got}; TensorRT "
                            f"needs axis {axis} (the output channels)")].append(n.name or n.op_type)
    for name in layers["partial"]:
        issues[("warning", "only one of data and weights is quantized: TensorRT runs this layer in float")].append(name)
    findings = [Finding(level, "int8", f"{message} ({len(set(nodes))}×)", tuple(dict.fromkeys(nodes)))
                for (level, message), nodes in issues.items()]
    if layers["float"]:
        findings.append(Finding("info", "int8", f"{len(layers['float'])} weighted layer(s) left in float by the "
                                "quantizer (the accuracy budget's fallback or its exclusions)", tuple(layers["float"])))
    int8 = {"weighted_layers": sum(len(v) for v in layers.values()), "int8_layers": len(layers["int8"]),
            "float_layers": layers["float"] + layers["partial"],
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node)}
    return findings, int8


def _compute_consumers(tensor: str, consumers: dict[str, list[Any]]) -> list[Any]:
    """The layers that compute on `tensor`, looking through view-only layers."""
    out, stack, seen = [], [tensor], set()
    while stack:
        t = stack.pop()
        for n in consumers.get(t, []):
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type in _VIEW_OPS:
                stack.extend(n.output[:1])
            else:
                out.append(n)
    return out


def _from_dq(tensor: str, producer: dict[str, Any]) -> bool:
    """Whether `tensor` comes from a DequantizeLinear, looking back through view-only layers."""
    node = producer.get(tensor)
    while node is not None and node.op_type in _VIEW_OPS:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"
