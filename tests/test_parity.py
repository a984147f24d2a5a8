"""parity.py: the pure-numpy comparison of two sides' logits, checked against hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetransfer.parity import FP32_GATES, Gates, ParityReport, Side, compare, confusion

REF = Side("torch eager (cpu)", "fp32")
CAND = Side("onnxruntime CPUExecutionProvider", "int8")
NO_GATES = Gates(min_agreement=None, max_abs_diff=None, max_accuracy_drop=None, min_cosine=None)


def _logits(n: int = 12, classes: int = 4, seed: int = 0) -> np.ndarray:
    """Random logits whose top-1 is unambiguous (margin >= 1 between the best two classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, classes)).astype(np.float32)
    top = rng.integers(0, classes, n)
    x[np.arange(n), top] = x.max(1) + 1.0 + rng.random(n).astype(np.float32)
    return x


def _swap_top_two(x: np.ndarray, row: int) -> np.ndarray:
    out = x.copy()
    a, b = np.argsort(out[row])[-2:]  # second best, best
    out[row, a], out[row, b] = out[row, b], out[row, a]
    return out


def test_identical_logits_pass_every_gate():
    ref = _logits()
    assert ref.std(axis=0).min() > 0.1 and len(set(ref.argmax(1))) > 1  # a non-trivial reference
    labels = ref.argmax(1)
    r = compare("same", REF, CAND, ref, ref.copy(), labels, FP32_GATES)
    assert r.passed and r.failures == []
    assert r.agreement == 1.0 and r.max_abs_diff == 0.0 and r.mean_abs_diff == 0.0
    assert r.min_cosine == pytest.approx(1.0)
    assert r.reference_accuracy == 1.0 and r.candidate_accuracy == 1.0 and r.accuracy_drop == 0.0
    assert r.disagreement_confusion is None
    assert r.samples == len(ref)


def test_one_swapped_argmax_lowers_agreement_and_fails_the_gate():
    ref = _logits(n=10)
    cand = _swap_top_two(ref, row=3)
    assert ref[3].argmax() != cand[3].argmax()
    r = compare("swap", REF, CAND, ref, cand, None, Gates(min_agreement=1.0, max_abs_diff=None))
    assert r.agreement == pytest.approx(0.9)
    assert not r.passed
    assert len(r.failures) == 1 and "agreement" in r.failures[0]
    # the disagreement matrix: rows reference prediction, columns candidate prediction
    m = np.array(r.disagreement_confusion)
    assert m.sum() == 10 and np.trace(m) == 9
    assert m[ref[3].argmax(), cand[3].argmax()] == 1
    # the same outputs pass a looser agreement gate
    assert compare("swap", REF, CAND, ref, cand, None, Gates(min_agreement=0.9, max_abs_diff=None)).passed


def test_accuracy_drop_is_in_points():
    ref = _logits(n=8)
    labels = ref.argmax(1)  # the reference is right on all 8
    cand = _swap_top_two(_swap_top_two(ref, 0), 5)  # the candidate is wrong on 2 of 8
    r = compare("q", REF, CAND, ref, cand, labels, Gates(min_agreement=None, max_abs_diff=None,
                                                         max_accuracy_drop=10.0))
    assert r.reference_accuracy == 1.0 and r.candidate_accuracy == 0.75
    assert r.accuracy_drop == pytest.approx(25.0)
    assert not r.passed and any("accuracy drop" in f for f in r.failures)
    assert compare("q", REF, CAND, ref, cand, labels,
                   Gates(min_agreement=None, max_abs_diff=None, max_accuracy_drop=30.0)).passed
    # an improvement is a negative drop, never a failure
    better = compare("q", REF, CAND, cand, ref, labels, Gates(min_agreement=None, max_abs_diff=None,
                                                               max_accuracy_drop=0.0))
    assert better.accuracy_drop == pytest.approx(-25.0) and better.passed


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_candidate_fails_even_with_every_gate_off():
    ref = _logits()
    cand = ref.copy()
    cand[2, 1] = np.nan
    r = compare("nan", REF, CAND, ref, cand, None, NO_GATES)
    assert not r.passed and any("non-finite" in f for f in r.failures)
    cand[2, 1] = np.inf
    assert not compare("inf", REF, CAND, ref, cand, None, NO_GATES).passed
    assert compare("ok", REF, CAND, ref, ref.copy(), None, NO_GATES).passed


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_report_of_a_non_finite_candidate_is_still_strict_json(tmp_path):
    from edgetransfer.fsutil import write_json

    ref = _logits()
    cand = ref.copy()
    cand[0, 0] = np.nan
    report = ParityReport(classes=["a", "b", "c", "d"], pairs=[compare("nan", REF, CAND, ref, cand, None, FP32_GATES)])
    path = write_json(tmp_path / "parity.json", report.to_dict())  # allow_nan=False: must not raise
    d = json.loads(path.read_text())
    assert d["passed"] is False
    assert any("non-finite" in f for f in d["pairs"][0]["failures"])
    assert "FAILED" in report.to_markdown()


