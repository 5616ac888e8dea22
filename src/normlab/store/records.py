"""What the store hands back: plain dataclasses, decoupled from SQLite rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Run:
    """One training run: its config, outcome and where it ran.

    ``status`` is one of ``running``, ``finished``, ``diverged``, ``failed``; ``error`` holds the exception
    message of a failed run (or the divergence reason); times are ISO-8601 UTC; ``wall_time`` in seconds.
    """

    id: int
    name: str | None
    group: str | None
    config: dict[str, Any]
    config_key: str
    status: str
    error: str | None
    started_at: str
    finished_at: str | None
    wall_time: float | None
    environment: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Artifact:
    """A file produced by a run: ``payload`` holds its bytes, or is None when only ``path`` is recorded."""

    id: int
    run_id: int
    path: str
    kind: str
    payload: bytes | None
