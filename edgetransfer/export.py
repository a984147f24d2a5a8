"""ONNX export: dynamic batch, a recent opset, a full checker pass, and the input spec inside the file.

The class list and input spec are written into the model's metadata so that an ONNX file separated
from its run folder still says how to feed it and how to read its outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fsutil import atomic_path
from .spec import ANOMALY_OUTPUTS, InputSpec, RunMeta

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 18
#: the oldest opset torch's exporter writes itself; older ones are converted from it (see _convert_opset)
NATIVE_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_PREFIX = "edgetransfer."


def onnx_metadata(meta: RunMeta) -> dict[str, str]:
    return {
        f"{META_PREFIX}schema_version": str(meta.schema_version),
        f"{META_PREFIX}classes": json.dumps(meta.classes),
        f"{META_PREFIX}input_spec": json.dumps(meta.input_spec.to_dict(), sort_keys=True),
        f"{META_PREFIX}backbone": meta.backbone,
        f"{META_PREFIX}weights": meta.weights,
        f"{META_PREFIX}mode": meta.mode,
        f"{META_PREFIX}data_hash": str(meta.data.get("hash", "")),
        f"{META_PREFIX}task": meta.task,
        **({f"{META_PREFIX}anomaly": json.dumps({"good": meta.anomaly.get("good"),
                                                  "threshold": meta.anomaly.get("threshold")}, sort_keys=True)}
           if meta.task == "anomaly" else {}),
    }


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def export_module(model: Any, spec: InputSpec, target: str | Path, *, opset: int = OPSET,
                  metadata: dict[str, str] | None = None, doc: str = "",
                  output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Path:
    """Export an eval-mode torch module taking (N, 3, H, W) to a single ONNX file, atomically.

    Uses torch's current exporter (torch.export based). The batch dimension stays dynamic; weights
    are stored inside the file (no external data) so the artifact is one self-contained file.
    """
    import onnx
    import torch

    target = Path(target)
    example = torch.randn(2, 3, spec.height, spec.width)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(target) as tmp:
        # the exporter narrates each phase on stdout; keep the CLI's output to our own summary
        with contextlib.redirect_stdout(io.StringIO()) as chatter, out_of_place(model):
            try:
                program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=list(output_names),
                                            opset_version=max(opset, NATIVE_OPSET), dynamo=True, external_data=False,
                                            dynamic_shapes=({0: batch},), verbose=False)
            except Exception as exc:
                raise UsageError(f"ONNX export of {type(model).__name__} failed: {exc}", path=target) from exc
        log.debug("exporter output:\n%s", chatter.getvalue())
        proto = _convert_opset(program.model_proto, opset, target)
        del proto.metadata_props[:]
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = doc
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(tmp))
    return target


@contextlib.contextmanager
def out_of_place(model: Any) -> Iterator[None]:
    """Activations built with `inplace=True` (timm's ReLU6 in EfficientNet-Lite, torchvision's ReLU)
    run out of place while the exporter traces, and are put back after.

    The exported graph is the same either way (an in-place op becomes its functional twin during
    functionalization; the ONNX nodes, initializers and outputs are identical), but an in-place op
    reaches that twin through its Python reference implementation, traced op by op with a symbolic
    batch: on EfficientNet-Lite0 that was a third of the export's time (12.3 → 8.0 s for Lite2 at
    128 px on a busy 2-core Xeon).
    """
    modules = [m for m in (model.modules() if hasattr(model, "modules") else ())
               if getattr(m, "inplace", None) is True]
    for m in modules:
        m.inplace = False
    try:
        yield
    finally:
        for m in modules:
            m.inplace = True


def _convert_opset(proto: Any, opset: int, target: Path) -> Any:
    """Down-convert an export to an older opset (devices such as TensorRT 8.5 stop at 17).

    The exporter's own down-conversion runs before its graph optimisation and gives up on
    ReduceMean's opset-18 `axes` input, keeping opset 18 without an error; on the optimised graph
    ONNX's converter succeeds. The result is verified: a file never claims an opset it is not.
    """
    import onnx

    if _default_opset(proto) != opset:
        _hold_unchanged_nodes(proto, opset)
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:  # the converter raises RuntimeError from C++ for unsupported adaptations
            raise UsageError(f"the model cannot be expressed in opset {opset} ({exc})", path=target,
                             field="opset") from exc
        _release_held_nodes(proto)
        for node in proto.graph.node:  # the converter keeps this opset-18 attribute; 0 is opset 17's behaviour
            for attr in [a for a in node.attribute if a.name == "noop_with_empty_axes" and opset < 18]:
                if attr.i:
                    raise UsageError(f"{node.name}: noop_with_empty_axes=1 has no opset-{opset} form", path=target)
                node.attribute.remove(attr)
    if _default_opset(proto) != opset:
        raise UsageError(f"the exporter produced opset {_default_opset(proto)}, not {opset}", path=target, field="opset")
    return proto


#: operators whose opset-18 form, used without the input opset 18 added, is their opset-11..17 form, for
#: which ONNX's converter has no adapter (Pad-18 added `axes`, its 4th input: the anomaly scorer's
#: reflect/edge padding has none). Value: how many inputs the older form takes.
_UNCHANGED_BELOW_18 = {"Pad": 3}
_HOLD_DOMAIN = "edgetransfer.held"


def _hold_unchanged_nodes(proto: Any, opset: int) -> None:
    """Move such nodes to a private domain so the converter leaves them as they are."""
    import onnx

    nodes = [n for n in proto.graph.node if 11 <= opset < 18 and n.domain in ("", "ai.onnx")
             and len([i for i in n.input if i]) <= _UNCHANGED_BELOW_18.get(n.op_type, -1)]
    for n in nodes:
        n.domain = _HOLD_DOMAIN
    if nodes:
        proto.opset_import.append(onnx.helper.make_opsetid(_HOLD_DOMAIN, 1))


def _release_held_nodes(proto: Any) -> None:
    for n in proto.graph.node:
        if n.domain == _HOLD_DOMAIN:
            n.domain = ""
    for o in [o for o in proto.opset_import if o.domain == _HOLD_DOMAIN]:
        proto.opset_import.remove(o)


def _default_opset(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(run: str | Path, *, out: str | Path | None = None, opset: int = OPSET) -> Path:
    """Export a run's best checkpoint to `RUN/model.onnx` (or `out`) with its class list and input spec."""
    from .adapt.checkpoint import load_model

    run = Path(run)
    model, meta = load_model(run)
    if meta.task == "anomaly":
        outputs, doc = ANOMALY_OUTPUTS, (f"edgetransfer anomaly scorer on {meta.backbone} ({meta.mode}): score and "
                                         f"map, threshold 0.5; good class {meta.anomaly.get('good')!r}")
    else:
        outputs, doc = (OUTPUT_NAME,), f"edgetransfer {meta.backbone} ({meta.mode}) — classes: {', '.join(meta.classes)}"
    target = export_module(model, meta.input_spec, Path(out) if out is not None else run / ONNX_FILE, opset=opset,
                           metadata=onnx_metadata(meta), doc=doc, output_names=outputs)
    log.info("exported %s (opset %d) to %s", meta.backbone, opset, target)
    return target
