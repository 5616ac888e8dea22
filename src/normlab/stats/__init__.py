"""Statistics every answer of normlab rests on: intervals over seeds and the win / equivalent / unresolved /
inconclusive rule against a margin.

Pure Python on lists of floats; knows nothing of training, so ``sweep``, ``reports`` and ``studies`` share it.
"""

from normlab.stats.intervals import diff_ci, mean_ci, t_quantile_975
from normlab.stats.verdict import (
    DEFAULT_MARGIN,
    EQUIVALENT,
    INCONCLUSIVE,
    UNRESOLVED,
    WIN,
    Verdict,
    compare_arms,
    rule_text,
    seeds_to_resolve,
)

__all__ = [
    "DEFAULT_MARGIN", "EQUIVALENT", "INCONCLUSIVE", "UNRESOLVED", "WIN", "Verdict", "compare_arms", "diff_ci",
    "mean_ci", "rule_text", "seeds_to_resolve", "t_quantile_975",
]
