"""The attack tests' world: roles that are not superusers, as in production.

* ``owner``: owns the test database, loads Open WebUI's schema and installs
  owui-crypto (``migrate.upgrade``), as a database owner on Aurora does. It is
  also the "Open WebUI-style" application role that owns the base tables.
* ``app``: an application role given access with ``owui-crypto grant``.
* ``ro``: a read-only role (analysts, support): CONNECT, USAGE on ``public``
  and SELECT on Open WebUI's tables, nothing of owui-crypto's.

Roles are cluster-wide, so their names carry a random suffix and they are
dropped when the session ends. Each test gets its own database cloned from a
template the owner built (``site``); ``people`` registers users and keys there
and activates them exactly as the adapter does.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from app_adapter import cli, devdb, hook, migrate
from app_adapter.transport import Transport
from tests.keyring import Keyring
from tests.pgbouncer import running_pgbouncer
from tests.serverlog import server_log_path

OWUI_SCHEMA = Path(__file__).parent / "fixtures" / "owui_0_12_4_schema.sql"


def as_role(url: str, role: str) -> str:
    """``url`` with ``role`` as its user (trust authentication: no password)."""
    parts = urlsplit(url)
    netloc = f"{role}@{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    ro: str


@pytest.fixture(scope="session")
def roles(pg_server: devdb.Server) -> Iterator[Roles]:
    """Three NOSUPERUSER login roles for the whole session."""
    suffix = secrets.token_hex(4)
    made = Roles(owner=f"owui_crypto_t_owner_{suffix}", app=f"owui_crypto_t_app_{suffix}",
                 ro=f"owui_crypto_t_ro_{suffix}")
    names = (made.owner, made.app, made.ro)
    with pg_server.connect() as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
                sql.Identifier(name)))
    try:
        yield made
    finally:
        with pg_server.connect() as admin:
            for name in names:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def owned_template(pg_server: devdb.Server, roles: Roles) -> Iterator[str]:
    """Open WebUI's schema and owui-crypto, installed by the owner role (never by a superuser)."""
    name = pg_server.create_database("owui_crypto_t_otmpl", owner=roles.owner)
    try:
        url = as_role(pg_server.url(name), roles.owner)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(OWUI_SCHEMA.read_text(encoding="utf-8"))
        migrate.upgrade(url)
        yield name
    finally:
        pg_server.drop_database(name)


@dataclass
class Site:
    """One test's database, as each role reaches it."""

    server: devdb.Server
    name: str
    roles: Roles

    def url(self, role: str, via: devdb.Server | None = None) -> str:
        return as_role((via or self.server).url(self.name), role)

    @property
    def owner_url(self) -> str:
        return self.url(self.roles.owner)

    @property
    def app_url(self) -> str:
        return self.url(self.roles.app)

    def owner(self) -> psycopg.Connection:
        """The owner, autocommit: set-up, and looking at what is really stored."""
        return psycopg.connect(self.owner_url, autocommit=True)

    def owui(self) -> psycopg.Connection:
        """The owner acting as Open WebUI's own role (it owns the base tables)."""
        return psycopg.connect(self.owner_url)

    def app(self) -> psycopg.Connection:
        """The application role: a pooled connection, reused by one client after another."""
        return psycopg.connect(self.app_url)

    def ro(self) -> psycopg.Connection:
        return psycopg.connect(self.url(self.roles.ro))

    def configure(self, settings: dict[str, str]) -> None:
        """ALTER DATABASE ... SET, as a superuser (logging settings are superuser-only); new sessions see it."""
        with self.server.connect() as admin:
            for setting, value in settings.items():
                admin.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(self.name), sql.SQL(setting), sql.Literal(value)))

    def grant_temp(self) -> None:
        """Give the application role TEMP back: the attacks must fail whatever privileges it holds."""
        with self.owner() as conn:
            conn.execute(sql.SQL("GRANT TEMP ON DATABASE {} TO {}").format(
                sql.Identifier(self.name), sql.Identifier(self.roles.app)))

    def log_path(self) -> Path:
        with self.server.connect() as admin:
            return server_log_path(admin)

    def log_database(self) -> str | None:
        """This database's name if the server's log lines name their database (``%d``), so a test reads only its
        own; else None."""
        with self.server.connect() as admin:
            prefix = admin.execute("SELECT current_setting('log_line_prefix')").fetchone()[0]
        return self.name if "%d" in prefix else None

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of the protected base tables, as stored, as text."""
        with self.owner() as conn:
            return {table: conn.execute(sql.SQL("SELECT t::text FROM public.{} t ORDER BY id").format(
                sql.Identifier(table))).fetchall() for table in ("chat", "chat_message", "shared_chat")}


@pytest.fixture
def site(pg_server: devdb.Server, roles: Roles, owned_template: str) -> Iterator[Site]:
    """A database owned by the owner role; the app role granted with `owui-crypto grant`, ro given SELECT."""
    name = pg_server.create_database("owui_crypto_t_atk", template=owned_template, owner=roles.owner)
    try:
        made = Site(pg_server, name, roles)
        assert cli.main(["grant", roles.app, "--database-url", made.owner_url]) == 0
        with made.owner() as conn:
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(roles.ro)))
        yield made
    finally:
        pg_server.drop_database(name)


@dataclass
class People(Keyring):
    """Open WebUI users: a public."user" row and a registered key each; activation as the adapter does it."""

    def row(self, user_id: str, *, role: str = "user") -> None:
        now = int(time.time())
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute('INSERT INTO public."user" (id, name, email, role, created_at, updated_at, last_active_at)'
                         " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (user_id, f"Name of {user_id}", f"{user_id}@example.com", role, now, now, now))

    def user(self, user_id: str | None = None, *, role: str = "user") -> str:
        user_id = user_id or f"u-{uuid.uuid4()}"
        self.row(user_id, role=role)
        return super().user(user_id)

    def activate(self, conn: psycopg.Connection, user_id: str | None, *, share: bool = True,
                 transport: Transport | None = None) -> Transport:
        return self.offer(conn, user_id, self.keys.get(user_id) if user_id else None, share=share, transport=transport)

    def offer(self, conn: psycopg.Connection, user_id: str | None, key: bytes | None, *, share: bool = True,
              transport: Transport | None = None) -> Transport:
        """activate() exactly as the adapter's begin hook calls it, offering ``key`` (the attacks offer bad ones)."""
        transport = transport or self.transports.setdefault(id(conn), Transport())
        with conn.cursor() as cur:
            transport.activate(cur, user_id, key, self.share() if share else None, search_path=hook.VIEW_SEARCH_PATH)
        return transport


@pytest.fixture
def people(site: Site) -> People:
    return People(site.owner_url)


@pytest.fixture(scope="session")
def tiny_pgbouncer(pg_server: devdb.Server, roles: Roles) -> Iterator[devdb.Server]:
    """PgBouncer with ONE server connection per database and role: every client of the app role shares a backend."""
    with running_pgbouncer(pg_server, pool_size=1, users=[roles.app, roles.owner]) as server:
        yield server
