"""Figures of single probe results: the 2-D loss landscape and the Hessian eigenvalue density.

``probe_figure(name, result, path)`` draws the result of probe ``name`` (a result object or its
``to_dict()``) into ``path`` (.png or .svg): the landscape as filled contours of the loss over the plane
(Li et al. 2018, Fig. 1 and 6; the checkpoints of a plane through them marked), the density as PyHessian's
plot (log density against eigenvalue, Yao et al. 2020, Fig. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError

FIGURE_SIZE = (6.4, 4.8)  # inches; at the 110 dpi of every report figure about 700 px wide


def _values(result: Any) -> dict[str, Any]:
    return result if isinstance(result, dict) else result.to_dict()


def _landscape_2d(values: dict[str, Any], ax) -> None:
    import numpy as np

    alphas, betas = np.array(values["alphas"]), np.array(values["betas"])
    losses = np.array(values["losses"], dtype=float)
    # Losses span orders of magnitude away from a minimum: contour their log, label in loss units.
    positive = np.isfinite(losses) & (losses > 0)
    shown = np.where(positive, np.log10(np.where(positive, losses, 1.0)), np.nan)
    if len(alphas) > 1 and len(betas) > 1:
        filled = ax.contourf(alphas, betas, shown.T, levels=20, cmap="viridis")
        ax.contour(alphas, betas, shown.T, levels=10, colors="white", linewidths=0.5, alpha=0.6)
        bar = ax.figure.colorbar(filled, ax=ax)
        bar.set_label("loss (log10)")
    ax.plot([0], [0], marker="*", color="red", markersize=12, linestyle="none", label="W (probed)")
    if values.get("directions") == "checkpoints":
        ax.plot([1], [0], marker="o", color="orange", linestyle="none", label="checkpoint A")
        ax.plot([0], [1], marker="s", color="orange", linestyle="none", label="checkpoint B")
        ax.set_xlabel("alpha: W + alpha (A - W)")
        ax.set_ylabel("beta: + beta (B - W)")
    else:
        ax.set_xlabel("alpha (filter-normalized direction 1)")
        ax.set_ylabel("beta (filter-normalized direction 2)")
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(f"loss on a plane through W (mode {values['mode']}; at W {values['loss']:.4g})")


def _hessian_density(values: dict[str, Any], ax) -> None:
    grid, density = values["grid"], values["density"]
    ax.semilogy(grid, [d + 1e-7 for d in density], color="tab:blue")  # PyHessian's floor, so log(0) draws
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    trace = values["trace"]
    error = values.get("trace_std_error")
    text = f"trace {trace:.4g}" + (f" ± {error:.2g}" if error is not None and math.isfinite(error) else "")
    ax.set_title(f"Hessian eigenvalue density (SLQ, {values['runs']} x {values['iterations']} steps); {text}")
    for edge in (values["lambda_min"], values["lambda_max"]):
        ax.axvline(edge, color="gray", linestyle=":", linewidth=1)


FIGURES: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "hessian_density": _hessian_density,
    "landscape_2d": _landscape_2d,
}


def probe_figure(name: str, result: Any, path: str | Path, dpi: int = 110) -> Path:
    """Draw probe ``name``'s ``result`` into ``path`` (.png or .svg); returns the path."""
    if name not in FIGURES:
        raise NormlabError(f"no figure for probe {name!r}; probes with figures: {', '.join(sorted(FIGURES))}")
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise NormlabError(f"figure file {str(path)!r} must end in .png or .svg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    try:
        FIGURES[name](_values(result), ax)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
