"""Users come and go: ids from KMS, a key at sign-up, crypto-shredding at deletion.

Sign-up. Every path that creates a user (signup, admin add, LDAP, OAuth,
SCIM, trusted header, the env-var admin) calls ``Auths.insert_new_auth``
(``models/auths.py:288``), which makes the id with ``uuid.uuid4()`` at
``models/auths.py:302`` and inserts the ``auth`` and ``"user"`` rows in one
transaction. The wrapper computes the KMS HMAC id of the email first (off the
event loop) and binds it for the call; ``models.auths.uuid`` is replaced by a
proxy of the ``uuid`` module whose ``uuid4()`` returns that id once, on its
first call in that context, and is the real ``uuid4`` everywhere else. After
the call the wrapper checks that the user got exactly that id and a key;
otherwise it deletes the user and fails.

The key is provisioned *in the same transaction* as the ``"user"`` row: an
``after_insert`` mapper event on Open WebUI's ``User`` runs
:meth:`KeyService.provision` on the inserting connection before the commit,
so a failure (KMS down...) rolls the user back. Provisioning costs a KMS call
and a 600,000-round PBKDF2, which must not stall the event loop: it runs in a
worker thread, and its few SQL statements are handed back to the loop and run
on the session's own (suspended) psycopg connection.

Deletion. ``Auths.delete_auth_by_id`` (``models/auths.py:420``) deletes the
user row -- and with it both wrapped copies of the DEK -- and the wrapper then
forgets the key's registration and evicts it from this process's cache.

At start-up :func:`reconcile` gives every user without a key one (users from
before owui-crypto, or a crash) and forgets registrations of users that no
longer exist.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import uuid as _uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import event

from app_adapter.errors import OwuiCryptoError
from app_adapter.keys import KeyService

log = logging.getLogger("owui_crypto.lifecycle")


class LifecycleError(OwuiCryptoError):
    """A user could not be created or deleted the way owui-crypto requires."""


# -- the id ----------------------------------------------------------------------


@dataclass
class _NextId:
    user_id: str
    used: bool = False


_next_id: contextvars.ContextVar[_NextId | None] = contextvars.ContextVar("owui_crypto_next_user_id", default=None)


class UuidWithUserIds:
    """Stands in for the ``uuid`` module inside ``open_webui.models.auths``.

    Everything is the real module's, except that ``uuid4()`` returns the id
    bound by :func:`creating_user` on its first call in that context.
    """

    def __init__(self, module: Any = _uuid) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def uuid4(self) -> _uuid.UUID:
        pending = _next_id.get()
        if pending is not None and not pending.used:
            pending.used = True
            return self._module.UUID(pending.user_id)
        return self._module.uuid4()

    def __repr__(self) -> str:
        return f"<owui-crypto proxy of {self._module!r}>"


class UserLifecycle:
    """Wrappers of Open WebUI's user creation and deletion."""

    def __init__(self, keys: KeyService) -> None:
        self.keys = keys
        self.created = 0
        self.shredded = 0

    # -- creation ----------------------------------------------------------------

    def wrap_insert_new_auth(self, original: Callable[..., Awaitable[Any]],
                             delete: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        async def insert_new_auth(*args: Any, **kwargs: Any) -> Any:
            email = signature.bind(*args, **kwargs).arguments["email"]
            user_id = await asyncio.to_thread(self.keys.kms.user_id, email)
            token = _next_id.set(_NextId(user_id))
            try:
                user = await original(*args, **kwargs)
            finally:
                _next_id.reset(token)
            if user is None:
                return None
            if user.id != user_id or not await asyncio.to_thread(self.has_key, user.id):
                await delete(user.id)
                what = "without a key" if user.id == user_id else "with an id not from KMS"
                raise LifecycleError(
                    f"Open WebUI created user {user.id} {what}; the user was deleted again. Open WebUI's "
                    "insert_new_auth changed: this owui-crypto release does not support it.")
            self.created += 1
            return user

        insert_new_auth.__owui_crypto_wraps__ = original  # type: ignore[attr-defined]
        return insert_new_auth

    def has_key(self, user_id: str) -> bool:
        with psycopg.connect(self.keys.dsn, autocommit=True) as conn:
            row = conn.execute('SELECT kms_encrypted_dek IS NOT NULL FROM public."user" WHERE id = %s',
                               (user_id,)).fetchone()
        return bool(row and row[0])

    def provision_on_insert(self, user_class: Any) -> None:
        """Provision every new ``user_class`` row inside the transaction that inserts it."""
        event.listen(user_class, "after_insert", self._after_user_insert)

    def _after_user_insert(self, mapper: Any, connection: Any, target: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a synchronous session (not used by Open WebUI at runtime)
            self.keys.provision(connection.connection.dbapi_connection, target.id)
            return
        from sqlalchemy.util import await_only

        bridge = LoopBridgeConnection(connection.connection.driver_connection, loop)
        await_only(asyncio.to_thread(self.keys.provision, bridge, target.id))

    # -- deletion ------------------------------------------------------------------

    def wrap_delete_auth_by_id(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        async def delete_auth_by_id(*args: Any, **kwargs: Any) -> Any:
            user_id = signature.bind(*args, **kwargs).arguments["id"]
            deleted = await original(*args, **kwargs)
            if deleted:
                await asyncio.to_thread(self.forget, user_id)
            return deleted

        delete_auth_by_id.__owui_crypto_wraps__ = original  # type: ignore[attr-defined]
        return delete_auth_by_id

    def forget(self, user_id: str) -> bool:
        """Crypto-shred ``user_id`` (own transaction) and evict their key from this process's cache."""
        try:
            with psycopg.connect(self.keys.dsn) as conn:
                found = self.keys.forget(conn, user_id)
        except Exception:
            self.keys.cache.evict(user_id)
            log.exception("could not forget the key registration of deleted user %s; it is retried at the "
                          "next start (its wrapped keys went with the user row)", user_id)
            return False
        self.shredded += 1
        log.info("user %s deleted: key registration forgotten%s", user_id, "" if found else " (none found)")
        return found


class LoopBridgeConnection:
    """Enough of a DB-API connection for :meth:`KeyService.provision` in a worker thread.

    Each statement is sent back to the event loop and run on ``aconn``, the
    psycopg ``AsyncConnection`` of a session that is suspended waiting for
    that thread, so it lands in the session's open transaction.
    """

    def __init__(self, aconn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._aconn = aconn
        self._loop = loop

    def cursor(self) -> LoopBridgeCursor:
        return LoopBridgeCursor(self._aconn, self._loop)


class LoopBridgeCursor:
    def __init__(self, aconn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._aconn = aconn
        self._loop = loop
        self._rows: list[tuple] = []

    async def _run(self, query: str, params: Any) -> list[tuple]:
        async with self._aconn.cursor() as cur:
            await cur.execute(query, params)
            return await cur.fetchall() if cur.description is not None else []

    def execute(self, query: str, params: Any = None) -> None:
        self._rows = asyncio.run_coroutine_threadsafe(self._run(query, params), self._loop).result()

    def fetchone(self) -> tuple | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[tuple]:
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        self._rows = []


# -- start-up reconciliation ----------------------------------------------------------


@dataclass(frozen=True)
class Reconciled:
    provisioned: tuple[str, ...]
    forgotten: tuple[str, ...]
    weak_copies_removed: tuple[str, ...] = ()


def reconcile(keys: KeyService) -> Reconciled:
    """Give every user without a key one; forget registrations of users that no longer exist;
    remove key copies that earlier releases wrapped under something the database holds."""
    provisioned, forgotten = [], []
    with psycopg.connect(keys.dsn) as conn:
        weak = keys.remove_weak_copies(conn)
    for user_id in weak.refused:
        log.warning("user %s has a key copy the database can open, but their KMS copy is missing or is not the "
                    "same key: left as is; check kms_encrypted_dek, then run owui-crypto remove-weak-copies", user_id)
    with psycopg.connect(keys.dsn, autocommit=True) as conn:
        missing = [r[0] for r in conn.execute(
            'SELECT id FROM public."user" WHERE kms_encrypted_dek IS NULL ORDER BY id')]
        orphans = [r[0] for r in conn.execute(
            'SELECT k.user_id FROM owui_crypto.user_key k WHERE NOT EXISTS '
            '(SELECT 1 FROM public."user" u WHERE u.id = k.user_id) ORDER BY 1')]
    for user_id in missing:
        with psycopg.connect(keys.dsn) as conn:
            if keys.provision(conn, user_id).created:
                provisioned.append(user_id)
    for user_id in orphans:
        with psycopg.connect(keys.dsn) as conn:
            keys.forget(conn, user_id)
        forgotten.append(user_id)
    return Reconciled(tuple(provisioned), tuple(forgotten), tuple(weak.removed))
