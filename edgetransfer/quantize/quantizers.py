"""Who quantizes: a small class per tool filling two hooks (`available`, `_quantize`), looked up by name
in `QUANTIZERS`. `Quantizer.quantize` applies the same graph edits (`qdq`) after every tool, so the
search and the stages never know which tool ran.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import importlib.util
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import DependencyError, UsageError
from ..fsutil import atomic_path
from ..targets import CalibrationPreset, Quantization
from ..telemetry import telemetry_off
from .qdq import keep_fp32, signed_activations, snap_biases

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


class Quantizer(abc.ABC):
    """Turns an fp32 ONNX file into a QDQ ONNX file. Subclasses fill `available` and `_quantize`.

    One instance serves one model, scheme and calibration set: it may keep what calibration computed
    between calls (the accuracy budget calls it again with other `exclude` lists). Use it as a
    context manager, or call `close()`, to drop that cache.
    """

    name: ClassVar[str]
    install_hint: ClassVar[str]

    @abc.abstractmethod
    def available(self) -> str | None:
        """None if usable here, else why not (with the install command)."""

    @abc.abstractmethod
    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool, bias_correction: bool) -> None:
        """Write the tool's own QDQ model to `out`.

        `float_weights`: keep weights as fp32 initializers behind a Q→DQ pair (the same numbers as int8
        initializers + DQ, but the fp32 values stay in the graph so one layer can be restored by a
        graph edit while ranking sensitivity). `bias_correction`: where the tool corrects biases for
        the rounding of weights (NNCF), whether it does; it changes bias values, never the graph.
        """

    def quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                 calibration: Sequence[np.ndarray], exclude: Sequence[str] = (), float_weights: bool = False,
                 bias_correction: bool = True) -> None:
        """Write a checked QDQ model to `out` (atomically) with the `exclude` layers in fp32 on fp32 inputs.

        The input model's metadata (class list, input spec) is carried over: tools drop or rewrite it.
        `bias_correction=False` is for a file that is only timed (`edgetransfer select`): the same
        graph, biases as the weights' rounding left them, a few seconds sooner.
        """
        import onnx

        reference = onnx.load(str(fp32_onnx))
        with tempfile.TemporaryDirectory(prefix="edgetransfer-quantize-") as tmp, _quiet(self.name), telemetry_off():
            raw = Path(tmp) / "quantized.onnx"
            self._quantize(Path(fp32_onnx), raw, scheme=scheme, preset=preset, calibration=calibration,
                           input_name=input_name(reference), exclude=list(exclude), float_weights=float_weights,
                           bias_correction=bias_correction)
            model = onnx.load(str(raw))
        # the float ops read float tensors whichever tool ran (NNCF leaves them so already; ONNX
        # Runtime's quantizer still puts its neighbours' Q→DQ pairs on their inputs)
        floating = [node.name for node in model.graph.node if node.op_type in scheme.float_ops]
        if exclude or floating:
            keep_fp32(model, [*exclude, *floating], reference)
        snap_biases(model)
        del model.metadata_props[:]
        model.metadata_props.extend(reference.metadata_props)
        onnx.checker.check_model(model)
        with atomic_path(out) as tmp_out:
            onnx.save_model(model, str(tmp_out))

    def close(self) -> None:
        """Drop what this instance cached between calls."""

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnnxRuntimeQuantizer(Quantizer):
    """onnxruntime.quantization.quantize_static in QDQ format.

    Calibration runs once per instance; later calls (other `exclude` lists) reuse the ranges from
    ORT's calibration cache, so the accuracy budget's re-quantizations cost no inference.
    quant_pre_process is not run: on this project's exports (BatchNorm already folded by the
    exporter, shapes inferred) it changed no node and no output while adding ~10 s on ResNet-18.
    """

    name = "onnxruntime"
    install_hint = "pip install onnxruntime"
    _METHODS: ClassVar[dict[str, str]] = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

    def __init__(self) -> None:
        self._cache_dir: tempfile.TemporaryDirectory[str] | None = None

    def available(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return f"onnxruntime is not installed ({self.install_hint})"
        return None

    def _cache_file(self, fp32_onnx: Path, preset: CalibrationPreset, scheme: Quantization,
                    calibration: Sequence[np.ndarray]) -> Path:
        if self._cache_dir is None:
            self._cache_dir = tempfile.TemporaryDirectory(prefix="edgetransfer-ort-calibration-")
        stat = fp32_onnx.stat()
        key = (f"{fp32_onnx.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{preset.method}|{preset.percentile}|"
               f"{scheme.activations}|{[b.shape for b in calibration]}")
        return Path(self._cache_dir.name) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool, bias_correction: bool) -> None:
        # ONNX Runtime's static quantizer has no bias correction: `bias_correction` changes nothing here
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        symmetric = scheme.activations == "symmetric"
        cache = self._cache_file(fp32_onnx, preset, scheme, calibration)
        extra: dict[str, Any] = {
            # TensorRT runs only signed INT8 with zero point 0: symmetric means QInt8 + symmetric ranges
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": symmetric,
            # collect one batch at a time: the histogram calibrators otherwise hold every activation of
            # every calibration image in memory at once (ORT applies the stride to every method)
            "CalibStridedMinMax": 1,
            "AddQDQPairToWeight": float_weights,
            "QuantizeBias": scheme.bias == "int32",
        }
        if preset.method == "percentile":
            extra["CalibPercentile"] = preset.percentile
        quantize_static(
            str(fp32_onnx), str(out),
            calibration_data_reader=None if cache.exists() else _BatchReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=scheme.weights == "per_channel",
            reduce_range=scheme.reduce_range,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, self._METHODS[preset.method]),
            nodes_to_exclude=list(exclude),
            extra_options=extra,
            calibration_cache_path=str(cache),
        )

    def close(self) -> None:
        if self._cache_dir is not None:
            self._cache_dir.cleanup()
            self._cache_dir = None


class NncfQuantizer(Quantizer):
    """nncf.quantize on the ONNX model (NNCF's ONNX backend): OpenVINO's native post-training quantizer.

    NNCF quantizes the inputs of layers (not their outputs) and corrects biases for the rounding of
    weights. Preset PERFORMANCE gives symmetric activations, MIXED asymmetric ones.
    """

    name = "nncf"
    install_hint = "pip install nncf onnxruntime   (or: pip install 'edgetransfer[openvino]')"

    def available(self) -> str | None:
        missing = [m for m in ("nncf", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed ({self.install_hint})"
        return None

    @staticmethod
    def _ranges(preset: CalibrationPreset) -> Any:
        """The preset's method as NNCF range estimators (NNCF has no KL method: entropy → histogram)."""
        from nncf.quantization.range_estimator import (
            AggregatorType, RangeEstimatorParameters, RangeEstimatorParametersSet,
            StatisticsCollectorParameters, StatisticsType)

        if preset.method == "entropy":
            return RangeEstimatorParametersSet.HISTOGRAM
        if preset.method == "percentile":
            side = StatisticsCollectorParameters(statistics_type=StatisticsType.QUANTILE,
                                                 aggregator_type=AggregatorType.MEAN,
                                                 quantile_outlier_prob=(100.0 - preset.percentile) / 100.0)
            return RangeEstimatorParameters(min=side, max=copy.deepcopy(side))
        return None  # minmax: NNCF's own default (mean over samples of per-sample min / max)

    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool, bias_correction: bool) -> None:
        import nncf
        import onnx
        from nncf.onnx.quantization.backend_parameters import BackendParameters
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                           QuantizationParameters)

        symmetric = scheme.activations == "symmetric"
        advanced = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(per_channel=scheme.weights == "per_channel"),
            activations_range_estimator_params=self._ranges(preset),
            overflow_fix=OverflowFix.ENABLE if scheme.reduce_range else OverflowFix.DISABLE,
            batchwise_statistics=True,  # the items are batches: per-sample statistics within each
            disable_bias_correction=not bias_correction,
            backend_params={BackendParameters.COMPRESS_WEIGHTS: not float_weights})
        quantized = nncf.quantize(
            onnx.load(str(fp32_onnx)),
            nncf.Dataset(calibration, lambda batch: {input_name: as_input(batch)}),
            preset=nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED,
            subset_size=sum(len(b) for b in calibration),  # ≥ the number of batches: every batch is used
            # validate=False: a float op type the model does not contain is not an error
            ignored_scope=nncf.IgnoredScope(names=list(exclude), types=list(scheme.float_ops), validate=False),
            advanced_parameters=advanced)
        if symmetric:
            signed_activations(quantized)
        onnx.save_model(quantized, str(out))


