"""Stored responses of /v1/responses and their conversations (gateway/responses.py), per tenant,
in one SQLite file: they survive a restart, and the tenant's bound drops the oldest."""
from __future__ import annotations

import json
import os
import sqlite3
import time


class ResponseStore:
    """Stored responses and their conversations, per tenant, in one SQLite file. Calls are
    short (one row); the API process makes them on its event loop."""

    def __init__(self, path: str, max_per_tenant: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)      # autocommit: one statement each
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                        "created REAL NOT NULL, record TEXT NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS by_tenant ON responses (tenant, created)")
        self.max_per_tenant = max_per_tenant
        self.dropped = 0                  # stored responses dropped for room (/metrics)

    def put(self, tenant: str, response_id: str, record: dict) -> None:
        """Keep `record`; past the tenant's bound, drop its oldest."""
        self.db.execute("INSERT INTO responses VALUES (?, ?, ?, ?)", (response_id, tenant, time.time(),
                                                                      json.dumps(record)))
        over = self.db.execute("SELECT COUNT(*) FROM responses WHERE tenant = ?", (tenant,)).fetchone()[0] \
            - self.max_per_tenant
        if over > 0:
            self.db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE tenant = ? "
                            "ORDER BY created LIMIT ?)", (tenant, over))
            self.dropped += over

    def get(self, tenant: str, response_id: str) -> dict | None:
        """The record, if `tenant` stored it (None for a missing one and another tenant's alike)."""
        row = self.db.execute("SELECT record FROM responses WHERE id = ? AND tenant = ?",
                              (response_id, tenant)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete(self, tenant: str, response_id: str) -> bool:
        return self.db.execute("DELETE FROM responses WHERE id = ? AND tenant = ?",
                               (response_id, tenant)).rowcount > 0

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.db.close()
