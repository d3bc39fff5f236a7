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
which only hands over what is already resolved: one round trip per
transaction, through ``owui_crypto.activate()``.
"""

from __future__ import annotations

import contextlib
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
from app_adapter.transport import Transport

# pg_temp last, explicitly: left out, PostgreSQL searches it FIRST for tables
# and views, and a temporary view named like a table (left in a pooled session
# by earlier SQL) would shadow the decrypting view for every later user.
VIEW_SEARCH_PATH = "owui_crypto_view, public, pg_temp"
_TRANSPORT = "owui_crypto_transport"


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

    def __init__(self, keys: KeyService, *, search_path: str = VIEW_SEARCH_PATH) -> None:
        self.keys = keys
        self.search_path = search_path
        self._engines: list[Engine] = []
        self._lock = threading.Lock()
        self._counts = {"transactions": 0, "round_trips": 0, "transport_renewals": 0}

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
        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "begin", self._on_begin)
        self._engines.append(sync_engine)

    def uninstall(self) -> None:
        for engine in self._engines:
            event.remove(engine, "connect", self._on_connect)
            event.remove(engine, "begin", self._on_begin)
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
        pooled = conn.connection
        transport: Transport = pooled.info.setdefault(_TRANSPORT, Transport())
        acting = _acting.get()
        raw = pooled.dbapi_connection
        assert raw is not None, "a connection inside a transaction has its DB-API connection"
        cursor = raw.cursor()
        trips, renewals = transport.round_trips, transport.renewals
        try:
            transport.activate(cursor,
                               acting.user_id if acting else None,
                               acting.key.reveal() if acting else None,
                               self.keys.share_key().reveal(),
                               search_path=self.search_path)
        finally:
            cursor.close()
        with self._lock:
            self._counts["transactions"] += 1
            self._counts["round_trips"] += transport.round_trips - trips
            self._counts["transport_renewals"] += transport.renewals - renewals

    def metrics(self) -> dict[str, int]:
        """Transactions hooked, activate() round trips, transport keys renewed (pooler moves)."""
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
