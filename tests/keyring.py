"""Test users and their keys, registered in a test database without KMS.

Keys are random; only their fingerprints reach the database, as in
production. Activation goes through the real entry point
(:class:`app_adapter.transport.Transport`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import psycopg

from app_adapter import userkeys
from app_adapter.transport import Transport


@dataclass
class Keyring:
    db_url: str
    keys: dict[str, bytes] = field(default_factory=dict)
    share_key: bytes | None = None
    transports: dict[int, Transport] = field(default_factory=dict)  # per connection, as the adapter keeps them

    def user(self, user_id: str | None = None) -> str:
        """Register a fresh key for a new user and return the user id."""
        user_id = user_id or str(uuid.uuid4())
        key = os.urandom(32)
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("SELECT owui_crypto.register_user_key(%s, %s)", (user_id, userkeys.fingerprint(key)))
        self.keys[user_id] = key
        return user_id

    def share(self) -> bytes:
        if self.share_key is None:
            key = os.urandom(32)
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                conn.execute("SELECT owui_crypto.register_deployment_key('share', %s, 'test-cmk', %s)",
                             (userkeys.fingerprint(key), b"not-a-real-kms-blob"))
            self.share_key = key
        return self.share_key

    def activate(self, conn: psycopg.Connection, user_id: str | None, *, share: bool = True,
                 transport: Transport | None = None) -> Transport:
        """Give conn's current transaction the keys of user_id (and the share key)."""
        transport = transport or self.transports.setdefault(id(conn), Transport())
        with conn.cursor() as cur:
            transport.activate(cur, user_id, self.keys.get(user_id) if user_id else None,
                               self.share() if share else None)
        return transport

