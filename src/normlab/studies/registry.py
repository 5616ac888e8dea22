"""Study name -> recipe: the built-in recipes live in ``normlab/studies/recipes/<name>.toml``."""

from __future__ import annotations

from pathlib import Path

from normlab.errors import NormlabError
from normlab.studies.base import Study
from normlab.studies.recipe import load_recipe, validate_params

RECIPES_DIR = Path(__file__).parent / "recipes"


def list_studies() -> list[str]:
    """Names of the built-in studies, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def get_study(name_or_path: str | Path) -> Study:
    """Load a built-in study by name, or any recipe by path (``*.toml``), validated against its module.

    Raises:
        NormlabError: unknown study (the message lists the valid names) or an invalid recipe.
    """
    text = str(name_or_path)
    if text.endswith(".toml"):
        study = load_recipe(Path(text))
    else:
        path = RECIPES_DIR / f"{text}.toml"
        if not path.is_file():
            raise NormlabError(f"unknown study {text!r}; valid studies: {', '.join(list_studies())}")
        study = load_recipe(path)
        if study.name != text:
            raise NormlabError(f"recipe {path}: field 'name' is {study.name!r}, expected {text!r}")
    spec = getattr(study.load_module(), "PARAMS", None)
    if spec:
        validate_params(study, spec)
    return study
