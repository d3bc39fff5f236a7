"""The one-value query, typed: PostgreSQL answers a scalar query with exactly one row."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

Query = str | sql.SQL | sql.Composed


def scalar(conn: psycopg.Connection[Any], query: Query, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the one row ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError("a scalar query returned no row")
    return row[0]
