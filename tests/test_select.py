"""`edgetransfer select`: LogME and the linear probe against hand-checkable truths, the ranking
arithmetic on constructed tables, and one small end-to-end run of the command."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edgetransfer.cli import main
from edgetransfer.select.core import (PROBE_STAGES, TIMING_CALIBRATION_IMAGES, Candidate, _embed, _latency_target,
                                      _quantize_for_timing, weights_here)
from edgetransfer.spec import RunMeta
from edgetransfer.stages import INT8_FILE, quantize_run, run_splits
from edgetransfer.targets import load_target
from edgetransfer.select.ranking import latency_warning, recommend
from edgetransfer.select.transferability import (combine_blocks, fit_logistic, kendall_tau_b, linear_probe_cv, logme,
                                                 pareto_front, stratified_folds)


def _blobs(n_per_class: int, classes: int, dim: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent means in random directions plus unit noise, made non-negative like pooled ReLU features."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    means = rng.standard_normal((classes, dim)) * separation
    return np.abs(means[y] + rng.standard_normal((len(y), dim))), y


# -- LogME ------------------------------------------------------------------------------------------

def test_logme_prefers_features_that_separate_the_labels():
    x, y = _blobs(30, 4, 64, separation=3.0, seed=0)
    noise = np.abs(np.random.default_rng(1).standard_normal(x.shape))
    good, bad = logme(x, y), logme(noise, y)
    assert good.converged and bad.converged
    assert math.isfinite(good.value) and math.isfinite(bad.value)
    assert good.value > bad.value + 0.1
    # monotone in how well the features separate the classes
    assert logme(_blobs(30, 4, 64, separation=1.0, seed=0)[0], y).value < good.value


def _direct_evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """log N(t; 0, I/beta + F F^T/alpha) / n: the marginal likelihood of the Bayesian linear model,
    evaluated straight from its definition (n x n covariance, no SVD)."""
    n = len(t)
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return (-0.5 * (n * math.log(2 * math.pi) + logdet + t @ np.linalg.solve(cov, t))) / n


@pytest.mark.parametrize("n_per_class,dim", [(20, 10), (8, 50)])  # more images than features, and fewer
def test_logme_equals_the_evidence_formula_at_its_fixed_point(n_per_class, dim):
    x, y = _blobs(n_per_class, 3, dim, separation=1.5, seed=2)
    result = logme(x, y)
    direct = [_direct_evidence(x, (y == k).astype(float), a, b)
              for k, a, b in zip(range(3), result.alpha, result.beta)]
    assert result.value == pytest.approx(float(np.mean(direct)), rel=1e-9, abs=1e-9)
    # the fixed point maximises the evidence: no nearby alpha or beta does better (with fewer images
    # than features the noise precision may run off to infinity, where the evidence has settled)
    for k, (a, b) in enumerate(zip(result.alpha, result.beta)):
        t = (y == k).astype(float)
        here = _direct_evidence(x, t, a, b)
        for da, db in ((1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9)):
            assert _direct_evidence(x, t, a * da, b * db) <= here + 1e-9


# -- the linear probe -------------------------------------------------------------------------------

def test_linear_probe_reads_separable_features_and_not_noise():
    x, y = _blobs(20, 5, 40, separation=4.0, seed=3)
    assert linear_probe_cv(x, y).accuracy == 1.0
    noise = np.random.default_rng(4).standard_normal((100, 40))
    chance = linear_probe_cv(noise, y)
    assert chance.accuracy < 0.45 and chance.folds == 5 and chance.samples == 100
    assert set(chance.by_l2) == {1.0, 0.1, 0.01, 0.001}
    middling = linear_probe_cv(_blobs(20, 5, 40, separation=0.35, seed=3)[0], y).accuracy
    assert chance.accuracy < middling < 1.0


def test_combined_blocks_weigh_the_same_whatever_their_width_or_scale():
    x, y = _blobs(20, 5, 40, separation=1.0, seed=5)
    wide_noise = np.random.default_rng(6).standard_normal((100, 1000)) * 1e3
    combined = combine_blocks([x, wide_noise])
    assert combined.shape == (100, 1040)
    for part in (combined[:, :40], combined[:, 40:]):
        np.testing.assert_allclose(part.mean(axis=0), 0.0, atol=1e-4)
        assert np.linalg.norm(part, axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    # a block's scale does not change the result; LogME still sees the informative block through the loud one
    np.testing.assert_allclose(combine_blocks([x * 1e-3, wide_noise]), combined, rtol=1e-4, atol=1e-6)
    assert logme(combined, y).value > logme(np.hstack([x, wide_noise]), y).value


def test_the_stage_blocks_line_up_with_the_images_they_came_from(tiny_data):
    """select's one embedding pass also pools two mid-level stages; row k of each block must be image k."""
    import torch

    from edgetransfer.backbones import create, stages
    from edgetransfer.data.folder import scan_dataset
    from edgetransfer.preprocess import load_image, preprocess
    from edgetransfer.spec import RESIZE_POLICIES

    if weights_here("efficientnet_lite0") is not None:
        pytest.skip("the packaged EfficientNet-Lite0 weights are not installed here")
    splits = scan_dataset(tiny_data)
    bb = create("efficientnet_lite0", len(splits.classes), weights="default", img_size=64,
                resize=RESIZE_POLICIES["letterbox"])
    blocks, labels, _ = _embed(bb, splits, 64)
    assert list(blocks) == ["head", *(f"stage{i}" for i in PROBE_STAGES)]
    samples = [*splits.train, *splits.val]
    assert all(len(b) == len(samples) for b in blocks.values())
    assert list(labels) == [s.label for s in samples]
    k = len(samples) - 1  # the last image: a validation one, after every train batch
    seen = {}
    handles = [stages(bb.model, bb.head)[i].register_forward_hook(
        lambda _m, _i, out, i=i: seen.__setitem__(i, out.mean(dim=(2, 3))[0].numpy())) for i in PROBE_STAGES]
    with torch.no_grad():
        bb.model.eval()(torch.from_numpy(preprocess(load_image(samples[k].path), bb.input_spec))[None])
    for h in handles:
        h.remove()
    for i in PROBE_STAGES:
        np.testing.assert_allclose(blocks[f"stage{i}"][k], seen[i], rtol=1e-3, atol=1e-4)
        assert not np.allclose(blocks[f"stage{i}"][0], seen[i], rtol=1e-3, atol=1e-4)  # not every row alike


