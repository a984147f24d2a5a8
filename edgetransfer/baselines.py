"""Is the model better than guessing? Accuracy next to the two baselines any classifier must beat.

A classifier that answers one class for every image scores the share of that class: on a balanced
test set of 5 classes that is 0.200, exactly what a 2-epoch model that learned nothing scores. An
accuracy means something only next to

- **chance**: 1 / number of classes (guessing uniformly at random), and
- **majority class**: the accuracy of always answering the class that was most frequent in the
  TRAIN split (the best constant answer a model can learn without looking at the image), measured
  on the evaluated split. When several classes tie for most frequent in train, the one that scores
  best on the evaluated split is taken (the conservative choice: the baseline is never flattered).

The rule (`beats_baselines`): accuracy must exceed the stronger baseline p0 = max(chance, majority)
by two binomial standard errors of that baseline on the evaluated images,

    accuracy > p0 + 2 * sqrt(p0 * (1 - p0) / n)

Why a margin, and why this one: a test set of n images measures accuracy with sampling noise of
about sqrt(p(1-p)/n). A model no better than the baseline scores above p0 by luck alone about half
the time; above p0 + 2 standard errors only about 2 % of the time (one-sided normal approximation
of the binomial). So "beats" means "beats by more than the test set's own noise": with 200 test
images and 5 balanced classes the bar is 0.200 + 0.057 = 0.257; with 10 test images it is 0.453,
which is the honest answer for a set that small. The margin scales with the test set, so a larger
test set lowers the bar rather than the rule changing.

Not beating the baselines is a WARNING, not a failed gate (DESIGN.md's exit code 1 is for parity and
the accuracy budget): the commands still exit 0, but `train`, `validate` (parity.json/parity.md),
`bundle` (manifest) and, on the device, `verify`/`infer` print it.

Pure Python (no numpy, no torch): the device runtime reads these records from the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: standard errors of the baseline that the accuracy must clear (about a 2 % one-sided false "beats")
MARGIN_STANDARD_ERRORS = 2.0

RULE = (f"accuracy > max(chance, majority) + {MARGIN_STANDARD_ERRORS:g} binomial standard errors of that "
        "baseline on the evaluated images")


def assess(accuracy: float | None, classes: Sequence[str], train_counts: Mapping[str, int],
           eval_counts: Mapping[str, int], *, split: str = "test") -> dict[str, Any]:
    """The baselines record for `accuracy` measured on a split with per-class image counts `eval_counts`.

    `train_counts` decides the majority class; `eval_counts` measures it. `beats_baselines` is None
    when there is nothing to judge (no accuracy, or no evaluated images); `warning` is a sentence
    for people when the model does not clearly beat the baselines, else None.
    """
    n = int(sum(eval_counts.get(c, 0) for c in classes))
    chance = 1.0 / len(classes) if classes else 0.0
    top = max((train_counts.get(c, 0) for c in classes), default=0)
    tied = [c for c in classes if train_counts.get(c, 0) == top] if top > 0 else []
    majority_class = max(tied, key=lambda c: eval_counts.get(c, 0), default=None)
    majority = eval_counts.get(majority_class, 0) / n if majority_class is not None and n else None
    baseline = max(chance, majority or 0.0)
    margin = MARGIN_STANDARD_ERRORS * math.sqrt(baseline * (1.0 - baseline) / n) if n else None
    record: dict[str, Any] = {
        "split": split, "samples": n, "accuracy": accuracy, "chance": chance, "majority_class": majority_class,
        "majority": majority, "baseline": baseline, "margin": margin,
        "threshold": None if margin is None else baseline + margin, "rule": RULE, "beats_baselines": None,
        "warning": None}
    if accuracy is None or not n:
        return record
    record["beats_baselines"] = bool(accuracy > record["threshold"])
    if not record["beats_baselines"]:
        record["warning"] = warning_text(record)
    return record


def warning_text(record: Mapping[str, Any]) -> str:
    """One sentence: the accuracy, both baselines and the bar it missed."""
    majority = ("" if record.get("majority") is None else
                f", always answering the train split's majority class '{record['majority_class']}' scores "
                f"{record['majority']:.3f}")
    return (f"{record['split']} accuracy {record['accuracy']:.3f} does not clearly beat the baselines (chance "
            f"{record['chance']:.3f}{majority}; it needs more than {record['threshold']:.3f}, the stronger baseline "
            f"+ {MARGIN_STANDARD_ERRORS:g} standard errors on {record['samples']} images): this model may be no "
            "better than guessing")


def warning_of(record: Mapping[str, Any] | None) -> str | None:
    """The warning of a stored record (None when it beat the baselines, or could not be judged)."""
    if not isinstance(record, Mapping) or record.get("beats_baselines") is not False:
        return None
    return record.get("warning") or warning_text(record)


def summary_line(record: Mapping[str, Any]) -> str:
    """'chance 0.200, majority 'ok' 0.200, needs > 0.257: beaten' — for logs and tables."""
    parts = [f"chance {record['chance']:.3f}"]
    if record.get("majority") is not None:
        parts.append(f"majority class '{record['majority_class']}' {record['majority']:.3f}")
    if record.get("threshold") is not None:
        parts.append(f"needs > {record['threshold']:.3f} on {record['samples']} images")
    verdict = {True: "beaten", False: "NOT beaten", None: "not judged"}[record.get("beats_baselines")]
    return ", ".join(parts) + f": {verdict}"