def test_abs_diff_and_cosine_gates():
    ref = _logits()
    cand = ref.copy()
    cand[4, 0] += 1e-3
    r = compare("d", REF, CAND, ref, cand, None, FP32_GATES)
    assert r.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert r.mean_abs_diff == pytest.approx(1e-3 / ref.size, rel=1e-3)
    assert r.agreement == 1.0
    assert not r.passed and any("max abs diff" in f for f in r.failures)
    assert compare("d", REF, CAND, ref, cand, None, Gates(max_abs_diff=1e-2)).passed
    # a sign-flipped row keeps nothing in common with its reference: cosine -1
    flipped = ref.copy()
    flipped[0] *= -1
    c = compare("c", REF, CAND, ref, flipped, None, Gates(min_agreement=None, max_abs_diff=None, min_cosine=0.99))
    assert c.min_cosine == pytest.approx(-1.0) and not c.passed


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        compare("shape", REF, CAND, _logits(n=4), _logits(n=5), None, FP32_GATES)


def test_confusion_counts():
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    expected = [[1, 1, 0],
                [0, 1, 0],
                [1, 0, 2]]
    assert confusion(y_true, y_pred, 3).tolist() == expected


def test_report_passes_only_when_every_pair_passes_and_shows_precisions():
    ref = _logits()
    good = compare("export fidelity", REF, Side("onnxruntime", "fp32"), ref, ref.copy(), None, FP32_GATES)
    bad = compare("quantization effect", REF, CAND, ref, _swap_top_two(ref, 0), None, FP32_GATES)
    classes = ["ok", "scratch", "hole", "stain"]
    assert ParityReport(classes=classes, pairs=[good]).passed
    report = ParityReport(classes=classes, pairs=[good, bad], context={"run": "r"})
    assert not report.passed
    d = json.loads(json.dumps(report.to_dict()))  # JSON-able
    assert d["passed"] is False
    assert [p["passed"] for p in d["pairs"]] == [True, False]
    assert d["pairs"][1]["reference"] == {"name": "torch eager (cpu)", "precision": "fp32"}
    assert d["pairs"][1]["candidate"]["precision"] == "int8"
    md = report.to_markdown()
    assert "FAILED" in md and "(int8)" in md and "(fp32)" in md
    assert "where predictions disagree" in md and all(c in md for c in classes)


def _quantization_record(run, target: str, **fields) -> None:
    folder = run / target
    folder.mkdir(parents=True)
    record = {"quantizer": "onnxruntime", "budget": 0.5, "drop": 0.0, "within_gates": True, "agreement": 1.0,
              "agreement_samples": 300, "min_agreement": 0.99, "excluded_layers": [], **fields}
    (folder / "quantization.json").write_text(json.dumps(record))


@pytest.mark.parametrize("validation_samples", [50, 400])
def test_a_test_drop_the_search_could_not_see_is_explained_by_its_resolution(tmp_path, validation_samples):
    """2 of 300 test images flip from right to wrong (0.67 points > 0.5) while agreement passes: the advice
    says why `quantize` saw no drop — its 50 validation images count 2 points each — or, when it had
    enough of them, that they may not represent the test images."""
    from edgetransfer.targets import load_target
    from edgetransfer.validate import pair_advice

    labels = np.arange(300) % 5
    ref = np.eye(5)[labels] * 4.0
    cand = ref.copy()
    cand[:2] = np.eye(5)[(labels[:2] + 1) % 5] * 4.0
    tgt = load_target("x86-onnxruntime")
    report = compare("quantization effect", Side("torch", "fp32"), Side("qdq", "int8"), ref, cand, labels,
                     Gates(min_agreement=0.99, max_abs_diff=None, max_accuracy_drop=0.5))
    assert report.failures == ["accuracy drop 0.67 points > 0.5"]
    _quantization_record(tmp_path, tgt.name, validation_samples=validation_samples)
    advice = " ".join(pair_advice(("torch", "qdq"), report, tgt, tmp_path))
    assert "saw a drop of 0.00 points on its" in advice and "it is 0.67 points (2 images net)" in advice
    assert "disagree more" not in advice  # agreement passed: the agreement advice would mislead
    if validation_samples == 50:
        assert "one image is 2.00 points, coarser than the 0.5-point budget" in advice and "at least 200" in advice
    else:
        assert "coarser" not in advice and "may not represent the test images" in advice