def test_logistic_regression_reaches_the_same_optimum_as_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(25, 3, 12, separation=0.8, seed=5)
    n, l2 = len(y), 0.05
    w = fit_logistic(x, y, 3, l2, tol=1e-9, max_iter=5000)
    logits = np.hstack([x, np.ones((n, 1))]) @ w
    ours = np.exp(logits - logits.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    # scikit-learn minimises C * sum(loss) + |W|^2 / 2, i.e. ours with C = 1 / (n * l2)
    theirs = sklearn.LogisticRegression(C=1 / (n * l2), tol=1e-10, max_iter=10000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_stratified_folds_hold_every_class_in_proportion():
    y = np.repeat(np.arange(3), [10, 7, 5])
    folds = stratified_folds(y, 5, seed=0)
    for k, count in zip(range(3), (10, 7, 5)):
        per_fold = np.bincount(folds[y == k], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1


# -- ranking arithmetic ----------------------------------------------------------------------------

def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # by hand: pairs of (1,1), (2,3), (3,2), (4,4): 5 concordant, 1 discordant, no ties -> 4/6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 15), rng.integers(0, 5, 15)  # many ties in both
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_pareto_front_on_a_constructed_table():
    #            A     B     C     D     E     F (tie of B)  G (no latency)
    accuracy = [0.70, 0.80, 0.75, 0.90, 0.85, 0.80, 0.99]
    latency = [1.0, 2.0, 3.0, 4.0, 4.0, 2.0, None]
    #  A: fastest -> front; B, F: equal points, nothing dominates them -> front; C: B is better and faster;
    #  D: most accurate timed -> front; E: D is as fast and more accurate; G: not comparable
    assert pareto_front(accuracy, latency) == [True, True, False, True, False, True, False]


def _table(rows: list[tuple[float, float, float | None]]) -> list[Candidate]:
    return [Candidate(backbone=f"net{i}", size=96, predicted_accuracy=acc, standard_error=se, latency_ms=lat)
            for i, (acc, se, lat) in enumerate(rows)]


def test_recommendation_respects_the_latency_budget():
    table = _table([(0.70, 0.02, 1.0), (0.80, 0.02, 2.0), (0.90, 0.02, 4.0), (0.905, 0.02, 9.0)])
    for budget in (1.0, 1.5, 2.0, 3.9, 4.0, 8.9, 100.0):
        rec = recommend(table, budget, target="t")
        assert rec.status == "recommended"
        chosen = table[rec.index]
        assert chosen.latency_ms <= budget
        # no candidate within the budget is clearly (beyond one standard error) more accurate
        assert all(c.predicted_accuracy < chosen.predicted_accuracy + table[rec.index].standard_error + 0.02
                   for c in table if c.latency_ms <= budget)
    assert table[recommend(table, 2.0, target="t").index].backbone == "net1"
    # 0.905 at 9 ms is within one standard error of 0.90 at 4 ms: the faster one
    assert table[recommend(table, None, target="t").index].backbone == "net2"
    assert "within one standard error" in recommend(table, None, target="t").message


def test_no_candidate_within_the_budget_is_said_plainly():
    table = _table([(0.70, 0.02, 1.5), (0.80, 0.02, 2.0)])
    rec = recommend(table, 1.0, target="intel-cpu")
    assert rec.index is None and rec.status == "over_budget"
    assert "no candidate meets the 1 ms budget on intel-cpu" in rec.message and "net0" in rec.message


def test_unmeasured_latency_ranks_by_accuracy_and_cannot_check_a_budget():
    table = _table([(0.70, 0.02, None), (0.85, 0.02, None), (0.80, 0.02, None)])
    for c in table:
        c.latency_note = "not measured: jetson runs tensorrt"
        c.preflight = {"passed": True}
    table[1].preflight = {"passed": False}  # cannot build for the target: never recommended
    assert table[recommend(table, None, target="jetson").index].backbone == "net2"
    rec = recommend(table, 5.0, target="jetson")
    assert rec.index is None and rec.status == "unmeasured" and "cannot be checked here" in rec.message


def test_latency_measured_on_a_busy_machine_is_flagged():
    table = _table([(0.70, 0.02, 1.0), (0.80, 0.02, 2.0)])
    table[0].latency_p90_ms, table[1].latency_p90_ms = 1.2, 2.5
    assert latency_warning(table) is None
    table[1].latency_p90_ms = 4.0
    warning = latency_warning(table)
    assert "1 of 2 candidates" in warning and "net1" in warning and "idle machine" in warning


# -- inputs ------------------------------------------------------------------------------------------

def test_a_backbone_without_weights_here_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    reason = weights_here("resnet18")
    assert reason is not None and "resnet18-" in reason and str(tmp_path / "empty-hub") in reason
    assert "nothing is downloaded" in reason


@pytest.mark.parametrize("args,expected", [
    (["--candidates", "efficientnet_lte0"], "did you mean 'efficientnet_lite0'"),
    (["--candidates", " , "], "no candidate backbones"),
    (["--sizes", "96,big"], "whole numbers"),
    (["--sizes", "4"], "input sizes must be"),
    (["--target", "intel-cpx"], "intel-cpu"),
])
def test_bad_usage_is_exit_2(tiny_data, tmp_path, args, expected):
    base = {"--target": "x86-onnxruntime", "--candidates": "efficientnet_lite0", "--sizes": "64"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = CliRunner().invoke(main, ["select", str(tiny_data), "--out", str(tmp_path / "sel"),
                                       *[v for kv in base.items() for v in kv]])
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_out_inside_the_data_is_refused(tiny_data):
    result = CliRunner().invoke(main, ["select", str(tiny_data), "--target", "x86-onnxruntime", "--candidates",
                                       "efficientnet_lite0", "--sizes", "64", "--out", str(tiny_data / "sel")])
    assert result.exit_code == 2 and "overlaps the dataset" in result.output


# -- the model that is timed -----------------------------------------------------------------------

def _graph(model: onnx.ModelProto) -> tuple[list, dict]:
    """What decides how a runtime executes a QDQ file: every node (type, wiring, attributes) and every
    initializer's type and shape; not the values of scales, zero points and biases."""
    nodes = [(n.op_type, n.domain, tuple(n.input), tuple(n.output),
              tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
             for n in model.graph.node]
    return nodes, {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}


@pytest.mark.parametrize("target", ["intel-cpu", "x86-onnxruntime", "jetson-orin-nano"])
def test_the_model_timed_has_the_graph_that_quantize_writes(exported_run, tmp_path, target):
    """select times a QDQ file quantized from a few images without bias correction; that must be the
    graph `edgetransfer quantize` writes with the target's scheme (NNCF for intel-cpu, ONNX Runtime's
    quantizer otherwise, float Adds, signed activations, biases on the grid), only its values differ."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("meta.json", "model.onnx"):
        shutil.copy2(exported_run / name, run / name)
    tgt = _latency_target(load_target(target))
    quantize_run(run, tgt, calib="quick", compiler_in_loop=False)
    reference = onnx.load(str(run / tgt.name / INT8_FILE))
    reference_images = json.loads((run / tgt.name / "calibration.json").read_text())["count"]
    shutil.rmtree(run / tgt.name)

    splits = run_splits(RunMeta.load(run / "meta.json"))
    _quantize_for_timing(run, tgt, splits)
    timed = onnx.load(str(run / tgt.name / INT8_FILE))
    assert _graph(timed) == _graph(reference)
    assert sum(n.op_type == "QuantizeLinear" for n in timed.graph.node) > 5
    # not the same file: ranges from fewer images (and, for NNCF, no bias correction)
    values = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
    assert any(not np.array_equal(numpy_helper.to_array(i), values[i.name]) for i in timed.graph.initializer)
    calibration = json.loads((run / tgt.name / "calibration.json").read_text())
    assert calibration["count"] == max(TIMING_CALIBRATION_IMAGES, len(splits.classes)) < reference_images
    assert "timing only" in calibration["purpose"]
    assert not {f["path"] for f in calibration["files"]} & {str(s.path.relative_to(splits.root)) for s in splits.test}
    record = json.loads((run / tgt.name / "quantization.json").read_text())
    assert record["bias_correction"] is False and record["accuracy"] is None and "timing only" in record["purpose"]


# -- end to end --------------------------------------------------------------------------------------

def test_select_end_to_end(tiny_data, tmp_path, monkeypatch):
    """One packaged backbone at one size on tiny data: scored, exported, quantized, compiled, timed; a
    torchvision backbone without its hub file skipped with the reason; then the same folder again
    with an impossible budget (exit 1, caches reused) and for a Jetson (preflight, no latency)."""
    if weights_here("efficientnet_lite0") is not None:
        pytest.skip("the packaged EfficientNet-Lite0 weights are not installed here")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    out = tmp_path / "sel"
    args = ["select", str(tiny_data), "--candidates", "efficientnet_lite0,resnet18", "--sizes", "64",
            "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--target", "x86-onnxruntime"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "select.json").read_text())
    [cand] = report["candidates"]
    assert (cand["backbone"], cand["size"], cand["samples"]) == ("efficientnet_lite0", 64, 30)  # train + val only
    # the head's input (1280) and the pooled outputs of Lite0's stages 5 and 6 of 7 (112 + 192 channels)
    assert cand["features"] == 1280 + 112 + 192 and math.isfinite(cand["logme"])
    assert 0.0 <= cand["predicted_accuracy"] <= 1.0 and 0.0 <= cand["head_probe_accuracy"] <= 1.0
    assert cand["latency_ms"] > 0 and cand["precision"].startswith("int8") and cand["on_front"]
    assert report["skipped"][0]["backbone"] == "resnet18" and "resnet18-" in report["skipped"][0]["reason"]
    assert report["recommendation"]["candidate"] == "efficientnet_lite0 @ 64"
    assert "--backbone efficientnet_lite0" in report["train_command"] and "--img-size 64" in report["train_command"]
    assert "efficientnet_lite0" in result.output and "skipped resnet18" in result.output
    assert (out / "select.png").stat().st_size > 0 and "| 1 | **efficientnet_lite0** | 64 |" in \
        (out / "select.md").read_text()
    assert "quantized for timing only" in (out / "select.md").read_text()
    assert {"embed", "scores", "export", "quantize", "compile", "time", "latency", "total"} <= set(cand["seconds"])
    calibration = json.loads((out / "candidates" / "efficientnet_lite0-64" / "x86-onnxruntime" /
                              "calibration.json").read_text())
    assert "timing only" in calibration["purpose"] and calibration["count"] == TIMING_CALIBRATION_IMAGES

    again = CliRunner().invoke(main, [*args, "--target", "x86-onnxruntime", "--latency-budget", "0.0001"])
    assert again.exit_code == 1, again.output
    assert "no candidate meets the 0.0001 ms budget" in again.output
    rerun = json.loads((out / "select.json").read_text())
    assert rerun["recommendation"]["status"] == "over_budget" and rerun["train_command"] is None
    assert rerun["candidates"][0]["seconds"]["embed"] == 0.0  # embeddings from the cache
    assert "quantize" not in rerun["candidates"][0]["seconds"]  # the compiled candidate too: only timed again
    assert rerun["candidates"][0]["predicted_accuracy"] == cand["predicted_accuracy"]

    jetson = CliRunner().invoke(main, [*args, "--target", "jetson-orin-nano", "--latency-budget", "5"])
    assert jetson.exit_code == 3, jetson.output
    [cand] = json.loads((out / "select.json").read_text())["candidates"]
    assert cand["latency_ms"] is None and "cannot run here" in cand["latency_note"]
    assert cand["preflight"]["checked"] == "model.int8.onnx" and isinstance(cand["preflight"]["passed"], bool)