QUANTIZERS: dict[str, type[Quantizer]] = {
    OnnxRuntimeQuantizer.name: OnnxRuntimeQuantizer,
    NncfQuantizer.name: NncfQuantizer,
}


# ---- small helpers ----------------------------------------------------------------------------

class _BatchReader:
    """ONNX Runtime's calibration reader over the caller's batches: hands out the arrays, never copies.

    `__len__`/`set_range` let ORT collect statistics one window (batch) at a time.
    """

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._indices = iter(range(start_index, min(end_index, len(self.batches))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._indices, None)
        return None if i is None else {self.input_name: as_input(self.batches[i])}


def as_input(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch, dtype=np.float32)  # no copy when it already is


def input_name(model: onnx.ModelProto) -> str:
    initializers = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


class _DropPreprocessHint(logging.Filter):
    """ORT asks for quant_pre_process on every call; measured useless on our exports (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Please consider") and "pre-processing" in message)


@contextlib.contextmanager
def _quiet(tool: str) -> Iterator[None]:
    """Keep the tools' own stdout chatter (progress bars, percentile tables) out of the CLI's output."""
    root, hint = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            yield
    finally:
        root.removeFilter(hint)
    if chatter.getvalue().strip():
        log.debug("%s output:\n%s", tool, chatter.getvalue())


def select_quantizers(name: str) -> list[Quantizer]:
    """Every usable quantizer for `auto`, else the named one; a missing tool is exit code 3."""
    if name == "auto":
        instances = [cls() for cls in QUANTIZERS.values()]
        usable = [q for q in instances if q.available() is None]
        if not usable:
            reasons = "; ".join(f"{q.name}: {q.available()}" for q in instances)
            raise DependencyError(f"no quantizer is usable here ({reasons})", field="quantization.quantizer")
        return usable
    if name not in QUANTIZERS:
        raise UsageError(f"unknown quantizer {name!r}; known: auto, {', '.join(QUANTIZERS)}",
                         field="quantization.quantizer")
    quantizer = QUANTIZERS[name]()
    reason = quantizer.available()
    if reason is not None:
        raise DependencyError(f"quantizer {name!r} is not usable here: {reason}", field="quantization.quantizer")
    return [quantizer]


__all__ = ["QUANTIZERS", "NncfQuantizer", "OnnxRuntimeQuantizer", "Quantizer", "as_input", "input_name",
           "select_quantizers"]
