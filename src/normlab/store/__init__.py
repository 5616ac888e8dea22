"""The results store: runs, scalar metrics and artifacts in one SQLite file (see :class:`Store`)."""

from normlab.store.environment import environment_info
from normlab.store.keys import canonical_json, config_key
from normlab.store.records import Artifact, Run
from normlab.store.schema import RUN_STATUSES, SCHEMA_VERSION
from normlab.store.store import Owner, Store, default_store_path

__all__ = [
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Artifact",
    "Owner",
    "Run",
    "Store",
    "canonical_json",
    "config_key",
    "default_store_path",
    "environment_info",
]
