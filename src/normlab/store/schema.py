"""The store's SQLite schema. ``SCHEMA_VERSION`` is kept in ``PRAGMA user_version``.

A file written by a newer normlab (higher version) is refused rather than misread; version 0 is a fresh
file and gets the tables below.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

RUN_STATUSES = ("running", "finished", "diverged", "failed")

TABLES = f"""
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT,
    run_group   TEXT,
    config      TEXT NOT NULL,
    config_key  TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN {RUN_STATUSES!r}),
    error       TEXT,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    wall_time   REAL,
    environment TEXT NOT NULL,
    summary     TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS runs_config_key ON runs (config_key, status);
CREATE INDEX IF NOT EXISTS runs_group ON runs (run_group);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    step   INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL,
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL REFERENCES runs (id),
    path    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    payload BLOB
);
CREATE INDEX IF NOT EXISTS artifacts_run ON artifacts (run_id);
"""
