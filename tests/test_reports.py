"""Reports that point at the failure: the parity plot marks flipped predictions and keeps its labels
on the canvas; `failing_reports` / `edgetransfer reports --failed` find exactly the failing parity
reports; `edgetransfer run` names each failing report and its failed gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.parity import Gates, ParityReport, Side, compare
from edgetransfer.validate import failed_gates, failing_reports

CLASSES = ["crack", "hole", "ok", "scratch", "stain"]


def _logits(n: int = 50, flips: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near-tied reference logits and a candidate whose top-1 differs on exactly `flips` images."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 0.3, (n, len(CLASSES))).astype(np.float32)
    cand = ref.copy()
    for i in range(flips):  # swap the top two logits: a flip that stays close to the diagonal
        top2 = np.argsort(ref[i])[-2:]
        cand[i, top2] = ref[i, top2[::-1]]
    return ref, cand, rng.integers(0, len(CLASSES), n)


def _report(pairs, labels) -> ParityReport:
    return ParityReport(classes=CLASSES, pairs=[
        compare(name, Side("torch", "fp32"), Side("int8 model", "int8"), a, b, labels,
                Gates(min_agreement=0.99, max_abs_diff=None)) for name, (a, b) in pairs.items()])


# ---- the plot -------------------------------------------------------------------------------------

def test_parity_plot_marks_flipped_predictions_and_counts_them_in_the_legend(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from edgetransfer.plots import draw_parity_figure, parity_figure

    ref, cand, labels = _logits(n=50, flips=2)
    pairs = {"export fidelity: torch fp32 vs ONNX fp32": (ref, ref.copy()),
             "quantization effect: torch fp32 vs INT8 QDQ (ONNX Runtime)": (ref, cand)}
    report = _report(pairs, labels)
    fig = draw_parity_figure(report, pairs, labels, cand.argmax(1))
    try:
        same, moved = fig.axes[0], fig.axes[1]
        legend = [t.get_text() for t in moved.get_legend().get_texts()]
        assert "2 of 50 predictions flipped" in legend and "48 of 50 predictions agree" in legend
        assert "0 of 50 predictions flipped" in [t.get_text() for t in same.get_legend().get_texts()]
        [marked] = [c for c in moved.collections if c.get_gid() == "flipped"]
        # every logit of the two flipped images, drawn above the agreeing points
        assert len(marked.get_offsets()) == 2 * len(CLASSES)
        expected = np.stack([ref[:2].ravel(), cand[:2].ravel()], axis=1)
        np.testing.assert_allclose(np.asarray(marked.get_offsets()), expected, rtol=1e-6)
        others = [c for c in moved.collections if c.get_gid() != "flipped"]
        assert all(marked.get_zorder() > c.get_zorder() for c in others)
        # nothing is clipped: every axis label lies inside the figure once laid out
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        for ax in fig.axes:
            for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
                ext = label.get_window_extent(renderer)
                assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1 and ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1
    finally:
        plt.close(fig)
    path = parity_figure(report, pairs, labels, cand.argmax(1), tmp_path / "parity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- failing_reports and `edgetransfer reports` ---------------------------------------------------------

def _write_report(folder: Path, passed: bool, failures: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parity.json").write_text(json.dumps(
        {"passed": passed, "pairs": [{"pair": "quantization effect", "failures": list(failures)}]}))
    (folder / "parity.md").write_text(f"# Parity report — {'PASSED' if passed else 'FAILED'}\n")
    return folder / "parity.md"


@pytest.fixture
def demo_tree(tmp_path) -> tuple[Path, list[Path]]:
    """A demo-shaped folder: fp32 report passing, one target failing, one passing, one in a second run."""
    root = tmp_path / "demo"
    _write_report(root / "transfer-finetune", True)
    failing = [_write_report(root / "transfer-finetune" / "intel-cpu", False, ["top-1 agreement 0.975 < 0.99"]),
               _write_report(root / "zz-other" / "x86-onnxruntime", False, ["accuracy drop 2.00 points > 1.0"])]
    _write_report(root / "transfer-finetune" / "x86-onnxruntime", True)
    (root / "bundle-intel-cpu").mkdir()
    (root / "bundle-intel-cpu" / "parity.json").write_text("{not json")  # not ours: ignored
    return root, failing


def test_failing_reports_finds_exactly_the_failing_ones(demo_tree):
    root, failing = demo_tree
    assert failing_reports(root) == failing
    assert failing_reports(root / "transfer-finetune") == failing[:1]
    assert failed_gates(failing[0]) == ["quantization effect: top-1 agreement 0.975 < 0.99"]
    assert failing_reports(root / "transfer-finetune" / "x86-onnxruntime") == []


def test_reports_cli_lists_the_failing_reports_and_their_gates(demo_tree):
    root, failing = demo_tree
    result = CliRunner().invoke(main, ["reports", str(root), "--failed"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(p) for p in failing]
    assert "top-1 agreement 0.975 < 0.99" in result.stderr
    every = CliRunner().invoke(main, ["reports", str(root)])
    assert len(every.stdout.splitlines()) == 5


def test_makefile_hint_uses_the_failing_reports_not_a_glob():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "reports runs/demo --failed" in makefile and "runs/demo/*/parity.md" not in makefile


# ---- `edgetransfer run` ---------------------------------------------------------------------------------

def test_run_names_each_failing_report_and_its_gates(tmp_path, monkeypatch):
    import edgetransfer.pipeline as pipeline
    from edgetransfer.adapt.train import TrainResult

    ref, cand, labels = _logits(n=20, flips=0)
    fp32 = _report({"export fidelity: torch fp32 vs ONNX fp32": (ref, cand)}, labels)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    (out / "model.onnx").write_bytes(b"")  # newer than the weights: no export
    monkeypatch.setattr(pipeline, "train_or_reuse", lambda data, run, config: TrainResult(run=run, meta=None))
    monkeypatch.setattr(pipeline, "validate", lambda run, data=None: fp32)

    def deploy(run, target, calib=None, data=None):
        name = target.name
        if name == "intel-cpu":
            return {"target": name, "precision": "int8", "fp32_accuracy": 0.4, "accuracy": 0.4, "drop": 0.0,
                    "agreement": 0.975, "latency_ms": 1.0, "passed": False, "report": str(run / name / "parity.md"),
                    "failures": ["quantization effect: top-1 agreement 0.9750 < 0.99"], "warnings": []}
        return {"target": name, "precision": "int8", "fp32_accuracy": 0.4, "accuracy": 0.4, "drop": 0.0,
                "agreement": 1.0, "latency_ms": 1.0, "passed": True, "report": str(run / name / "parity.md"),
                "failures": [], "warnings": []}

    monkeypatch.setattr(pipeline, "deploy_target", deploy)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": str(tmp_path), "out": "run",
                                      "targets": ["intel-cpu", "x86-onnxruntime"]}))
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 1, result.output
    assert f"FAILED: {out / 'intel-cpu' / 'parity.md'}" in result.stderr
    assert "top-1 agreement 0.9750 < 0.99" in result.stderr
    assert "x86-onnxruntime/parity.md" not in result.stderr
    summary = json.loads((out / "recipe-summary.json").read_text())
    assert summary["failing_reports"] == [{"target": "intel-cpu", "report": str(out / "intel-cpu" / "parity.md"),
                                           "failures": ["quantization effect: top-1 agreement 0.9750 < 0.99"]}]
