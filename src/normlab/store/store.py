"""The results store: one SQLite file per project directory (runs, scalar metrics, artifacts).

Safe for several processes at once: WAL journal (readers never block the writer), a busy timeout, every
write in one ``BEGIN IMMEDIATE`` transaction retried with backoff while another process holds the lock.
A file that is not a normlab store, or is corrupt, is refused with a :class:`NormlabError` naming it and is
never modified or deleted: a store opened for writing passes SQLite's ``quick_check`` first, and a store
opened with ``readonly=True`` (what the reading commands use) never creates tables, so a stray empty file
is not turned into a store; a store on a read-only file or file system opens that way for reading.
A ``Store`` pickles as its path, so a process-pool worker reopens the same file.

Two sweeps on one store share the work through *claims* (:meth:`Store.claim_config`): a row per config key
naming the process (host, pid) that trains it and a heartbeat it refreshes; another process skips a config
held by a live owner and takes over one whose owner died, closing that owner's ``running`` rows as failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
HEARTBEAT_EVERY_S = 10.0  # how often a claim holder refreshes its claims
STALE_AFTER_S = 120.0  # a claim without a heartbeat for this long is taken over
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

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.readonly = readonly
        if self.path.is_dir():
            raise NormlabError(f"store path {str(self.path)!r} is a folder; give the path of an SQLite file")
        if self.path.exists() and not self.path.is_file():  # /dev/null, a FIFO: SQLite fails obscurely
            raise NormlabError(
                f"store path {str(self.path)!r} is not a regular file (a device or FIFO); give the path of "
                "an SQLite file"
            )
        if readonly:
            if not self.path.is_file():
                raise NormlabError(f"no results store at {str(self.path)!r}")
            self._conn = self._open_readonly()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NormlabError(
                f"cannot create the folder of store {str(self.path)!r}: {exc.strerror or exc}"
            ) from None
        self._conn = self._open()

    # -- connection -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        existed = self.path.exists()
        try:
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise NormlabError(f"cannot open results store {str(self.path)!r}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            # Reading the header is where SQLite notices a file that is not a database.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
            if version == 0:
                self._retry(lambda: self._create_schema(conn))
            else:
                # Damaged pages are refused before anything is written over them.
                self._check_integrity(conn, "quick_check")
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not existed:
                self.path.unlink(missing_ok=True)
            raise self._open_error(exc) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        """Open for reading only: no tables created, no journal mode changed. A store on a read-only
        file system (where SQLite cannot create the WAL index) is opened as immutable."""
        uri = self.path.resolve().as_uri()
        last: sqlite3.Error | None = None
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(uri + query, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            except sqlite3.Error as exc:
                last = exc
                continue
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError as exc:
                conn.close()
                last = exc
                if "database is locked" in str(exc):
                    raise self._open_error(exc) from None
                continue
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise self._open_error(exc) from None
            except BaseException:
                conn.close()
                raise
            try:
                self._check_version(version)
                if version == 0:
                    raise NormlabError(
                        f"{str(self.path)!r} is not a normlab results store (no normlab tables; the file "
                        "was left untouched)"
                    )
            except BaseException:
                conn.close()
                raise
            return conn
        raise self._open_error(last) from None

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise NormlabError(
                f"store {str(self.path)!r} has schema version {version}; this normlab reads up to "
                f"{SCHEMA_VERSION}: upgrade normlab"
            )

    def _check_integrity(self, conn: sqlite3.Connection, pragma: str = "integrity_check") -> None:
        rows = self._retry(lambda: conn.execute(f"PRAGMA {pragma}").fetchall())
        verdict = " ".join(" ".join(str(row[0]) for row in rows).split())  # one line
        if verdict != "ok":
            raise NormlabError(
                f"results store {str(self.path)!r} is damaged ({verdict[:160]}); refusing to write to it "
                "(the file was left untouched; restore a copy or start a new store)"
            )

    def _open_error(self, exc: BaseException | None) -> NormlabError:
        message = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and (
            "unable to open" in message or "readonly" in message or "read-only" in message
        ):
            return NormlabError(
                f"cannot open results store {str(self.path)!r}: {message} (is its folder writable?)"
            )
        return NormlabError(
            f"cannot open results store {str(self.path)!r}: {message}; it is not a sound normlab SQLite "
            "store (the file was left untouched)"
        )

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
        if self.readonly:
            raise NormlabError(f"results store {str(self.path)!r} was opened read-only; cannot write to it")

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
        return {"path": str(self.path), "readonly": self.readonly}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], readonly=state.get("readonly", False))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return "\n".join(row[0] for row in self._read("PRAGMA integrity_check"))

    # -- claims: which process trains which config ---------------------------------------------------

    def claim_config(self, key: str, owner: Owner, *, stale_after: float = STALE_AFTER_S) -> bool:
        """Atomically claim config ``key`` for ``owner``; False if another live owner holds it.

        A claim whose owner is dead (same host and its pid gone, or no heartbeat for ``stale_after``
        seconds) is taken over: that owner's ``running`` rows of ``key`` are closed as ``failed``.
        """

        def claim(c: sqlite3.Connection) -> bool:
            c.execute(_CLAIMS_TABLE)
            row = c.execute(
                "SELECT host, pid, token, heartbeat FROM claims WHERE config_key = ?", (key,)
            ).fetchone()
            if row is not None:
                holder = Owner(row[0], row[1], row[2])
                if holder == owner:
                    return True
                if holder.is_alive(row[3], stale_after):
                    return False
                c.execute(
                    "UPDATE runs SET status = 'failed', error = ?, finished_at = ? "
                    "WHERE config_key = ? AND status = 'running'",
                    (f"interrupted: its process {holder} died", _now(), key),
                )
            c.execute(
                "INSERT OR REPLACE INTO claims (config_key, host, pid, token, heartbeat) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, owner.host, owner.pid, owner.token, time.time()),
            )
            return True

        return self._write(claim)

    def release_config(self, key: str, owner: Owner) -> None:
        """Drop ``owner``'s claim on ``key`` (another owner's claim is left alone)."""
        def release(c: sqlite3.Connection) -> None:
            c.execute(_CLAIMS_TABLE)
            c.execute("DELETE FROM claims WHERE config_key = ? AND token = ?", (key, owner.token))

        self._write(release)

    def heartbeat(self, owner: Owner) -> None:
        """Refresh the heartbeat of every claim ``owner`` holds."""
        def beat(c: sqlite3.Connection) -> None:
            c.execute(_CLAIMS_TABLE)
            c.execute("UPDATE claims SET heartbeat = ? WHERE token = ?", (time.time(), owner.token))

        self._write(beat)

    def release_claims(self, owner: Owner) -> None:
        """Drop every claim ``owner`` holds (a sweep ending, or interrupted)."""

        def release(c: sqlite3.Connection) -> None:
            c.execute(_CLAIMS_TABLE)
            c.execute("DELETE FROM claims WHERE token = ?", (owner.token,))

        self._write(release)

    def claim_holder(self, key: str) -> Owner | None:
        """The owner holding ``key`` now, or None."""
        if not self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'claims'"):
            return None
        rows = self._read("SELECT host, pid, token FROM claims WHERE config_key = ?", (key,))
        return Owner(*rows[0]) if rows else None

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
        return _run_from_row(rows[0], self.path)

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
        return [_run_from_row(row, self.path) for row in self._read(sql, params)]

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


# Claims live in a table of their own, created by the first claim (readers and older stores need none).
_CLAIMS_TABLE = (
    "CREATE TABLE IF NOT EXISTS claims (config_key TEXT PRIMARY KEY, host TEXT NOT NULL, "
    "pid INTEGER NOT NULL, token TEXT NOT NULL, heartbeat REAL NOT NULL)"
)


@dataclass(frozen=True)
class Owner:
    """The process holding a claim: its host, pid and a random token (pids are reused)."""

    host: str
    pid: int
    token: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex)

    def is_alive(self, heartbeat: float, stale_after: float = STALE_AFTER_S) -> bool:
        """Alive: a fresh heartbeat and, on this host, a process with its pid."""
        if time.time() - heartbeat > stale_after:
            return False
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def _float_or_none(value: Any) -> float | None:
    # SQLite has no NaN (it would store NULL anyway); say so explicitly.
    value = float(value)
    return None if math.isnan(value) else value


def _run_from_row(row: tuple, path: Path) -> Run:
    rid, name, group, config, key, status, error, started, finished, wall, env, summary = row

    def json_object(text: Any, column: str) -> dict[str, Any]:
        # Rows are untrusted (anyone can write the file): a column that is not a JSON object is one line.
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            value = text
        if not isinstance(value, dict):
            raise NormlabError(
                f"store {str(path)!r}: run {rid}'s {column} is not a JSON object (got "
                f"{type(value).__name__}); the row was not written by normlab"
            )
        return value

    return Run(
        id=rid,
        name=name,
        group=group,
        config=json_object(config, "config"),
        config_key=key,
        status=status,
        error=error,
        started_at=started,
        finished_at=finished,
        wall_time=wall,
        environment=json_object(env, "environment"),
        summary=json_object(summary, "summary"),
    )
