"""Re-exported from :mod:`normlab.stats.intervals`, where the one definition of mean and interval lives."""

from normlab.stats.intervals import mean_ci, t_quantile_975

__all__ = ["mean_ci", "t_quantile_975"]
