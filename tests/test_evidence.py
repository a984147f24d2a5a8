"""What a split can resolve: the intervals next to every parity figure (edgetransfer.evidence)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetransfer.evidence import mcnemar_exact, paired_drop, wilson
from edgetransfer.parity import Gates, Side, compare


def test_wilson_matches_the_textbook_values_and_stays_inside_0_1():
    # Newcombe (1998, Statistics in Medicine 17:857), table I: 81/263 → 0.2553–0.3662; 0/10 → 0–0.2775
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    lo, hi = wilson(300, 300)
    assert hi == 1.0 and lo == pytest.approx(0.98736, abs=1e-4)  # 300 of 300 does not prove 0.997
    assert wilson(0, 0) == (0.0, 1.0)


def test_the_exact_mcnemar_test_is_a_binomial_test_on_the_images_that_changed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for worse, better in [(2, 0), (5, 1), (7, 7), (12, 3), (0, 9)]:
        expected = scipy_stats.binomtest(worse, worse + better, 0.5).pvalue
        assert mcnemar_exact(worse, better) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(0, 0) == 1.0


def test_the_paired_drop_counts_the_changed_images_and_its_interval_holds_the_estimate():
    rng = np.random.default_rng(0)
    reference = rng.random(400) < 0.95
    candidate = reference.copy()
    right = np.flatnonzero(reference)
    candidate[right[:3]] = False          # three images made worse
    candidate[np.flatnonzero(~reference)[:1]] = True  # one made better
    d = paired_drop(reference, candidate)
    assert (d.worse, d.better, d.samples) == (3, 1, 400)
    assert d.drop == pytest.approx(0.5) and d.image_points == pytest.approx(0.25)
    lo, hi = d.interval
    assert lo < 0.5 < hi and lo < 0.0  # two net images out of 400 are not evidence of a drop
    assert d.p_value == pytest.approx(0.625)


def test_the_paired_interval_narrows_with_more_images_and_is_honest_when_nothing_changed():
    same = np.ones(300, bool)
    none_changed = paired_drop(same, same)
    assert none_changed.drop == 0.0 and none_changed.interval[0] < 0.0 < none_changed.interval[1]
    widths = []
    for n in (100, 400, 1600):
        reference = np.ones(n, bool)
        candidate = reference.copy()
        candidate[: n // 100] = False  # the same 1 % drop
        lo, hi = paired_drop(reference, candidate).interval
        assert lo <= 1.0 <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # paired is tighter than treating the two accuracies as independent samples
    n = 400
    p = 0.95
    unpaired_half = 100 * 1.96 * math.sqrt(2 * p * (1 - p) / n)
    assert widths[1] < 2 * unpaired_half


def test_every_parity_pair_carries_its_intervals_into_json_and_markdown():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 5)).astype(np.float32)
    cand = ref.copy()
    cand[0] = np.roll(cand[0], 1)  # one image changes its answer
    labels = ref.argmax(1)
    report = compare("quantization effect", Side("torch", "fp32"), Side("onnxruntime", "int8"), ref, cand, labels,
                     Gates(min_agreement=0.99, max_abs_diff=None, max_accuracy_drop=0.5))
    assert report.agreement == pytest.approx(299 / 300)
    lo, hi = report.agreement_interval
    assert lo < 0.99 < report.agreement < hi  # passes the gate, yet the split cannot tell it from 0.99
    assert report.image_points == pytest.approx(100 / 300)
    assert report.drop_evidence["worse"] == 1 and report.drop_evidence["better"] == 0
    d = report.to_dict()
    assert d["agreement_interval"] == [round(lo, 6), round(hi, 6)] and d["drop_evidence"]["p_value"] == 1.0
    from edgetransfer.parity import ParityReport

    markdown = ParityReport(classes=list("abcde"), pairs=[report]).to_markdown()
    assert "agreement [95 %]" in markdown and f"[{lo:.4f}, {hi:.4f}]" in markdown and "1 / 0" in markdown
