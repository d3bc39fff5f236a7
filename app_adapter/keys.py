"""Where a user's key comes from: provisioning, resolution, forgetting.

A user's DEK exists at rest only wrapped: by KMS in ``"user".kms_encrypted_dek``
(the recovery path, and the one the adapter uses) and under the user-held key
in ``user_encrypted_dek``. The database also holds the key's fingerprint
(``owui_crypto.user_key``), which ``activate()`` checks.

:class:`KeyService` is the process-wide object that turns a user id into a
DEK: cache first, otherwise one KMS Decrypt. It never logs or shows a key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import psycopg

from app_adapter import userkeys
from app_adapter.config import Settings
from app_adapter.errors import CannotUnwrap, NotProvisioned
from app_adapter.keycache import KeyCache
from app_adapter.kms import DEK_BYTES, KmsKeys
from app_adapter.secret import SecretBytes

log = logging.getLogger(__name__)

SHARE_KEY = "share"


@dataclass(frozen=True)
class Provisioned:
    """What :meth:`KeyService.provision` did. No key material."""

    user_id: str
    key_id: str
    created: bool  # False: the user already had a key, which was kept


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
        return self.kms.unwrap_dek(user_id, bytes(row[0]))

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
        row = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key_wrapped(%s)", (SHARE_KEY,)).fetchone()
        return self.kms.unwrap_deployment_key(SHARE_KEY, bytes(row[0]))

    # -- lifecycle -----------------------------------------------------------

    def provision(self, conn: Any, user_id: str, user_secret: bytes | None = None) -> Provisioned:
        """Give ``user_id`` a DEK, once, inside the caller's transaction.

        ``conn`` is a psycopg connection (or DB-API cursor owner) whose
        ``"user"`` row for ``user_id`` exists. ``user_secret`` feeds the
        user-key path; until client certificates exist it defaults to the
        user id, as in the memo -- which protects nothing by itself, since the
        user id is in the same table. A user who already has a key keeps it.
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
        dek, wrapped = self.kms.new_dek(user_id)
        salt = userkeys.new_salt()
        user_key = userkeys.derive_user_key(user_secret if user_secret is not None else user_id.encode(), salt)
        sealed = userkeys.seal_dek_for_user(dek, user_key)
        if self.settings.store_user_key:
            log.warning("OWUI_CRYPTO_STORE_USER_KEY is on: storing user %s's user_key next to their sealed DEK; "
                        "anyone who can read the \"user\" table can open it", user_id)
        cur.execute(
            'UPDATE public."user" SET salt = %s, user_encrypted_dek = %s, user_key = %s, kms_encrypted_dek = %s'
            " WHERE id = %s",
            (salt, sealed.decode("ascii"), user_key.decode("ascii") if self.settings.store_user_key else None,
             wrapped, user_id))
        cur.execute("SELECT owui_crypto.register_user_key(%s, %s)", (user_id, userkeys.fingerprint(dek)))
        key_id = cur.fetchone()[0]
        return Provisioned(user_id, key_id, created=True)

    def open_with_user_secret(self, user_id: str, user_secret: bytes | None = None) -> SecretBytes:
        """The DEK through the user-key path (no KMS): the memo's normal path."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute('SELECT salt, user_encrypted_dek FROM public."user" WHERE id = %s',
                               (user_id,)).fetchone()
        if row is None or row[1] is None:
            raise NotProvisioned(f"user {user_id} has no sealed DEK")
        user_key = userkeys.derive_user_key(user_secret if user_secret is not None else user_id.encode(),
                                            bytes(row[0]))
        try:
            return userkeys.open_dek_for_user(row[1].encode("ascii"), user_key)
        except CannotUnwrap:
            raise CannotUnwrap(f"the user secret given for user {user_id} does not open their DEK") from None

    def forget(self, conn: Any, user_id: str) -> bool:
        """Crypto-shred ``user_id``: delete their wrapped DEKs and key registration
        (in the caller's transaction) and evict them from this process's cache."""
        cur = conn.cursor()
        cur.execute("SELECT owui_crypto.forget_user_key(%s)", (user_id,))
        self.cache.evict(user_id)
        return bool(cur.fetchone()[0])
