"""Studies: named, declarative recipes that train the variants they need, measure, and report.

``run_study("regularization", scale="quick", seeds=3, out="normlab-results")`` writes
``studies/regularization/report.html`` + ``report.md`` + figures; the contract a study module codes against
is in :mod:`normlab.studies.base`.
"""

from normlab.studies.base import (
    SCALES,
    Figure,
    Study,
    StudyContext,
    StudyOutcome,
    Table,
    mean_ci,
    t_quantile_975,
)
from normlab.studies.recipe import load_recipe, parse_recipe, validate_params
from normlab.studies.registry import get_study, list_studies
from normlab.studies.runner import render_study_folder, run_study

__all__ = [
    "SCALES",
    "Figure",
    "Study",
    "StudyContext",
    "StudyOutcome",
    "Table",
    "get_study",
    "list_studies",
    "load_recipe",
    "mean_ci",
    "parse_recipe",
    "render_study_folder",
    "run_study",
    "t_quantile_975",
    "validate_params",
]
