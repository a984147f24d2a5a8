"""From scored candidates to one recommendation, and the report a person reads (select.md).

The recommendation rule: the candidates within the latency budget (every measured one without a
budget); the best predicted accuracy among them; of the candidates whose predicted accuracy is
within one standard error of that best (indistinguishable on this many images), the fastest.
Without any latency measured here (a TensorRT target off its device), the most accurate candidate
the target can build, and with a budget no recommendation at all: it cannot be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["recommended", "over_budget", "unmeasured", "none_usable"]


@dataclass(frozen=True)
class Recommendation:
    index: int | None          # into the candidate list; None when there is no recommendation
    status: Status
    message: str


def recommend(candidates: list[Any], budget_ms: float | None, *, target: str) -> Recommendation:
    """Pick one candidate (see the module docstring). `candidates` need `predicted_accuracy`,
    `standard_error`, `latency_ms`, `size`, `label`, `usable` and `latency_note`."""
    usable = [i for i, c in enumerate(candidates) if c.usable]
    if not usable:
        reasons = "; ".join(f"{c.label}: {c.latency_note or c.error}" for c in candidates[:3])
        return Recommendation(None, "none_usable", f"no candidate can be built and run for {target} ({reasons})")
    measured = [i for i in usable if candidates[i].latency_ms is not None]

    def acc(i: int) -> float:
        return candidates[i].predicted_accuracy

    def fastest_first(i: int) -> tuple[float, float]:
        return candidates[i].latency_ms, -acc(i)

    if budget_ms is not None:
        if not measured:
            top = max(usable, key=lambda i: (acc(i), -candidates[i].size))
            return Recommendation(None, "unmeasured", (
                f"the {budget_ms:g} ms budget cannot be checked here: {candidates[top].latency_note}. Most accurate "
                f"without it: {candidates[top].label} (predicted accuracy {acc(top):.3f})"))
        feasible = [i for i in measured if candidates[i].latency_ms <= budget_ms]
        if not feasible:
            quick = min(measured, key=fastest_first)
            c = candidates[quick]
            return Recommendation(None, "over_budget", (
                f"no candidate meets the {budget_ms:g} ms budget on {target}: the fastest, {c.label}, takes "
                f"{c.latency_ms:.2f} ms (predicted accuracy {c.predicted_accuracy:.3f}). Raise the budget, or try "
                "smaller input sizes or backbones"))
    else:
        feasible = measured or usable
    if not measured:  # nothing timed here: accuracy alone, the smaller input on a tie
        pick = max(feasible, key=lambda i: (acc(i), -candidates[i].size))
        c = candidates[pick]
        return Recommendation(pick, "recommended", (
            f"{c.label}: predicted accuracy {c.predicted_accuracy:.3f} ± {c.standard_error:.3f}; latency "
            f"{c.latency_note or 'not measured'}"))
    best = max(feasible, key=lambda i: (acc(i), -candidates[i].latency_ms))
    near = [i for i in feasible if acc(i) >= acc(best) - candidates[best].standard_error]
    pick = min(near, key=fastest_first)
    c = candidates[pick]
    message = (f"{c.label}: predicted accuracy {c.predicted_accuracy:.3f} ± {c.standard_error:.3f}, "
               f"{c.latency_ms:.2f} ms batch-1 p50 on {target}")
    if budget_ms is not None:
        message += f" (budget {budget_ms:g} ms)"
    if pick != best:
        b = candidates[best]
        message += (f"; the most accurate, {b.label} ({b.predicted_accuracy:.3f}, {b.latency_ms:.2f} ms), is within "
                    "one standard error of it and slower")
    return Recommendation(pick, "recommended", message)


#: p90 / p50 of a latency above this: the timing shared the CPU with something else
NOISY_RATIO = 1.5


def latency_warning(candidates: list[Any]) -> str | None:
    """A warning when the latencies were measured on a busy machine (p90 above 1.5 × p50 for some)."""
    timed = [c for c in candidates if c.latency_ms is not None and c.latency_p90_ms is not None]
    noisy = [c for c in timed if c.latency_p90_ms > NOISY_RATIO * c.latency_ms]
    if not noisy:
        return None
    worst = max(noisy, key=lambda c: c.latency_p90_ms / c.latency_ms)
    return (f"latency was measured on a busy machine: p90 is above {NOISY_RATIO:g}x p50 for {len(noisy)} of "
            f"{len(timed)} candidates (worst {worst.label}: {worst.latency_ms:.2f} ms p50, {worst.latency_p90_ms:.2f} "
            "ms p90), so close latencies may rank in the wrong order; run the same command again on an idle "
            "machine (same --out: it only times the compiled candidates again)")


def ranked(candidates: list[Any]) -> list[int]:
    """Candidate indices by predicted accuracy (best first), faster first on a tie."""
    return sorted(range(len(candidates)), key=lambda i: (
        -candidates[i].predicted_accuracy,
        candidates[i].latency_ms if candidates[i].latency_ms is not None else float("inf"), candidates[i].size))


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(result: Any) -> str:
    """select.md: the ranking table, the recommendation and its train command, what was skipped, how."""
    from .core import METHOD

    rec = result.recommended
    budget = result.latency_budget_ms
    lines = [f"# Backbone selection for {result.target}", "",
             f"Data `{result.data}`: {result.candidates[0].samples if result.candidates else 0} train + val images "
             "(the test split is not read). Ranked by predicted accuracy = " + result.ranks_by + "; LogME next to it.",
             "", "| rank | backbone | input | predicted accuracy | ± SE | head's input alone | LogME "
             "| latency b1 p50 (ms) | p90 (ms) | ran | Pareto front | "
             + (f"≤ {budget:g} ms | " if budget is not None else "") + "note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|" + ("---|" if budget is not None else "") + "---|"]
    for rank, i in enumerate(ranked(result.candidates), 1):
        c = result.candidates[i]
        note = c.latency_note or ""
        if c.preflight is not None:
            note = ("preflight: builds. " if c.preflight.get("passed") else "preflight: CANNOT BUILD. ") + note
        mark = "**" if c is rec else ""
        lines.append(f"| {rank} | {mark}{c.backbone}{mark} | {c.size} | {c.predicted_accuracy:.3f} | "
                     f"{c.standard_error:.3f} | {c.head_probe_accuracy:.3f} | {c.logme:.4f} | {_ms(c.latency_ms)} | "
                     f"{_ms(c.latency_p90_ms)} | "
                     f"{c.precision or '—'} | {'yes' if c.on_front else ''} | "
                     + ("" if budget is None else ("—" if c.within_budget is None else
                                                   "yes" if c.within_budget else "no") + " | ")
                     + f"{note} |")
    lines += [f"\n**Warning:** {w}." for w in result.warnings]
    lines += ["", f"**Recommendation:** {result.recommendation.message}." if rec is not None else
              f"**No recommendation:** {result.recommendation.message}."]
    if result.train_command:
        lines += ["", "Train it (the demo's finetune recipe at this input size):", "", "```bash",
                  result.train_command, "```"]
    if result.skipped:
        lines += ["", "Skipped:", ""] + [f"- `{s.backbone}`: {s.reason}" for s in result.skipped]
    lines += ["", "How the numbers were made:", ""] + [f"- **{k.replace('_', ' ')}**: {v}." for k, v in METHOD.items()]
    m = result.machine
    lines += ["", f"Measured on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('platform', '?')}); "
                  f"`select` took {result.seconds:.0f} s.", ""]
    return "\n".join(lines)
