"""Throw-away PostgreSQL databases for the tests, the demo and the benchmarks.

Where the server comes from, in order:

1. ``TEST_DATABASE_URL`` (any database on the server; a role that may
   ``CREATE DATABASE``),
2. a local server at 127.0.0.1:5432 as ``postgres`` (present on the project's
   machines),
3. a PostgreSQL container from testcontainers when Docker is reachable.

If none answers, :func:`find_server` raises :class:`NoServer` naming each
place it tried; nothing is ever skipped silently.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class NoServer(RuntimeError):
    """No PostgreSQL server could be reached by any of the known routes."""


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server on which throw-away databases can be made."""

    admin_url: str  # libpq URL of a maintenance database, as a CREATEDB role
    origin: str  # where it came from, for messages
    keepalive: Any = None  # a container object to keep alive, if any

    def url(self, dbname: str) -> str:
        """The ``postgresql://`` URL of ``dbname`` on this server."""
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + dbname))

    def connect(self, dbname: str | None = None, **kw: Any) -> psycopg.Connection:
        url = self.admin_url if dbname is None else self.url(dbname)
        return psycopg.connect(url, autocommit=True, **kw)

    def create_database(self, prefix: str, template: str | None = None, owner: str | None = None) -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if owner:
            query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with self.connect() as conn:
            conn.execute(query)
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextlib.contextmanager
    def scratch_database(self, prefix: str = "owui_crypto_scratch", **kw: Any) -> Iterator[str]:
        name = self.create_database(prefix, **kw)
        try:
            yield name
        finally:
            self.drop_database(name)


def _answers(url: str) -> str | None:
    """None if ``url`` accepts a connection, else the reason it did not."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def find_server() -> Server:
    tried: list[str] = []
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        url = url.replace("postgresql+psycopg://", "postgresql://")
        why = _answers(url)
        if why is None:
            return Server(url, "TEST_DATABASE_URL")
        # An explicit URL that does not answer is a configuration error: say so.
        raise NoServer(f"TEST_DATABASE_URL is set but does not answer: {why}")
    why = _answers(LOCAL_URL)
    if why is None:
        return Server(LOCAL_URL, "local server at 127.0.0.1:5432")
    tried.append(f"local server at 127.0.0.1:5432: {why}")
    try:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None).start()
        return Server(container.get_connection_url(), "testcontainers postgres:15", keepalive=container)
    except Exception as exc:  # docker missing, daemon down, image pull refused...
        tried.append(f"testcontainers: {type(exc).__name__}: {exc}".splitlines()[0])
    raise NoServer(
        "No PostgreSQL server for the tests. Tried, in order:\n  - TEST_DATABASE_URL: not set\n  - "
        + "\n  - ".join(tried)
        + "\nSet TEST_DATABASE_URL=postgresql://USER@HOST:PORT/postgres to use another server."
    )
