"""Model selection: rank backbones × input sizes by transferability to your images and by latency
measured on your target (`edgetransfer select`).

- `transferability.py`: LogME, the cross-validated linear probe, Kendall's tau-b, the Pareto front
  (numpy only);
- `ranking.py`: the recommendation rule and `select.md`;
- `core.py`: the orchestration (`select`): embeddings cached like features mode, latency through the
  quantize / compile / bench stages, the reports.

Importing this package is cheap: torch and the backends load when `select` runs.
"""

from __future__ import annotations

from .core import Candidate, SelectResult, Skipped, select
from .ranking import Recommendation, recommend
from .transferability import LogME, ProbeResult, kendall_tau_b, linear_probe_cv, logme, pareto_front

__all__ = ["Candidate", "LogME", "ProbeResult", "Recommendation", "SelectResult", "Skipped", "kendall_tau_b",
           "linear_probe_cv", "logme", "pareto_front", "recommend", "select"]
