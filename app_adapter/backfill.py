"""Sealing chat content written before owui-crypto was installed."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from tqdm import tqdm

from app_adapter.hook import Adapter
from app_adapter.keys import KeyService


@dataclass(frozen=True)
class Backfill:
    users: int  # users whose rows were visited
    rows: int  # rows rewritten (sealed)
    remaining: dict[str, int]  # "table.column" -> plaintext values still there (owners without a key)


def unsealed(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {f"{t}.{c}": n for t, c, n in conn.execute("SELECT * FROM owui_crypto.unsealed_counts()") if n}


def seal_existing(service: KeyService, *, progress: bool = True) -> Backfill:
    """Seal every plaintext value whose owner has a key; one transaction per user."""
    with psycopg.connect(service.dsn) as conn:
        users = [r[0] for r in conn.execute("SELECT user_id FROM owui_crypto.user_key ORDER BY user_id")]
    engine = sa.create_engine(service.dsn.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1)
    adapter = Adapter(service)
    adapter.install(engine)
    rows = 0
    try:
        for user_id in tqdm(users, desc="sealing", unit="user", disable=not progress):
            with adapter.acting_as_sync(user_id), engine.begin() as conn:
                rows += conn.execute(sa.text("SELECT owui_crypto.seal_existing(:u)"), {"u": user_id}).scalar_one()
            service.cache.evict(user_id)  # a backfill should not fill the cache with every key
        with engine.begin() as conn:  # the share-key tables
            rows += conn.execute(sa.text("SELECT owui_crypto.seal_existing(NULL)")).scalar_one()
    finally:
        adapter.uninstall()
        engine.dispose()
    return Backfill(len(users), rows, unsealed(service.dsn))
