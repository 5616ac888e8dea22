"""Statistics every answer of normlab rests on: intervals over seeds and the win / tie / inconclusive rule.

Pure Python on lists of floats; knows nothing of training, so ``sweep``, ``reports`` and ``studies`` share it.
"""

from normlab.stats.intervals import diff_ci, mean_ci, t_quantile_975
from normlab.stats.verdict import INCONCLUSIVE, RULE, TIE, WIN, Verdict, compare_arms

__all__ = [
    "INCONCLUSIVE", "RULE", "TIE", "WIN", "Verdict", "compare_arms", "diff_ci", "mean_ci", "t_quantile_975",
]
