"""Open Open WebUI's sealed rows in Python, from the base tables alone.

The decrypting views do this in SQL (``sql/50_generate.sql``). Disaster
recovery cannot count on them: a ``pg_dump`` of the public schema restored
elsewhere has no ``owui_crypto`` schema, no pgcrypto and no policy tables, and
the SQL side may be what broke. So this module carries its own copy of the
protection policy (:data:`POLICY`, checked against ``sql/40_policy.sql`` by
the tests), finds the columns with plain ``information_schema`` queries, and
opens each value with :mod:`app_adapter.envelope`, the Python twin of
``sql/30_seal.sql``.

It opens exactly what SQL would, and refuses what SQL would refuse: a value
sealed under another key than the row owner's, or one that fails its
integrity check, is a :class:`Failure` naming the row and column -- never a
silent gap, never a placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from app_adapter import envelope
from app_adapter.secret import SecretBytes

__all__ = ["POLICY", "Failure", "Key", "Schema", "open_row", "select_list"]

#: Sealed columns of the tables recover exports, as the policy lists them
#: (``sql/40_policy.sql``, ``sql/90_coverage.sql``). chat and
#: chat_message rows are sealed under their owner's DEK (a message's owner is
#: its chat's owner), shared_chat rows under the deployment's share key.
POLICY: Mapping[str, tuple[str, ...]] = {
    "chat": ("title", "chat", "summary", "tasks", "variables"),
    "chat_message": ("content", "output", "files", "sources", "embeds", "status_history", "error",
                     "context_summary"),
    "shared_chat": ("title", "chat"),
}

_JSON_ENVELOPE = '"' + envelope.PREFIX


@dataclass(frozen=True)
class Key:
    """The key that opens one owner's values, or the reason there is none."""

    material: SecretBytes | None = field(repr=False)
    key_id: str | None
    missing: str = ""  # why material is None, in words an operator can act on

    @classmethod
    def unavailable(cls, why: str) -> Key:
        return cls(None, None, why)


@dataclass(frozen=True)
class Failure:
    """A sealed value that did not open: which row and column, and why."""

    table: str
    column: str
    row_id: str
    reason: str
    no_key: bool = False  # the key was unavailable, rather than the value damaged

    def __str__(self) -> str:
        return f"{self.table}.{self.column}/{self.row_id}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "column": self.column, "row_id": self.row_id, "reason": self.reason}


class _Unopened(Exception):
    def __init__(self, reason: str, *, no_key: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.no_key = no_key


@dataclass(frozen=True)
class Schema:
    """The columns Open WebUI's tables have in this database (versions differ)."""

    columns: Mapping[str, tuple[str, ...]]  # table -> columns in table order; absent tables are absent
    json_columns: Mapping[str, frozenset[str]]

    @classmethod
    def discover(cls, conn: psycopg.Connection, tables: Sequence[str]) -> Schema:
        columns: dict[str, list[str]] = {}
        json_columns: dict[str, set[str]] = {}
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY table_name, ordinal_position",
            (list(tables),))
        for table, column, data_type in rows:
            columns.setdefault(table, []).append(column)
            if data_type in ("json", "jsonb"):
                json_columns.setdefault(table, set()).add(column)
        return cls({t: tuple(c) for t, c in columns.items()},
                   {t: frozenset(json_columns.get(t, ())) for t in columns})

    def has(self, table: str, *wanted: str) -> bool:
        return table in self.columns and all(c in self.columns[table] for c in wanted)

    def present(self, table: str, wanted: Sequence[str]) -> list[str]:
        return [c for c in wanted if c in self.columns.get(table, ())]


def select_list(schema: Schema, table: str, columns: Sequence[str], alias: str) -> sql.Composable:
    """The columns of ``alias`` that exist, json ones as their text (opened here, not by psycopg)."""
    parts = []
    for column in schema.present(table, columns):
        ident = sql.Identifier(alias, column)
        if column in schema.json_columns[table]:
            parts.append(sql.SQL("{}::text AS {}").format(ident, sql.Identifier(column)))
        else:
            parts.append(sql.SQL("{}").format(ident))
    return sql.SQL(", ").join(parts)


def _open_text(key: Key, bind: str, stored: str) -> str:
    try:
        found = envelope.key_id_of(stored)
    except envelope.SealedValueError as exc:
        raise _Unopened("malformed envelope (damaged)") from exc
    if key.material is None:
        raise _Unopened(f"sealed under key {found}, which is unavailable: {key.missing}", no_key=True)
    if found != key.key_id:
        raise _Unopened(f"sealed under key {found}, but this row's key is {key.key_id} (moved from another "
                        "owner's row, or tampered)")
    try:
        return envelope.open_(key.material.reveal(), bind, stored)
    except envelope.SealedValueError:
        raise _Unopened("failed its integrity check (tampered, moved from another row or column, "
                        "or corrupt)") from None


def _open_value(key: Key, bind: str, stored: str | None, is_json: bool, sealed: bool) -> Any:
    """One stored value, opened if sealed; JSON columns come back parsed."""
    if stored is None:
        return None
    if not is_json:
        return _open_text(key, bind, stored) if sealed and stored.startswith(envelope.PREFIX) else stored
    text = stored
    if sealed and stored.startswith(_JSON_ENVELOPE):
        text = _open_text(key, bind, json.loads(stored))
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _Unopened("not valid JSON" + (" after opening" if text is not stored else "")) from None


def open_row(table: str, row: Mapping[str, Any], key: Key, schema: Schema,
             failures: list[Failure]) -> dict[str, Any] | None:
    """Every column of one row (keyed by ``id``), sealed ones opened.

    Returns None when any value did not open; each such value is appended
    to ``failures``. Values not in the envelope format (written before
    owui-crypto was installed) come back as they are, as the views return
    them.
    """
    row_id = str(row["id"])
    opened: dict[str, Any] = {}
    ok = True
    for column, stored in row.items():
        sealed = column in POLICY[table]
        is_json = column in schema.json_columns[table]
        if not sealed and not is_json:
            opened[column] = stored
            continue
        try:
            opened[column] = _open_value(key, envelope.binding(table, column, row_id), stored, is_json, sealed)
        except _Unopened as exc:
            failures.append(Failure(table, column, row_id, exc.reason, exc.no_key))
            ok = False
    return opened if ok else None
