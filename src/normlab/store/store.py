"""The results store: one SQLite file per project directory (runs, scalar metrics, artifacts).

Safe for several processes at once: WAL journal (readers never block the writer), a busy timeout, every
write in one ``BEGIN IMMEDIATE`` transaction retried with backoff while another process holds the lock.
A file that is not a normlab store, or is corrupt, is refused with a :class:`NormlabError` naming it and is
never modified or deleted. A ``Store`` pickles as its path, so a process-pool worker reopens the same file.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from normlab.errors import NormlabError
from normlab.store.environment import environment_info
from normlab.store.keys import canonical_json, config_key
from normlab.store.records import Artifact, Run
from normlab.store.schema import RUN_STATUSES, SCHEMA_VERSION, TABLES

DEFAULT_PATH = Path(".normlab") / "results.sqlite"
_BUSY_TIMEOUT_S = 30.0
_RETRY_FOR_S = 120.0
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUN_COLUMNS = (
    "id, name, run_group, config, config_key, status, error, started_at, finished_at, wall_time, "
    "environment, summary"
)

T = TypeVar("T")


def default_store_path() -> Path:
    """``$NORMLAB_STORE`` if set, else ``./.normlab/results.sqlite``."""
    return Path(os.environ.get("NORMLAB_STORE") or DEFAULT_PATH)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """Runs, metrics and artifacts in one SQLite file.

    Args:
        path: the SQLite file; default :func:`default_store_path`. Its folder is created if missing.

    Raises:
        NormlabError: ``path`` is a folder, is not an SQLite file, is corrupt, or was written by a newer
            schema version.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        if self.path.is_dir():
            raise NormlabError(f"store path {str(self.path)!r} is a folder; give the path of an SQLite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open()

    # -- connection -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            # Reading the header is where SQLite notices a file that is not a database.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise NormlabError(
                    f"store {str(self.path)!r} has schema version {version}; this normlab reads up to "
                    f"{SCHEMA_VERSION}: upgrade normlab"
                )
            if version == 0:
                self._retry(lambda: self._create_schema(conn))
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise NormlabError(
                f"cannot open results store {str(self.path)!r}: {exc}; it is not a normlab SQLite store "
                "(the file was left untouched)"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check inside the lock: another process may have created the schema meanwhile.
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                existing = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if existing:
                    raise NormlabError(
                        f"{str(self.path)!r} is an SQLite file with other tables, not a normlab store "
                        "(the file was left untouched)"
                    )
                for statement in TABLES.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _retry(self, fn: Callable[[], T]) -> T:
        # busy_timeout covers most contention; this covers the cases SQLite reports at once
        # (e.g. a lock upgrade that would deadlock) by backing off and trying the whole transaction again.
        delay, deadline = 0.01, time.monotonic() + _RETRY_FOR_S
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                message = str(exc).lower()
                if ("locked" not in message and "busy" not in message) or time.monotonic() > deadline:
                    raise self._error(exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except sqlite3.DatabaseError as exc:  # e.g. "database disk image is malformed"
                raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> NormlabError:
        return NormlabError(f"results store {str(self.path)!r}: {exc} (nothing was deleted)")

    def _write(self, statements: Callable[[sqlite3.Connection], T]) -> T:
        def transaction() -> T:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                out = statements(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return out

        return self._retry(transaction)

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self._retry(lambda: self._conn.execute(sql, tuple(params)).fetchall())

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return "\n".join(row[0] for row in self._read("PRAGMA integrity_check"))

    # -- writing ----------------------------------------------------------------------------------

    def start_run(
        self,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        group: str | None = None,
        environment: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> int:
        """Record a new run with status ``running``; returns its id.

        ``key`` defaults to :func:`config_key` of ``config``; a caller whose config holds fields that do not
        change the result (labels, paths) passes the key of the fields that do.
        """
        config_json = canonical_json(config)
        env = dict(environment) if environment is not None else environment_info()
        return self._write(
            lambda c: c.execute(
                "INSERT INTO runs (name, run_group, config, config_key, status, started_at, environment) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (name, group, config_json, key or config_key(config), _now(), json.dumps(env)),
            ).lastrowid
        )

    def reopen_run(self, run_id: int) -> None:
        """Set a run back to ``running`` (resuming from a checkpoint); its metrics are kept."""
        self._require_run(run_id)
        self._write(
            lambda c: c.execute(
                "UPDATE runs SET status = 'running', error = NULL, finished_at = NULL WHERE id = ?", (run_id,)
            )
        )

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        summary: Mapping[str, Any] | None = None,
        error: str | None = None,
        wall_time: float | None = None,
    ) -> None:
        """Close a run with ``status`` in ``finished``/``diverged``/``failed`` and its summary."""
        if status not in RUN_STATUSES or status == "running":
            raise NormlabError(f"status {status!r} cannot end a run; allowed: finished, diverged, failed")
        self._require_run(run_id)
        # Python's JSON keeps NaN/inf (a diverged loss) and reads them back; exports turn them into null.
        summary_json = json.dumps(dict(summary or {}))
        self._write(
            lambda c: c.execute(
                "UPDATE runs SET status = ?, error = ?, summary = ?, wall_time = ?, finished_at = ? "
                "WHERE id = ?",
                (status, error, summary_json, wall_time, _now(), run_id),
            )
        )

    def log_metrics(self, run_id: int, step: int, values: Mapping[str, float]) -> None:
        """Write the scalar ``values`` of ``run_id`` at ``step`` (a rewrite of the same step replaces)."""
        self.log_metric_rows([(run_id, step, name, value) for name, value in values.items()])

    def log_metric(self, run_id: int, step: int, name: str, value: float) -> None:
        self.log_metric_rows([(run_id, step, name, value)])

    def log_metric_rows(self, rows: Iterable[tuple[int, int, str, float]]) -> None:
        """Write many ``(run_id, step, name, value)`` rows in one transaction (NaN is stored as NULL)."""
        clean = [(int(r), int(s), str(n), _float_or_none(v)) for r, s, n, v in rows]
        if clean:
            self._write(
                lambda c: c.executemany(
                    "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)", clean
                )
            )

    def add_artifact(self, run_id: int, path: str, kind: str, payload: bytes | None = None) -> int:
        """Record a file of ``run_id``: its bytes in ``payload``, or only its ``path`` when None."""
        self._require_run(run_id)
        return self._write(
            lambda c: c.execute(
                "INSERT INTO artifacts (run_id, path, kind, payload) VALUES (?, ?, ?, ?)",
                (run_id, str(path), kind, payload),
            ).lastrowid
        )

    # -- reading ----------------------------------------------------------------------------------

    def get_run(self, run_id: int) -> Run:
        """The run with id ``run_id``; NormlabError if there is none."""
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise NormlabError(f"no run with id {run_id!r} in store {str(self.path)!r}")
        return _run_from_row(rows[0])

    def runs(
        self,
        *,
        status: str | Iterable[str] | None = None,
        group: str | None = None,
        name: str | None = None,
        config_key: str | None = None,
        where: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        """Runs matching every given filter, oldest first.

        ``where`` maps config fields (dots for nested: ``"norm_options.groups"``) to required values,
        e.g. ``where={"norm": "gn", "batch_size": 16}``.
        """
        clauses, params = [], []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = sorted(set(statuses) - set(RUN_STATUSES))
            if bad:
                raise NormlabError(f"unknown status {', '.join(bad)}; allowed: {', '.join(RUN_STATUSES)}")
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        for column, value in (("run_group", group), ("name", name), ("config_key", config_key)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        for field_name, value in (where or {}).items():
            if not _FIELD.match(field_name):
                raise NormlabError(
                    f"config field {field_name!r} is not a valid field name (letters, digits, _ and .)"
                )
            if value is None:
                clauses.append("json_type(config, ?) = 'null'")
                params.append(f"$.{field_name}")
            else:
                clauses.append("json_extract(config, ?) = ?")
                params += [f"$.{field_name}", int(value) if isinstance(value, bool) else value]
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_run_from_row(row) for row in self._read(sql, params)]

    def find_completed(self, key: str, statuses: Iterable[str] = ("finished",)) -> Run | None:
        """The latest run with config key ``key`` whose status is in ``statuses``, or None."""
        runs = self.runs(config_key=key, status=list(statuses))
        return runs[-1] if runs else None

    def latest_run(self, **filters: Any) -> Run | None:
        """The most recent run matching the filters of :meth:`runs`, or None."""
        runs = self.runs(**filters)
        return runs[-1] if runs else None

    def metric_names(self, run_id: int) -> list[str]:
        rows = self._read("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,))
        return [row[0] for row in rows]

    def metrics(self, run_id: int, name: str) -> list[tuple[int, float]]:
        """The series ``[(step, value), ...]`` of metric ``name`` of ``run_id``, by step (NULL -> NaN)."""
        rows = self._read(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step", (run_id, name)
        )
        return [(step, math.nan if value is None else value) for step, value in rows]

    def latest_metric(self, run_id: int, name: str) -> tuple[int, float] | None:
        """The last ``(step, value)`` of metric ``name`` of ``run_id``, or None."""
        rows = self._read(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step DESC LIMIT 1",
            (run_id, name),
        )
        if not rows:
            return None
        step, value = rows[0]
        return step, math.nan if value is None else value

    def metric_rows(self, run_ids: Iterable[int] | None = None) -> list[tuple[int, int, str, float]]:
        """All ``(run_id, step, name, value)`` rows, optionally only of ``run_ids``."""
        sql, params = "SELECT run_id, step, name, value FROM metrics", []
        if run_ids is not None:
            ids = list(run_ids)
            sql += f" WHERE run_id IN ({', '.join('?' * len(ids))})"
            params = ids
        rows = self._read(sql + " ORDER BY run_id, name, step", params)
        return [(r, s, n, math.nan if v is None else v) for r, s, n, v in rows]

    def artifacts(self, run_id: int) -> list[Artifact]:
        rows = self._read(
            "SELECT id, run_id, path, kind, payload FROM artifacts WHERE run_id = ? ORDER BY id", (run_id,)
        )
        return [Artifact(*row) for row in rows]

    def _require_run(self, run_id: int) -> None:
        if not self._read("SELECT 1 FROM runs WHERE id = ?", (run_id,)):
            raise NormlabError(f"no run with id {run_id!r} in store {str(self.path)!r}")

    # -- export -----------------------------------------------------------------------------------

    def to_pandas(self, table: str = "runs", **filters: Any):
        """``runs`` (one row per run, config/summary flattened to ``config.x``/``summary.y`` columns) or
        ``metrics`` (long form: run_id, step, name, value) as a pandas DataFrame."""
        from normlab.store.export import metrics_frame, runs_frame

        if table == "runs":
            return runs_frame(self.runs(**filters))
        if table == "metrics":
            ids = [run.id for run in self.runs(**filters)] if filters else None
            return metrics_frame(self.metric_rows(ids))
        raise NormlabError(f"unknown table {table!r}; allowed: runs, metrics")

    def export(self, dest: Any, format: str = "csv", **filters: Any) -> None:
        """Write the runs matching ``filters`` to ``dest`` (a path or a text stream) as CSV or JSON."""
        from normlab.store.export import write_runs

        write_runs(self.runs(**filters), dest, format)


def _float_or_none(value: Any) -> float | None:
    # SQLite has no NaN (it would store NULL anyway); say so explicitly.
    value = float(value)
    return None if math.isnan(value) else value


def _run_from_row(row: tuple) -> Run:
    rid, name, group, config, key, status, error, started, finished, wall, env, summary = row
    return Run(
        id=rid,
        name=name,
        group=group,
        config=json.loads(config),
        config_key=key,
        status=status,
        error=error,
        started_at=started,
        finished_at=finished,
        wall_time=wall,
        environment=json.loads(env),
        summary=json.loads(summary),
    )
