"""Anomaly detection from good parts only, for real on tiny data: the score numbers (AUROC, ranks,
threshold), the coreset, the scorer against a brute-force nearest-neighbour, the fit's refusals
(nothing written), and the run going through export, INT8 (distances kept fp32) and validate.

The AUROC a factory would see is measured in benchmarks/anomaly.py, not here: these images are tiny."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgetransfer.anomaly.fit import fit_anomaly, load_scorer
from edgetransfer.anomaly.metrics import auroc, choose_threshold, spearman
from edgetransfer.anomaly.patchcore import PatchCoreConfig, PatchFeatures, greedy_coreset
from edgetransfer.cli import main
from edgetransfer.errors import UsageError

TINY = dict(img_size=64, bank_size=60, batch_size=8)


# ---- numbers -------------------------------------------------------------------------------------

def _pairwise_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_is_the_probability_a_defect_outscores_a_good_part():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # rounded: many ties, which count half
    positive = rng.random(200) < 0.3
    scores[positive] += 0.7
    assert auroc(scores, positive) == pytest.approx(_pairwise_auroc(scores, positive), abs=1e-12)
    assert auroc(scores, positive) > 0.6
    assert auroc(-scores, positive) == pytest.approx(1 - auroc(scores, positive))
    assert np.isnan(auroc(scores, np.zeros(200, bool)))


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed():
    x = np.random.default_rng(1).normal(size=50)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    y = x + np.random.default_rng(2).normal(size=50)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 -- no ties here
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_threshold_best_f1_sits_between_the_groups_and_good_only_uses_the_quantile():
    good, bad = np.linspace(0.1, 1.0, 40), np.linspace(2.0, 3.0, 10)
    t = choose_threshold(np.r_[good, bad], np.r_[np.zeros(40, bool), np.ones(10, bool)])
    assert t.method == "best_f1" and t.value == 1.0 and 1.0 < t.raw < 2.0
    assert t.raw * t.scale == pytest.approx(0.5)
    q = choose_threshold(good, np.zeros(40, bool), good_quantile=0.9)
    assert q.method == "good_quantile" and q.raw == pytest.approx(np.quantile(good, 0.9))


def test_greedy_coreset_picks_one_patch_per_far_apart_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [10.0] * 8, [-10.0] * 8, [10.0] * 4 + [-10.0] * 4])
    points = torch.cat([c + 0.1 * torch.randn(50, 8, generator=g) for c in centres])
    chosen = greedy_coreset(points, 4, dims=4, seed=0)  # in 4 projected dims, as for wide features
    assert len(set(chosen.tolist())) == 4
    assert sorted(int(i) // 50 for i in chosen) == [0, 1, 2, 3]
    assert len(greedy_coreset(points, 500, dims=8, seed=0)) == len(points)


# ---- one fitted run, shared ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def anomaly_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("anomaly") / "run"
    return fit_anomaly(tiny_data, out, PatchCoreConfig(**TINY))


def test_the_fit_writes_a_run_with_its_threshold_bank_and_per_type_auroc(anomaly_run):
    meta = anomaly_run.meta
    assert meta.task == "anomaly" and meta.anomaly["good"] == "ok"
    assert meta.anomaly["bank"]["patches"] == TINY["bank_size"]
    assert meta.anomaly["threshold"]["method"] == "best_f1"  # val holds defects
    assert set(meta.metrics["test_auroc_per_type"]) == {"crack", "hole", "scratch", "stain"}
    saved = json.loads((anomaly_run.run / "meta.json").read_text())
    assert saved["task"] == "anomaly" and saved["weights_sha256"]
    # the recorded figures are what the saved scorer does on the test split, decided at 0.5
    from edgetransfer.anomaly.fit import raw_scores
    from edgetransfer.stages import run_splits

    test = run_splits(meta).test
    scores = raw_scores(load_scorer(anomaly_run.run), test, meta.input_spec, 8, "test")
    defective = np.array([s.label for s in test]) != meta.classes.index("ok")
    assert meta.metrics["test_auroc"] == pytest.approx(auroc(scores, defective), abs=1e-6)
    assert meta.metrics["test_decision_accuracy"] == pytest.approx(((scores >= 0.5) == defective).mean(), abs=1e-6)


def test_the_scorer_is_nearest_neighbour_distance_to_the_bank(anomaly_run, tiny_data):
    scorer = load_scorer(anomaly_run.run)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = scorer.features(x).double()
        patches = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        brute = torch.cdist(patches, scorer.bank_t.t().double()).min(1).values.reshape(3, 1, *feats.shape[-2:])
        assert torch.allclose(scorer.patch_distances(x).double(), brute, rtol=1e-4, atol=1e-3)
        # a bank patch itself is at distance 0 from the bank
        bank = scorer.bank_t.t()
        d2 = (bank * bank).sum(1, keepdim=True) - 2 * bank @ scorer.bank_t + scorer.bank_sq
        assert d2.amin(1).clamp_min(0).sqrt().max() < 1e-2 * bank.norm(dim=1).mean()
        score, heat = scorer(x)
    assert score.shape == (3,) and heat.shape == (3, 64, 64)
    inner = scorer.patch_distances(x)[..., 1:-1, 1:-1]  # ignore_border 1: the score is the inner cells' max
    assert torch.allclose(score, inner.amax((1, 2, 3)) * scorer.scale)
    assert score.std() > 0  # not a constant


def test_export_is_one_graph_with_score_and_map_that_matches_torch(anomaly_run):
    from edgetransfer.export import export_onnx

    path = export_onnx(anomaly_run.run)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["score", "anomaly_map"]
    scorer = load_scorer(anomaly_run.run)
    for n in (1, 5):  # dynamic batch
        x = np.random.default_rng(n).normal(size=(n, 3, 64, 64)).astype(np.float32)
        score, heat = session.run(None, {"input": x})
        with torch.no_grad():
            ref_score, ref_heat = scorer(torch.from_numpy(x))
        np.testing.assert_allclose(score, ref_score.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(heat, ref_heat.numpy(), rtol=1e-4, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops and "Loop" not in ops and "ReduceMin" in ops


def test_int8_keeps_the_distances_fp32_and_validate_judges_scores(anomaly_run, tmp_path):
    from edgetransfer.stages import compile_run, quantize_run
    from edgetransfer.validate import validate

    run = tmp_path / "run"
    shutil.copytree(anomaly_run.run, run)
    if not (run / "model.onnx").exists():
        from edgetransfer.export import export_onnx

        export_onnx(run)
    result = quantize_run(run, "x86-onnxruntime")
    assert result.report.metric == "auroc" and result.report.float_nodes
    model = onnx.load(str(result.model))
    producer = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                           for n in matmuls for i in n.input), "the bank distances must read fp32 tensors"
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)  # the backbone is INT8
    compile_run(run, "x86-onnxruntime", allow_failed=True)  # a tiny scorer: the gates are not the point here
    report = validate(run, target="x86-onnxruntime")
    data = json.loads((run / "x86-onnxruntime" / "parity.json").read_text())
    pair = next(p for p in data["pairs"] if p["pair"].startswith("quantization effect"))
    for key in ("reference_auroc", "candidate_auroc", "auroc_drop", "decision_agreement", "score_spearman",
                "max_abs_diff_rel", "mean_abs_diff_rel"):
        assert key in pair
    assert data["summary"]["task"] == "anomaly" and data["artifact_files"]
    assert report.pairs[0].decision_agreement == 1.0  # export fidelity
    assert (run / "x86-onnxruntime" / "parity.png").stat().st_size > 0
    # the worst disagreements are named, and drawn with both sides' maps
    worst = data["context"]["worst disagreements (parity_maps.png)"].split("; ")
    assert len(worst) == min(5, data["context"]["samples"])
    assert (run / "x86-onnxruntime" / "parity_maps.png").stat().st_size > 0

    # ship it: the golden set is judged by scores, the device runtime answers score + decision
    from edgetransfer.bundle import verify_bundle, write_bundle
    from edgetransfer.preprocess import load_image, preprocess
    from edgetransfer.runtime import open_bundle

    if not report.passed:  # tiny data: gates may fail; the bundle path is what is tested here
        pytest.skip(f"validate failed on tiny data: {[p.failures for p in report.pairs if p.failures]}")
    shipped = write_bundle(run, "x86-onnxruntime", tmp_path / "bundle")
    assert shipped.manifest["task"] == "anomaly" and shipped.manifest["anomaly"]["good"] == "ok"
    check = verify_bundle(shipped.folder)
    assert check.passed and check.golden.decision_agreement == 1.0
    image = next((tiny_data_dir(run) / "test" / "hole").glob("*.png"))
    session = ort.InferenceSession(str(run / "x86-onnxruntime" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = preprocess(load_image(image), load_meta(run).input_spec)[None]
    score, heat = session.run(None, {"input": x})
    expected = float(score[0])
    with open_bundle(shipped.folder) as model:
        p = model.predict(image)
    assert p.score == pytest.approx(expected, rel=1e-5)
    assert p.label == ("defect" if expected >= 0.5 else "ok") and p.index == int(expected >= 0.5)
    assert p.anomaly_map.shape == x.shape[2:]  # the map comes with the score, over the model's input
    np.testing.assert_allclose(p.anomaly_map, heat[0], rtol=1e-5, atol=1e-6)

    # infer writes one overlay per frame and names it in the frame's record
    folder = tiny_data_dir(run) / "test" / "hole"
    pictures = tmp_path / "overlays"
    result = CliRunner().invoke(main, ["infer", str(shipped.folder), str(folder), "--overlays", str(pictures)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == len(list(folder.glob("*.png"))) and len({r["overlay"] for r in records}) == len(records)
    from PIL import Image

    for r in records:
        with Image.open(r["overlay"]) as im:
            assert im.size == (x.shape[3], x.shape[2])
    assert sorted(p.name for p in pictures.iterdir()) == sorted(Path(r["overlay"]).name for r in records)


def test_the_worst_disagreements_are_the_flipped_decisions_first():
    from edgetransfer.anomaly.validate import worst_disagreements

    reference = np.array([0.10, 0.45, 0.90, 0.20, 0.55, 0.30])
    deployed = np.array([0.40, 0.52, 0.91, 0.21, 0.49, 0.31])  # 1 and 4 flip (small Δ); 0 moves most, same side
    assert worst_disagreements(reference, deployed, count=3) == [1, 4, 0]


def test_an_overlay_is_red_where_the_map_is_hot_and_blue_where_it_is_cold():
    from PIL import Image

    from edgetransfer.runtime.overlay import overlay

    view = Image.new("RGB", (40, 30), (128, 128, 128))
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[15:25, 20:35] = 1.0
    picture = np.asarray(overlay(view, heat, score=0.9, label="defect"))
    hot, cold = picture[20, 27], picture[25, 5]
    assert hot[0] > hot[2] + 60 and cold[2] > cold[0] + 60
    with pytest.raises(ValueError, match="cannot lie over"):
        overlay(view, heat.T, score=0.9, label="defect")


def test_openvino_hands_back_every_output_of_the_scorer_by_name(anomaly_run, tmp_path):
    from edgetransfer.backends import get_backend
    from edgetransfer.targets import load_target

    run = tmp_path / "run"
    shutil.copytree(anomaly_run.run, run)
    if not (run / "model.onnx").exists():
        from edgetransfer.export import export_onnx

        export_onnx(run)
    backend = get_backend("openvino")
    if (why := backend.available()) is not None:
        pytest.skip(why)
    xml = backend.compile(run / "model.onnx", load_target("intel-cpu"), tmp_path / "ov")
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with backend.load(xml) as runner:
        outs = runner.infer_outputs(x)
        first = runner.infer(x)
    assert list(outs) == ["score", "anomaly_map"]
    np.testing.assert_allclose(outs["score"], expected[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(outs["anomaly_map"], expected[1], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(first, outs["score"])


def test_the_scorer_graph_passes_tensorrt_preflight_at_opset_17_and_18(anomaly_run, tmp_path):
    """Reflect/edge Pad, ReduceMin/Max over the bank, MatMul: every op on TensorRT 8.5's and 10's tables;
    TensorRT 8.5 (Xavier NX) reads opset 17, to which ONNX's converter has no Pad adapter of its own."""
    from edgetransfer.backends.tensorrt.preflight import preflight
    from edgetransfer.export import export_onnx
    from edgetransfer.targets import load_target

    run = tmp_path / "run"
    shutil.copytree(anomaly_run.run, run)
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    answers = {}
    for opset, target in ((18, "jetson-orin-nano"), (17, "jetson-xavier-nx")):
        path = run / "model.onnx"  # the module's opset-18 export, when an earlier test made it
        if opset != 18 or not path.exists():
            path = export_onnx(run, out=tmp_path / f"model{opset}.onnx", opset=opset)
        model = onnx.load(str(path))
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        report = preflight(path, load_target(target))
        assert report.passed, report.to_markdown()
        assert {"Pad", "MatMul", "ReduceMin"} <= {r.op for r in report.operators}
        answers[opset] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for a, b in zip(answers[17], answers[18]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def tiny_data_dir(run: Path) -> Path:
    return Path(load_meta(run).data["root"])


def load_meta(run: Path):
    from edgetransfer.spec import RunMeta

    return RunMeta.load(run / "meta.json")


# ---- refusals: exit 2, nothing written ------------------------------------------------------------

def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_train_folder_without_the_good_class_is_exit_2_and_writes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = _cli("train", str(tiny_data), "--task", "anomaly", "--good", "flawless", "--img-size", "64",
                  "--out", str(out))
    assert result.exit_code == 2 and "flawless" in result.output
    assert not out.exists() or not any(p.name != "edgetransfer.log" for p in out.iterdir())


def test_a_bank_over_its_memory_bound_is_refused_before_any_image_is_read(tiny_data, tmp_path, monkeypatch):
    import edgetransfer.anomaly.fit as fit

    monkeypatch.setattr(fit, "_patch_pool", lambda *a, **k: pytest.fail("images were read"))
    out = tmp_path / "run"
    result = _cli("train", str(tiny_data), "--task", "anomaly", "--img-size", "64", "--bank-size", "5000000",
                  "--max-bank-mb", "16", "--out", str(out))
    assert result.exit_code == 2 and "max_bank_mb" in result.output
    assert not out.exists() or not any(p.name != "edgetransfer.log" for p in out.iterdir())


def test_nan_features_are_refused_and_nothing_is_written(tiny_data, tmp_path):
    import timm

    from edgetransfer.anomaly.fit import _patch_pool
    from edgetransfer.data.folder import scan_dataset
    from edgetransfer.spec import InputSpec

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.bn1.running_var.fill_(-1.0)  # sqrt of a negative variance: NaN from the first layer on
    features = PatchFeatures(model, (3, 4), 3, pad=16, centre=True).eval()
    splits = scan_dataset(tiny_data, held_out_classes=True)
    with pytest.raises(UsageError, match="NaN"):
        _patch_pool(features, splits.train[:4], InputSpec.square(64), PatchCoreConfig(**TINY))


def test_held_out_classes_let_val_and_test_hold_defects_that_train_lacks(tiny_data, tmp_path):
    from edgetransfer.data.folder import scan_dataset

    data = tmp_path / "mvtec-like"
    shutil.copytree(tiny_data / "train" / "ok", data / "train" / "good")
    for split in ("val", "test"):
        shutil.copytree(tiny_data / split / "ok", data / split / "good")
        shutil.copytree(tiny_data / split / "hole", data / split / "hole")
    with pytest.raises(Exception, match="train does not have"):
        scan_dataset(data)  # a classifier cannot learn a class it never saw
    splits = scan_dataset(data, held_out_classes=True)
    assert splits.classes == ["good", "hole"] and {s.label for s in splits.train} == {0}
    result = fit_anomaly(data, tmp_path / "run", PatchCoreConfig(**TINY, good="ok"))  # "ok" finds "good"
    assert result.meta.anomaly["good"] == "good" and "hole" in result.meta.metrics["test_auroc_per_type"]
