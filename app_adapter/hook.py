"""The engine hook: every transaction starts with the acting user's key.

Usage::

    adapter = Adapter(KeyService(settings, dsn))
    adapter.install(engine)            # Engine or AsyncEngine, psycopg 3
    async with adapter.acting_as(user_id):
        ...                            # every transaction here holds user_id's key

The acting user lives in a :class:`contextvars.ContextVar`, so it follows
the code into ``asyncio.create_task`` and Starlette's ``run_in_threadpool``
(both copy the context). The key is resolved (cached; KMS on a miss) when a
user is bound -- never inside SQLAlchemy's synchronous ``begin`` listener,
which only hands over what is already resolved, through
``owui_crypto.activate()``: in the same round trip as the transaction's BEGIN
when activation is the transaction's first statement (see :func:`app_adapter.transport.with_begin`),
else in one round trip of its own.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from app_adapter.errors import UnsupportedDriver
from app_adapter.keys import KeyService
from app_adapter.secret import SecretBytes
from app_adapter.transport import Transport, with_begin

# pg_temp last, explicitly: left out, PostgreSQL searches it FIRST for tables
# and views, and a temporary view named like a table (left in a pooled session
# by earlier SQL) would shadow the decrypting view for every later user.
VIEW_SEARCH_PATH = "owui_crypto_view, public, pg_temp"
_TRANSPORT = "owui_crypto_transport"
_ACTIVATED = "owui_crypto_activated"  # per transaction: False until its first protected statement


def protected_names(tables: list[str]) -> re.Pattern[str]:
    """A statement that names one of these tables (bare, quoted or schema-qualified) needs the keys.
    False positives (a column named like a table) only cost an activation; a statement cannot read or
    write a protected table without naming it."""
    names = "|".join(re.escape(t) for t in sorted(tables, key=len, reverse=True))
    return re.compile(rf'(?<![\w$])"?(?:{names})"?(?![\w$])', re.IGNORECASE)


@dataclass(frozen=True)
class Acting:
    """Who a unit of work acts as, with their resolved key (never shown)."""

    user_id: str
    key: SecretBytes = field(repr=False)


_acting: ContextVar[Acting | None] = ContextVar("owui_crypto_acting", default=None)


def acting_user() -> str | None:
    """The user id bound in this context, or None."""
    acting = _acting.get()
    return acting.user_id if acting else None


class Adapter:
    """Binds users to work and hands their keys to PostgreSQL per transaction."""

    def __init__(self, keys: KeyService, *, search_path: str = VIEW_SEARCH_PATH, lazy: bool = True) -> None:
        """``lazy``: activate a transaction's keys just before its first statement that names a protected
        table, rather than at BEGIN: Open WebUI runs 4-7 transactions per request, most of them on users,
        settings and models, and each activation is a round trip and two Fernet wraps. Statements sent on
        the raw DB-API connection bypass SQLAlchemy's events: code that does so needs ``lazy=False``."""
        self.keys = keys
        self.search_path = search_path
        self.lazy = lazy
        self._protected: re.Pattern[str] | None = None
        self._engines: list[Engine] = []
        self._lock = threading.Lock()
        self._counts = {"transactions": 0, "activations": 0, "round_trips": 0, "transport_renewals": 0,
                        "with_begin": 0}

    def __repr__(self) -> str:
        return f"Adapter(keys={self.keys!r}, engines={len(self._engines)})"

    # -- installing ------------------------------------------------------------

    def install(self, engine: Any) -> None:
        """Hook ``engine`` (a SQLAlchemy ``Engine`` or ``AsyncEngine``)."""
        sync_engine: Engine = getattr(engine, "sync_engine", engine)
        driver = sync_engine.dialect.driver
        if sync_engine.dialect.name != "postgresql" or driver != "psycopg":
            raise UnsupportedDriver(
                f"owui-crypto needs PostgreSQL through psycopg 3 (postgresql+psycopg://), not "
                f"{sync_engine.dialect.name}+{driver}: other drivers inline parameters into SQL text, "
                "where keys would reach the server's logs")
        self.keys.share_key()  # resolve at startup: a KMS problem shows now, not mid-request
        if self.lazy and self._protected is None:
            # owui_crypto's own functions (seal_existing, active_user...) work with the keys too.
            self._protected = protected_names([*self.keys.protected_tables(), "owui_crypto"])
        for name, listener in self._listeners():
            event.listen(sync_engine, name, listener)
        self._engines.append(sync_engine)

    def _listeners(self) -> list[tuple[str, Any]]:
        listeners: list[tuple[str, Any]] = [("connect", self._on_connect), ("begin", self._on_begin)]
        if self.lazy:
            listeners += [("before_cursor_execute", self._before_statement),
                          ("rollback_savepoint", self._on_rollback_savepoint)]
        return listeners

    def uninstall(self) -> None:
        for engine in self._engines:
            for name, listener in self._listeners():
                event.remove(engine, name, listener)
        self._engines.clear()

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if "ClientCursor" in getattr(getattr(raw, "cursor_factory", None), "__name__", ""):
            raise UnsupportedDriver("this psycopg connection uses client-side binding (ClientCursor), which "
                                    "inlines parameters into SQL text; use the default server-side cursors")
        transport = Transport()
        cursor = dbapi_connection.cursor()
        try:
            transport.establish(cursor)
        finally:
            cursor.close()
        dbapi_connection.commit()  # so the transport key outlives this first transaction
        record.info[_TRANSPORT] = transport

    def _on_begin(self, conn: Connection) -> None:
        if self.lazy:
            conn.info[_ACTIVATED] = False
            with self._lock:
                self._counts["transactions"] += 1
            return
        self._activate(conn)
        with self._lock:
            self._counts["transactions"] += 1

    def _before_statement(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if conn.info.get(_ACTIVATED) is False and self._protected is not None and self._protected.search(statement):
            self._activate(conn)
            conn.info[_ACTIVATED] = True

    def _on_rollback_savepoint(self, conn: Connection, *args: Any) -> None:
        # An activation inside the savepoint is undone with it: activate again when needed.
        if conn.info.get(_ACTIVATED):
            conn.info[_ACTIVATED] = False

    def _activate(self, conn: Connection) -> None:
        pooled = conn.connection
        transport: Transport = pooled.info.setdefault(_TRANSPORT, Transport())
        acting = _acting.get()
        raw = pooled.dbapi_connection
        assert raw is not None, "a connection inside a transaction has its DB-API connection"
        first_trip = with_begin(pooled.driver_connection)
        cursor = raw.cursor()
        trips, renewals = transport.round_trips, transport.renewals
        try:
            transport.activate(cursor,
                               acting.user_id if acting else None,
                               acting.key.reveal() if acting else None,
                               self.keys.share_key().reveal(),
                               search_path=self.search_path,
                               first_trip=first_trip)
        finally:
            cursor.close()
        with self._lock:
            self._counts["activations"] += 1
            self._counts["round_trips"] += transport.round_trips - trips
            self._counts["transport_renewals"] += transport.renewals - renewals
            self._counts["with_begin"] += first_trip is not None

    def metrics(self) -> dict[str, int]:
        """Transactions hooked, activations (fewer when lazy), activate() round trips, transport entries
        renewed (pooler moves), activations sent in one flight with their transaction's BEGIN."""
        with self._lock:
            return dict(self._counts)

    # -- binding the acting user ---------------------------------------------------

    def bind(self, user_id: str | None) -> Any:
        """Act as ``user_id`` for the rest of this context (sync; resolves the key now).
        Returns a token for :meth:`unbind`."""
        return _acting.set(Acting(user_id, self.keys.dek(user_id)) if user_id else None)

    async def abind(self, user_id: str | None) -> Any:
        """:meth:`bind` without blocking the event loop."""
        return _acting.set(Acting(user_id, await self.keys.adek(user_id)) if user_id else None)

    @staticmethod
    def unbind(token: Any) -> None:
        _acting.reset(token)

    @contextlib.contextmanager
    def acting_as_sync(self, user_id: str | None) -> Iterator[None]:
        token = self.bind(user_id)
        try:
            yield
        finally:
            _acting.reset(token)

    @contextlib.asynccontextmanager
    async def acting_as(self, user_id: str | None) -> AsyncIterator[None]:
        token = await self.abind(user_id)
        try:
            yield
        finally:
            _acting.reset(token)
