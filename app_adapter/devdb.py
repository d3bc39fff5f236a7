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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from app_adapter.config import OWNER_URL_ENV

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


# -- serve's two roles (README, "Two roles"), for the e2e suite and the demo ----------------------------------

@dataclass(frozen=True)
class Roles:
    """The two login roles serve runs with (README, "Two roles"): ``owner`` owns the database and migrates, ``app``
    is what Open WebUI connects as, granted by serve at start. Neither is a superuser."""

    owner: str
    owner_password: str = field(repr=False)
    app: str
    app_password: str = field(repr=False)

    def owner_url(self, url: str) -> str:
        return as_role(url, self.owner, self.owner_password)

    def app_url(self, url: str) -> str:
        return as_role(url, self.app, self.app_password)

    def env(self, url: str) -> dict[str, str]:
        """serve's two URLs for the database ``url`` names."""
        return {"DATABASE_URL": self.app_url(url), OWNER_URL_ENV: self.owner_url(url)}


def as_role(url: str, role: str, password: str) -> str:
    """``url`` (a libpq URL) with ``role`` and ``password`` in place of its user."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port or 5432}"))


@contextlib.contextmanager
def database_roles(pg_server: Server, prefix: str = "owui_crypto_e2e") -> Iterator[Roles]:
    """An owner and an application role of this run's own (roles are cluster-wide: random names), dropped after
    (drop their databases first)."""
    suffix = secrets.token_hex(4)
    roles = Roles(f"{prefix}_owner_{suffix}", f"owner-pw-{secrets.token_hex(8)}",
                  f"{prefix}_app_{suffix}", f"app-pw-{secrets.token_hex(8)}")
    with pg_server.connect() as admin:
        for role, password in ((roles.owner, roles.owner_password), (roles.app, roles.app_password)):
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)))
    try:
        yield roles
    finally:
        with pg_server.connect() as admin:
            for role in (roles.app, roles.owner):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
