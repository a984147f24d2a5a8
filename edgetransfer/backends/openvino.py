"""OpenVINO: ONNX (fp32 or INT8 QDQ) → OpenVINO IR, run on an Intel CPU, integrated GPU or NPU.

Compiling converts the ONNX file with `ov.convert_model` and saves `model.xml` + `model.bin`. A QDQ
ONNX file becomes FakeQuantize + int8 weights in the IR, which OpenVINO executes as real INT8; an
fp32 file keeps fp32 weights (`compress_to_fp16` is only switched on for fp16 targets — OpenVINO's
own default would halve every IR's weights).

At run time the precision is pinned instead of trusted: on CPUs with bf16 units OpenVINO's default
`INFERENCE_PRECISION_HINT` is bf16, which moves fp32 logits by ~1e-2. fp32 and int8 targets pin f32
(the int8 layers stay int8, everything else stays f32); fp16 targets ask for f16 only where the
device lists FP16. `OpenVinoRunner.precision` is then read back from the compiled model, so a
report says what ran, not what was asked for.

`ov.convert_model` (not `Core.read_model`) does the conversion because it also applies the offline
transformations: weights behind a FakeQuantize are stored as int8 in the IR (`read_model` + `save_model`
keeps them fp32, 4x the .bin for QDQ files whose weights are fp32 initializers). Note that
`convert_model` would send OpenVINO's anonymous usage telemetry (opt-out); it runs inside
`telemetry.telemetry_off()`, which declines it (offline, the send hung the command at exit).

`openvino` is imported inside functions only: `available()` must answer when it is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DependencyError, IntegrityError, UsageError
from ..fsutil import sha256_file, write_json
from ..telemetry import telemetry_off
from .base import Backend, Runner

XML_FILE = "model.xml"
BIN_FILE = "model.bin"
COMPILE_JSON = "compile.json"

#: devices that only run static shapes (the NPU compiler needs every dimension fixed)
STATIC_SHAPE_DEVICES = ("NPU",)
#: virtual devices that pick or combine physical ones; "AUTO" alone is always runnable
_VIRTUAL = ("AUTO", "MULTI", "HETERO", "BATCH")
#: CPU-plugin layer types that do the arithmetic; their runtime precision says whether INT8 ran
_COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                             "GEMM", "Gemm"})
_HINT_NAMES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bf16": "bf16"}


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def _version() -> str:
    import openvino as ov

    return str(ov.get_version())


def _base_device(device: str) -> str:
    """"GPU.1" → "GPU"."""
    return device.split(".", 1)[0].upper()


def device_available(device: str) -> str | None:
    """None if OpenVINO can see `device` here, else the reason (shown with exit code 3)."""
    if (reason := OpenVinoBackend().available()) is not None:
        return reason
    available = list(_core().available_devices)
    head, _, rest = device.partition(":")
    if head.upper() in _VIRTUAL:
        wanted = [d.strip() for d in rest.split(",") if d.strip()]
        if not wanted:
            return None if head.upper() == "AUTO" else f"OpenVINO device {device} names no devices"
    else:
        wanted = [device]
    names = {d.upper() for d in available} | {_base_device(d) for d in available}
    missing = [d for d in wanted if d.upper() not in names]
    if not missing:
        return None
    return (f"OpenVINO device {', '.join(missing)} not present on this machine (available: {', '.join(available) or 'none'}); "
            "run on a machine that has it (GPU needs Intel's GPU driver / OpenCL runtime, NPU the Intel NPU driver)")


def _supported_properties(device: str) -> set[str]:
    with contextlib.suppress(Exception):
        return set(_core().get_property(device, "SUPPORTED_PROPERTIES"))
    return set()


def _device_capabilities(device: str) -> list[str]:
    with contextlib.suppress(Exception):
        return [str(c) for c in _core().get_property(device, "OPTIMIZATION_CAPABILITIES")]
    return []


def _hint_name(value: Any) -> str:
    """An `ov.Type` / string precision hint → "fp32" / "fp16" / "bf16" (unknown ones verbatim)."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    text = text.removeprefix("<type: '").removesuffix("'>")
    return _HINT_NAMES.get(text, text)


