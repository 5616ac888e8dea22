"""Models and data from the user: ``package.module:factory`` / ``path/to/file.py:factory`` specs, building
them with a chosen normalization, and fingerprints of their code and data for the run key.

Importing a spec runs code: the CLI imports only specs given as ``--model`` on its command line (never one
read from a config, checkpoint or recipe); see ``docs/external.md``.
"""

from normlab.external.build import apply_norm, build_external_model, check_outputs, takes_option
from normlab.external.fingerprint import data_fingerprint, file_sha256, folder_fingerprint, model_fingerprint
from normlab.external.spec import is_model_spec, load_factory, spec_file, spec_of, split_spec

__all__ = [
    "apply_norm", "build_external_model", "check_outputs", "data_fingerprint", "file_sha256",
    "folder_fingerprint", "is_model_spec", "load_factory", "model_fingerprint", "spec_file", "spec_of",
    "split_spec", "takes_option",
]
