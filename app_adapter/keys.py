"""Where a user's key comes from: provisioning, resolution, forgetting.

A user's DEK exists at rest only wrapped by KMS, in ``"user".kms_encrypted_dek``
(the recovery path, and the one the adapter uses). A second, user-held copy
(``user_encrypted_dek`` under PBKDF2 of ``salt`` and a secret the user holds)
is written only when such a secret is supplied (``user_secret`` or
``OWUI_CRYPTO_USER_SECRET_PROVIDER``): a copy wrapped under anything the
database holds -- the user id, as the memo's interim plan did -- would open
for anyone holding a dump. The database also holds the key's fingerprint
(``owui_crypto.user_key``), which ``activate()`` checks.

:class:`KeyService` is the process-wide object that turns a user id into a
DEK: cache first, otherwise one KMS Decrypt. It never logs or shows a key.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from app_adapter import erasure, userkeys
from app_adapter.config import Settings
from app_adapter.errors import CannotUnwrap, InvalidInput, NotProvisioned
from app_adapter.keycache import KeyCache
from app_adapter.kms import DEK_BYTES, KmsKeys
from app_adapter.secret import SecretBytes
from app_adapter.sqlrows import scalar

log = logging.getLogger(__name__)

SHARE_KEY = "share"


@dataclass(frozen=True)
class Provisioned:
    """What :meth:`KeyService.provision` did. No key material."""

    user_id: str
    key_id: str
    created: bool  # False: the user already had a key, which was kept


@dataclass(frozen=True)
class WeakCopies:
    """What :meth:`KeyService.remove_weak_copies` found. No key material."""

    removed: list[str] = field(default_factory=list)  # users whose database-openable copy is gone
    kept: list[str] = field(default_factory=list)  # copies nothing in the database opens (user-held)
    refused: list[str] = field(default_factory=list)  # the KMS copy did not open to the same key: left alone


#: Secrets a copy may have been wrapped under that the database itself holds.
def _database_held_secrets(user_id: str, email: str | None, name: str | None) -> list[bytes]:
    return [v.encode() for v in (user_id, email, name) if v]


UserSecret = Callable[[str], bytes | None]


def load_provider(spec: str) -> UserSecret:
    """``module:function`` -> the function (``OWUI_CRYPTO_USER_SECRET_PROVIDER``)."""
    module, _, name = spec.partition(":")
    provider: UserSecret = getattr(importlib.import_module(module), name)
    return provider


class KeyService:
    """Per-process: KMS, the key cache, and the database's key columns."""

    def __init__(self, settings: Settings, dsn: str, *, kms: KmsKeys | None = None,
                 cache: KeyCache | None = None) -> None:
        """``dsn`` is a libpq URL of the database (a plain connection: key
        lookups must not go through the hooked engine)."""
        self.settings = settings
        self.dsn = dsn.replace("postgresql+psycopg://", "postgresql://", 1)
        self.kms = kms or KmsKeys(settings)
        self.cache = cache or KeyCache.from_settings(settings)
        self._share_key: SecretBytes | None = None
        self.user_secret: UserSecret | None = (
            load_provider(settings.user_secret_provider) if settings.user_secret_provider else None)
        # OWUI_CRYPTO_ERASURE=grants: per-user KMS grants, made at provision, retired at forget (None: off).
        self.erasure = erasure.from_settings(settings, self.kms)

    def __repr__(self) -> str:
        return f"KeyService(kms={self.kms!r}, cache={self.cache!r})"

    # -- resolution ----------------------------------------------------------

    def dek(self, user_id: str) -> SecretBytes:
        """The DEK of ``user_id``; blocks on KMS on a cache miss."""
        return self.cache.get(user_id, lambda: self._load(user_id))

    async def adek(self, user_id: str) -> SecretBytes:
        """The DEK of ``user_id`` without blocking the event loop."""
        return await self.cache.aget(user_id, lambda: self._load(user_id))

    def _load(self, user_id: str) -> SecretBytes:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute('SELECT kms_encrypted_dek FROM public."user" WHERE id = %s', (user_id,)).fetchone()
        if row is None or row[0] is None:
            raise NotProvisioned(f"user {user_id} has no wrapped key: provision them first "
                                 "(owui-crypto provision, or sign them up through owui-crypto serve)")
        tokens = self.erasure.grant_tokens(user_id) if self.erasure is not None else ()
        if tokens:  # a grant made here minutes ago may not have reached every KMS endpoint: show its token
            return self.kms.unwrap_dek_with_grant_tokens(user_id, bytes(row[0]), tokens)
        return self.kms.unwrap_dek(user_id, bytes(row[0]))

    def protected_tables(self) -> list[str]:
        """The tables the policy protects: the decrypting views' names (the catalog is readable by any role)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_catalog.pg_class c"
                " WHERE c.relnamespace = 'owui_crypto_view'::regnamespace AND c.relkind = 'v' ORDER BY 1")]

    def share_key(self) -> SecretBytes:
        """The deployment's share key, made and registered on first use."""
        if self._share_key is None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self._share_key = self._share_key_from(conn)
        return self._share_key

    def _share_key_from(self, conn: psycopg.Connection) -> SecretBytes:
        row = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key_wrapped(%s)", (SHARE_KEY,)).fetchone()
        if row and row[0] is not None:
            return self.kms.unwrap_deployment_key(SHARE_KEY, bytes(row[0]))
        key = SecretBytes(os.urandom(DEK_BYTES))
        wrapped = self.kms.wrap_deployment_key(SHARE_KEY, key)
        conn.execute("SELECT owui_crypto.register_deployment_key(%s, %s, %s, %s)",
                     (SHARE_KEY, userkeys.fingerprint(key), self.settings.application_cmk_id, wrapped))
        # Another process may have registered first: use whatever is stored.
        stored = scalar(conn, "SELECT kms_wrapped FROM owui_crypto.deployment_key_wrapped(%s)", (SHARE_KEY,))
        return self.kms.unwrap_deployment_key(SHARE_KEY, bytes(stored))

    # -- lifecycle -----------------------------------------------------------

    def provision(self, conn: Any, user_id: str, user_secret: bytes | None = None) -> Provisioned:
        """Give ``user_id`` a DEK, once, inside the caller's transaction.

        ``conn`` is a psycopg connection (or DB-API cursor owner) whose
        ``"user"`` row for ``user_id`` exists. A user-held copy of the DEK is
        written only with a ``user_secret`` (given, or from the configured
        provider); otherwise ``salt`` and ``user_encrypted_dek`` stay NULL and
        the KMS copy is the only way back. A user who already has a key keeps it.
        """
        cur = conn.cursor()
        cur.execute('SELECT kms_encrypted_dek IS NOT NULL FROM public."user" WHERE id = %s FOR UPDATE', (user_id,))
        row = cur.fetchone()
        if row is None:
            raise NotProvisioned(f'user {user_id} has no row in "user": create the user before provisioning')
        if row[0]:
            cur.execute("SELECT key_id FROM owui_crypto.user_key WHERE user_id = %s", (user_id,))
            found = cur.fetchone()
            return Provisioned(user_id, found[0] if found else "", created=False)
        if user_secret is None and self.user_secret is not None:
            user_secret = self.user_secret(user_id)
        dek, wrapped = self.kms.new_dek(user_id)
        if self.erasure is not None:
            # After GenerateDataKey, so a failure there leaves no grant; one left by a later rollback is
            # retired by python -m app_adapter.erasure sync.
            self.erasure.grant(user_id)
        salt, sealed = None, None
        if user_secret is not None:
            salt = userkeys.new_salt()
            sealed = userkeys.seal_dek_for_user(dek, userkeys.derive_user_key(user_secret, salt)).decode("ascii")
        cur.execute('UPDATE public."user" SET salt = %s, user_encrypted_dek = %s, user_key = NULL,'
                    " kms_encrypted_dek = %s WHERE id = %s", (salt, sealed, wrapped, user_id))
        cur.execute("SELECT owui_crypto.register_user_key(%s, %s)", (user_id, userkeys.fingerprint(dek)))
        key_id = cur.fetchone()[0]
        return Provisioned(user_id, key_id, created=True)

    def remove_weak_copies(self, conn: Any) -> WeakCopies:
        """Remove user-held copies that open with something the database holds.

        Earlier releases wrapped ``user_encrypted_dek`` under PBKDF2 of the user
        id (and could store ``user_key`` beside it): a dump opened every DEK. A
        copy is removed only after the user's KMS copy has been opened and found
        to be the same key, so nothing is lost; one that opens with none of
        them is user-held and kept. Runs in the caller's transaction.
        """
        found = WeakCopies()
        cur = conn.cursor()
        cur.execute('SELECT id, email, name, salt, user_encrypted_dek, user_key, kms_encrypted_dek FROM public."user"'
                    " WHERE user_encrypted_dek IS NOT NULL OR user_key IS NOT NULL OR salt IS NOT NULL FOR UPDATE")
        for user_id, email, name, salt, sealed, stored_key, kms_copy in cur.fetchall():
            opened = self._open_weak_copy(user_id, email, name, salt, sealed, stored_key)
            if sealed is not None and opened is None:
                found.kept.append(user_id)
                continue
            if kms_copy is None or (opened is not None and self.kms.unwrap_dek(user_id, bytes(kms_copy)) != opened):
                found.refused.append(user_id)
                continue
            cur.execute('UPDATE public."user" SET salt = NULL, user_encrypted_dek = NULL, user_key = NULL'
                        " WHERE id = %s", (user_id,))
            found.removed.append(user_id)
        return found

    @staticmethod
    def _open_weak_copy(user_id: str, email: str | None, name: str | None, salt: bytes | None,
                        sealed: str | None, stored_key: str | None) -> SecretBytes | None:
        if sealed is None or salt is None:
            return None
        keys = [stored_key.encode("ascii")] if stored_key else []
        keys += [userkeys.derive_user_key(s, bytes(salt)) for s in _database_held_secrets(user_id, email, name)]
        for key in keys:
            try:
                return userkeys.open_dek_for_user(sealed.encode("ascii"), key)
            except (CannotUnwrap, InvalidInput):
                continue
        return None

    def open_with_user_secret(self, user_id: str, user_secret: bytes) -> SecretBytes:
        """The DEK through the user-held copy (no KMS), for a user who has one."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute('SELECT salt, user_encrypted_dek FROM public."user" WHERE id = %s',
                               (user_id,)).fetchone()
        if row is None or row[1] is None:
            raise NotProvisioned(f"user {user_id} has no user-held copy of their key")
        user_key = userkeys.derive_user_key(user_secret, bytes(row[0]))
        try:
            return userkeys.open_dek_for_user(row[1].encode("ascii"), user_key)
        except CannotUnwrap:
            raise CannotUnwrap(f"the user secret given for user {user_id} does not open their DEK") from None

    def forget(self, conn: Any, user_id: str) -> bool:
        """Crypto-shred ``user_id``: delete their wrapped DEKs and key registration
        (in the caller's transaction) and evict them from this process's cache.

        With erasure on, also retire their KMS grant(s), so backups stop opening their DEK; if that fails,
        :class:`~app_adapter.erasure.ErasureIncomplete` is raised and the caller's transaction must roll
        back, which keeps the registration for the next attempt (the start-up reconcile retries it)."""
        cur = conn.cursor()
        cur.execute("SELECT owui_crypto.forget_user_key(%s)", (user_id,))
        self.cache.evict(user_id)
        found = bool(cur.fetchone()[0])
        if self.erasure is not None:
            self.erasure.retire(user_id)
        return found