def _ir_is_quantized(model: Any) -> bool:
    """FakeQuantize nodes or int8/uint8 constants: the IR came from a QDQ (or NNCF) model."""
    import openvino as ov

    low = {ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant" and op.get_output_element_type(0) in low:
            return True
    return False


def _runtime_int8_layers(compiled: Any) -> tuple[int, int] | None:
    """(int8 compute layers, compute layers) in the executed graph; None when the plugin does not say."""
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
    except Exception:
        return None
    total = int8 = 0
    for op in ops:
        info = op.get_rt_info()
        try:
            layer = info["layerType"].astype(str)
            precision = info["runtimePrecision"].astype(str).lower()
        except Exception:
            continue
        if layer in _COMPUTE_LAYERS:
            total += 1
            int8 += precision in ("i8", "u8", "i4", "u4")
    return (int8, total) if total else None


def _check_ir(xml: Path) -> None:
    """Refuse anything that is not an IR before OpenVINO's frontends guess at it (and print noise)."""
    if not xml.is_file():
        raise UsageError("OpenVINO IR not found; run `edgetransfer compile` first", path=xml)
    try:
        with open(xml, "rb") as fh:
            _, root = next(ET.iterparse(fh, events=("start",)))
    except (ET.ParseError, StopIteration, UnicodeDecodeError, OSError) as exc:
        raise IntegrityError(f"not an OpenVINO IR: unreadable XML ({exc})", path=xml) from exc
    if root.tag != "net":
        raise IntegrityError(f"not an OpenVINO IR: root element is <{root.tag}>, expected <net>", path=xml)
    if not xml.with_suffix(".bin").is_file():
        raise IntegrityError(f"OpenVINO IR weights missing: {xml.with_suffix('.bin').name} not found next to it",
                             path=xml)


def _read_ir(xml: Path) -> Any:
    _check_ir(xml)
    try:
        return _core().read_model(str(xml))
    except Exception as exc:
        raise IntegrityError(f"OpenVINO cannot read the IR ({_first_line(exc)})", path=xml) from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[0] if lines else type(exc).__name__


def _output_name(port: Any, index: int) -> str:
    """The ONNX output name OpenVINO kept for an output port (`output<i>` if it kept none)."""
    try:
        return port.get_any_name()
    except RuntimeError:
        return f"output{index}"


class OpenVinoRunner(Runner):
    """Compiles the IR for its device on `activate`; releases the compiled model on `deactivate`."""

    def __init__(self, xml: Path, model: Any, *, device: str = "CPU", precision: str = "fp32", threads: int = 0):
        self.xml = xml
        self.model = model
        self.device = device
        self.requested = precision
        self.threads = threads
        self.quantized_ir = _ir_is_quantized(model)
        self.compiled: Any = None
        self.request: Any = None
        self.config: dict[str, str] = {}
        self.input_dtype = np.dtype(np.float32)
        self.batch_range: tuple[int, int | None] = (1, None)
        self._note = ""
        self.description = f"openvino {device}"
        self.precision = "int8" if self.quantized_ir else precision

    # -- configuration ------------------------------------------------------------------------
    def _wanted_hint(self) -> tuple[str, str]:
        """(hint to request, note) — f32 unless an fp16 target runs on a device with fp16 units."""
        if self.requested == "fp16" and not self.quantized_ir:
            if "FP16" in _device_capabilities(self.device):
                return "f16", ""
            return "f32", f"fp16 requested; {_base_device(self.device)} has no fp16 units"
        return "f32", ""

    def _build_config(self) -> dict[str, str]:
        supported = _supported_properties(self.device)
        hint, self._note = self._wanted_hint()
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads > 0:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        # a plugin that does not know a property rejects the whole config; AUTO/HETERO forward them
        if supported and _base_device(self.device) not in _VIRTUAL:
            config = {k: v for k, v in config.items() if k in supported}
        return config

    def _describe_precision(self) -> str:
        try:
            ran = _hint_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:
            ran = {"f32": "fp32", "f16": "fp16"}.get(self.config.get("INFERENCE_PRECISION_HINT", ""), "unknown")
        note = self._note
        if self.requested == "fp16" and ran != "fp16" and not note:
            note = f"fp16 requested; {_base_device(self.device)} ran {ran}"
        if self.quantized_ir:
            counts = _runtime_int8_layers(self.compiled)
            if counts is not None and counts[0] == 0:
                return f"{ran} (int8 IR, but {self.device} ran no layer in int8)"
            if counts is not None and counts[0] < counts[1]:
                return f"int8 ({counts[0]}/{counts[1]} compute layers; {ran} for the rest)"
            return f"int8 ({ran} for non-quantized layers)"
        return f"{ran} ({note})" if note else ran

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self) -> None:
        self.config = self._build_config()
        try:
            self.compiled = _core().compile_model(self.model, self.device, self.config)
        except Exception as exc:
            reason = device_available(self.device) or (
                f"OpenVINO's {self.device} plugin cannot compile this model ({_first_line(exc)}); "
                "try another device or check the plugin's supported operations")
            raise DependencyError(reason, path=self.xml) from exc
        self.request = self.compiled.create_infer_request()
        try:  # float32 normally; uint8 where normalisation is baked into the graph
            self.input_dtype = np.dtype(self.compiled.inputs[0].get_element_type().to_dtype())
        except Exception:
            self.input_dtype = np.dtype(np.float32)
        shape = self.compiled.inputs[0].get_partial_shape()
        batch = shape[0]
        if batch.is_static:
            self.batch_range = (batch.get_length(), batch.get_length())
        else:
            hi = batch.get_max_length()
            self.batch_range = (max(batch.get_min_length(), 1), hi if hi > 0 else None)
        self.precision = self._describe_precision()
        self.description = f"openvino {self.device}"

    def deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self._infer(batch, every=False).values()))  # copies the first output only

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self._infer(batch, every=True)

    def _infer(self, batch: np.ndarray, *, every: bool) -> dict[str, np.ndarray]:
        if self.request is None:
            raise RuntimeError("OpenVinoRunner is not active: call infer inside `with backend.load(...) as runner:`")
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        n = x.shape[0]
        lo, hi = self.batch_range
        if n >= lo and (hi is None or n <= hi):
            return self._run(x, every)
        # outside the compiled range (a static NPU batch, or more than max): chunks of the largest
        # batch it takes, the last one padded with zeros up to the smallest
        step = hi if hi is not None else n
        outs = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            k = chunk.shape[0]
            if k < lo:
                chunk = np.concatenate([chunk, np.zeros((lo - k, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append({name: v[:k] for name, v in self._run(chunk, every).items()})
        return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

    def _run(self, x: np.ndarray, every: bool) -> dict[str, np.ndarray]:
        result = self.request.infer({0: x})
        ports = self.compiled.outputs if every else self.compiled.outputs[:1]
        return {_output_name(port, i): np.array(result[port], dtype=np.float32, copy=True)
                for i, port in enumerate(ports)}


class OpenVinoBackend(Backend):
    name = "openvino"
    install_hint = ("pip install 'edgetransfer[runtime-openvino]' on a device, or 'edgetransfer[openvino]' on a "
                    "workstation (adds NNCF for quantizing)")

    def available(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install failing inside its own import
            return f"openvino is not installed or cannot be imported ({exc}); {self.install_hint}"
        return None

    def compile(self, onnx: Path, target: Any, out: Path) -> Path:
        """ONNX → `out/model.xml` + `out/model.bin` + `out/compile.json`; returns the xml path."""
        import openvino as ov

        onnx, out = Path(onnx), Path(out)
        if not onnx.is_file():
            raise UsageError("ONNX model not found; run `edgetransfer export` first", path=onnx)
        device = getattr(target, "device", "CPU")
        precision = getattr(target, "precision", "fp32")
        if not _looks_like_onnx(onnx):  # before convert_model tries every frontend on it (and prints noise)
            raise IntegrityError("not an ONNX model (OpenVINO's ONNX frontend does not recognise the file)", path=onnx)
        try:
            with telemetry_off():
                model = ov.convert_model(str(onnx))
        except Exception as exc:
            raise IntegrityError(f"OpenVINO cannot convert the ONNX model ({_first_line(exc)})", path=onnx) from exc

        shape = self._reshape(model, onnx, target, device)
        quantized = _ir_is_quantized(model)
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".xml", dir=out)
        os.close(fd)
        tmp_xml = Path(tmp)
        tmp_bin = tmp_xml.with_suffix(".bin")
        xml, bin_ = out / XML_FILE, out / BIN_FILE
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=(precision == "fp16"))
            for path in (tmp_bin, tmp_xml):
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
            _read_ir(tmp_xml)  # what we wrote reads back before it takes the final name
            # never an old xml over a new bin: the xml goes first and comes back last
            with contextlib.suppress(FileNotFoundError):
                xml.unlink()
            os.replace(tmp_bin, bin_)
            write_json(out / COMPILE_JSON, {
                "backend": self.name,
                "openvino": _version(),
                "device": device,
                "precision_requested": precision,
                "compress_to_fp16": precision == "fp16",
                "quantized_ir": quantized,
                "input": shape,
                "output_partial_shape": str(model.outputs[0].get_partial_shape()),
                "batch": {"min": shape["batch_min"], "max": shape["batch_max"]},
                "threads": getattr(target, "threads", 0),
                "source": {"onnx": onnx.name, "sha256": sha256_file(onnx)},
                "files": {"xml": XML_FILE, "bin": BIN_FILE,
                          "bin_sha256": sha256_file(bin_)},
            })
            os.replace(tmp_xml, xml)
        finally:
            for path in (tmp_xml, tmp_bin):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return xml

    @staticmethod
    def _reshape(model: Any, onnx: Path, target: Any, device: str) -> dict[str, Any]:
        """Batch dimension: bounded dynamic (min..max) where the device allows it, else static max."""
        import openvino as ov

        if len(model.inputs) != 1:
            raise UsageError(f"expected one model input, found {len(model.inputs)}", path=onnx)
        port = model.inputs[0]
        dims = list(port.get_partial_shape())
        if not dims:
            raise UsageError("the model input is a scalar; expected an NCHW batch", path=onnx)
        batch = getattr(target, "batch", None)
        lo, hi = (batch.min, batch.max) if batch is not None else (1, 8)
        static = _base_device(device) in STATIC_SHAPE_DEVICES or lo == hi
        first = ov.Dimension(hi) if static else ov.Dimension(lo, hi)
        try:
            model.reshape({port: ov.PartialShape([first, *dims[1:]])})
        except Exception as exc:
            raise UsageError(f"cannot set the batch dimension to {'%d' % hi if static else f'{lo}..{hi}'} "
                             f"({_first_line(exc)}); export the model with a dynamic batch", path=onnx) from exc
        return {"name": port.get_any_name(), "original_partial_shape": str(ov.PartialShape(dims)),
                "partial_shape": str(port.get_partial_shape()), "static": static,
                "batch_min": hi if static else lo, "batch_max": hi,
                "element_type": str(port.get_element_type().get_type_name())}

    def artifact_files(self, artifact: Path) -> list[Path]:
        """model.xml, its model.bin, and compile.json (device, threads and batch range) when present."""
        xml = Path(artifact)
        xml = xml / XML_FILE if xml.is_dir() else xml
        files = [xml, xml.with_suffix(".bin")]
        if (xml.parent / COMPILE_JSON).is_file():
            files.append(xml.parent / COMPILE_JSON)
        return files

    def load(self, artifact: Path, target: Any = None) -> OpenVinoRunner:
        """A runner for `artifact` (model.xml, or the folder holding it) on the target's device."""
        xml = Path(artifact)
        if xml.is_dir():
            xml = xml / XML_FILE
        if (reason := self.available()) is not None:
            raise DependencyError(reason)
        info = _read_compile_json(xml)
        device = getattr(target, "device", None) or info.get("device") or "CPU"
        precision = getattr(target, "precision", None) or info.get("precision_requested") or "fp32"
        threads = getattr(target, "threads", None)
        threads = info.get("threads", 0) if threads is None else threads
        if (reason := device_available(device)) is not None:
            raise DependencyError(reason)
        return OpenVinoRunner(xml, _read_ir(xml), device=device, precision=precision, threads=int(threads or 0))


def _looks_like_onnx(path: Path) -> bool:
    try:
        from openvino.frontend import FrontEndManager

        return bool(FrontEndManager().load_by_framework("onnx").supported(str(path)))
    except Exception:  # no ONNX frontend to ask: let convert_model decide
        return True


def _read_compile_json(xml: Path) -> dict[str, Any]:
    path = xml.parent / COMPILE_JSON
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


__all__ = ["OpenVinoBackend", "OpenVinoRunner", "device_available"]
