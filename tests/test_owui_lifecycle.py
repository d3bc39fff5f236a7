"""app_adapter.owui.lifecycle without Open WebUI: ids from KMS, keys in the inserting transaction, shredding.

Open WebUI's models are stood in for by a minimal ORM mapping of its
``"user"`` table and by functions shaped like ``AuthsTable.insert_new_auth`` /
``delete_auth_by_id``; e2e/ runs the real ones.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest
from sqlalchemy import Text, delete
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, mapped_column

from app_adapter import errors
from app_adapter.owui import lifecycle


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "user"
    id = mapped_column(Text, primary_key=True)
    email = mapped_column(Text)
    name = mapped_column(Text)
    role = mapped_column(Text)


@pytest.fixture
def users(service):
    life = lifecycle.UserLifecycle(service)
    life.provision_on_insert(User)
    yield life
    from sqlalchemy import event

    event.remove(User, "after_insert", life._after_user_insert)


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def key_columns(db_url: str, user_id: str):
    """(has a KMS copy, has no copy the database could open)"""
    with psycopg.connect(db_url) as conn:
        return conn.execute('SELECT kms_encrypted_dek IS NOT NULL, user_encrypted_dek IS NULL FROM "user" '
                            "WHERE id = %s", (user_id,)).fetchone()


def test_key_is_provisioned_in_the_inserting_transaction_off_the_event_loop(db_url, users, service):
    async def main() -> tuple[int, float]:
        engine = create_async_engine(sa_url(db_url))
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        async with async_sessionmaker(engine)() as session:
            session.add(User(id="u-1", email="u1@example.com", name="U1", role="user"))
            await session.commit()
        elapsed = time.monotonic() - started
        stop.set()
        await task
        await engine.dispose()
        return ticks, elapsed

    ticks, elapsed = asyncio.run(main())
    assert key_columns(db_url, "u-1") == (True, True)
    assert service.dek("u-1")  # opens: KMS copy and registration agree
    # PBKDF2 (600,000 rounds) and KMS ran in a worker thread: the loop kept ticking meanwhile.
    assert ticks >= 0.5 * elapsed / 0.01, f"event loop stalled: {ticks} ticks in {elapsed:.2f} s"


def test_a_failed_provisioning_rolls_the_user_back(db_url, users, service, monkeypatch):
    def refuse(user_id):
        raise errors.KmsUnreachable("KMS did not answer (test)")

    monkeypatch.setattr(service.kms, "new_dek", refuse)

    async def main() -> None:
        engine = create_async_engine(sa_url(db_url))
        try:
            async with async_sessionmaker(engine)() as session:
                session.add(User(id="u-2", email="u2@example.com", name="U2", role="user"))
                with pytest.raises(errors.KmsUnreachable):
                    await session.commit()
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert key_columns(db_url, "u-2") is None  # no user row without its wrapped DEK


def fake_owui(db_url: str, shim: lifecycle.UuidWithUserIds):
    """insert_new_auth / delete_auth_by_id shaped like Open WebUI's (models/auths.py:288, :420)."""
    engine = create_async_engine(sa_url(db_url))
    made = async_sessionmaker(engine)

    async def insert_new_auth(email, password, name, profile_image_url="/user.png", role="pending", oauth=None,
                              db=None):
        new_id = str(shim.uuid4())
        stamp = str(shim.uuid4())
        assert stamp != new_id
        async with made() as session:
            session.add(User(id=new_id, email=email, name=name, role=role))
            await session.commit()
        return User(id=new_id, email=email, name=name, role=role)

    async def delete_auth_by_id(id, db=None):
        async with made() as session:
            result = await session.execute(delete(User).where(User.id == id))
            await session.commit()
            return result.rowcount == 1

    return engine, insert_new_auth, delete_auth_by_id


def test_sign_up_gets_the_kms_id_and_deletion_shreds(db_url, users, service):
    async def main() -> tuple[str, str]:
        engine, insert, delete_user = fake_owui(db_url, lifecycle.UuidWithUserIds())
        delete_wrapped = users.wrap_delete_auth_by_id(delete_user)
        insert_wrapped = users.wrap_insert_new_auth(insert, delete_wrapped)
        try:
            user = await insert_wrapped(email="Carol@Example.com", password="x", name="Carol", role="user")
            other = uuid.uuid4()  # outside a sign-up the proxy is the real uuid4
            assert isinstance(other, uuid.UUID)
            service.dek(user.id)
            assert await delete_wrapped(user.id) is True
            return user.id, str(other)
        finally:
            await engine.dispose()

    user_id, _ = asyncio.run(main())
    assert user_id == service.kms.user_id("carol@example.com")
    assert key_columns(db_url, user_id) is None
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM owui_crypto.user_key WHERE user_id = %s",
                            (user_id,)).fetchone() == (0,)
    assert service.cache.evict(user_id) is False  # already evicted
    with pytest.raises(errors.NotProvisioned):
        service.dek(user_id)
    assert users.created == 1 and users.shredded == 1


def test_an_id_not_from_kms_is_deleted_again(db_url, users, service):
    class Unpatched:  # as if Open WebUI stopped using models.auths.uuid for the id
        def uuid4(self):
            return uuid.uuid4()

    async def main() -> None:
        engine, insert, delete_user = fake_owui(db_url, Unpatched())  # type: ignore[arg-type]
        try:
            wrapped = users.wrap_insert_new_auth(insert, users.wrap_delete_auth_by_id(delete_user))
            with pytest.raises(lifecycle.LifecycleError, match="not from KMS"):
                await wrapped("dave@example.com", "x", "Dave")
        finally:
            await engine.dispose()

    asyncio.run(main())
    with psycopg.connect(db_url) as conn:
        assert conn.execute("""SELECT count(*) FROM "user" WHERE email = 'dave@example.com'""").fetchone() == (0,)


def test_reconcile_provisions_keyless_users_and_forgets_orphans(db_url, service):
    with psycopg.connect(db_url) as conn:
        conn.execute("""INSERT INTO "user" (id, email, name, role) VALUES ('old-1', 'old@example.com', 'Old', 'user'),
                        ('gone-1', 'gone@example.com', 'Gone', 'user')""")
        service.provision(conn, "gone-1")
        conn.execute("""DELETE FROM "user" WHERE id = 'gone-1'""")  # deleted without forgetting (a crash)
    done = lifecycle.reconcile(service)
    assert done.provisioned == ("old-1",) and done.forgotten == ("gone-1",)
    assert key_columns(db_url, "old-1") == (True, True)
    assert lifecycle.reconcile(service) == lifecycle.Reconciled((), ())
