"""The adapter end to end: KMS (moto over HTTP), the key cache, the engine hook, PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
import uuid

import boto3
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from app_adapter import errors, userkeys
from app_adapter.hook import Adapter, acting_user
from app_adapter.keys import KeyService
from app_adapter.kms import KmsKeys, botocore_config
from app_adapter.secret import SecretBytes
from tests.serverlog import key_forms

CHAT = sa.table("chat", sa.column("id"), sa.column("user_id"), sa.column("title"), sa.column("chat", sa.JSON),
                sa.column("meta", sa.JSON))


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def add_users(db_url: str, service: KeyService, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with psycopg.connect(db_url) as conn:
        for uid in ids:
            conn.execute('INSERT INTO public."user" (id, email, name, role) VALUES (%s, %s, %s, %s)',
                         (uid, f"{uid}@example.com", uid[:8], "user"))
            service.provision(conn, uid)
    return ids


@pytest.fixture
def engine(db_url):
    eng = sa.create_engine(sa_url(db_url), pool_size=4, max_overflow=4)
    yield eng
    eng.dispose()


def write_and_read(adapter: Adapter, engine: sa.Engine, uid: str) -> list[tuple[str, str]]:
    with adapter.acting_as_sync(uid):
        with engine.begin() as conn:
            conn.execute(sa.insert(CHAT).values(id=f"c-{uid}", user_id=uid, title=f"secret of {uid}",
                                                chat={"history": {"messages": {}}}, meta={}))
        with engine.begin() as conn:
            return [tuple(r) for r in conn.execute(sa.select(CHAT.c.user_id, CHAT.c.title))]


MEMO_QUERIES = ("""
SELECT 
    email, 
    kms_encrypted_dek IS NOT NULL as has_kms_backup,
    user_encrypted_dek IS NOT NULL as has_user_dek
FROM "user" 
WHERE email = 'test@example.com';""", """
SELECT 
    COUNT(DISTINCT user_encrypted_dek) as unique_user_deks,
    COUNT(DISTINCT kms_encrypted_dek) as unique_kms_deks,
    COUNT(*) as total_users
FROM "user" 
WHERE user_encrypted_dek IS NOT NULL;""")


def test_provision_once_keeps_no_copy_the_database_can_open(db_url, service):
    (uid,) = add_users(db_url, service, 1)
    with psycopg.connect(db_url) as conn:
        again = service.provision(conn, uid)
        row = conn.execute('SELECT salt, user_encrypted_dek, user_key, kms_encrypted_dek FROM public."user"'
                           " WHERE id = %s", (uid,)).fetchone()
        assert again.created is False and len(again.key_id) == 16
        assert row[:3] == (None, None, None) and row[3]  # only the KMS copy
        assert service.dek(uid) == service.kms.unwrap_dek(uid, bytes(row[3]))
        # The memo's Phase 4 verification queries, verbatim: a KMS backup, no user-held copy.
        conn.execute('UPDATE public."user" SET email = %s WHERE id = %s', ("test@example.com", uid))
        assert conn.execute(MEMO_QUERIES[0]).fetchall() == [("test@example.com", True, False)]
        assert conn.execute(MEMO_QUERIES[1]).fetchone() == (0, 0, 0)


def test_a_user_held_secret_adds_a_copy_only_it_opens(db_url, kms_server):
    """OWUI_CRYPTO_USER_SECRET_PROVIDER: the memo's client-certificate hook, off by default."""
    svc = KeyService(kms_server.settings(user_secret_provider="tests.test_adapter:certificate_secret"), db_url)
    (uid,) = add_users(db_url, svc, 1)
    assert svc.open_with_user_secret(uid, certificate_secret(uid)) == svc.dek(uid)
    with pytest.raises(errors.CannotUnwrap):
        svc.open_with_user_secret(uid, uid.encode())  # the user id opens nothing
    with psycopg.connect(db_url) as conn:
        conn.execute('UPDATE public."user" SET email = %s WHERE id = %s', ("test@example.com", uid))
        assert conn.execute(MEMO_QUERIES[0]).fetchall() == [("test@example.com", True, True)]
        assert conn.execute(MEMO_QUERIES[1]).fetchone() == (1, 1, 1)


def write_legacy_copy(conn: psycopg.Connection, uid: str, dek: bytes, *, store_user_key: bool = False) -> None:
    """What earlier releases wrote: the DEK under PBKDF2(user id, salt), maybe with user_key beside it."""
    salt = userkeys.new_salt()
    user_key = userkeys.derive_user_key(uid.encode(), salt)
    conn.execute('UPDATE public."user" SET salt = %s, user_encrypted_dek = %s, user_key = %s WHERE id = %s',
                 (salt, userkeys.seal_dek_for_user(dek, user_key).decode(),
                  user_key.decode() if store_user_key else None, uid))


def test_remove_weak_copies_only_after_the_kms_copy_proves_the_same_key(db_url, kms_server):
    svc = KeyService(kms_server.settings(user_secret_provider="tests.test_adapter:certificate_secret"), db_url)
    legacy, stored, mismatched, held = add_users(db_url, svc, 4)
    with psycopg.connect(db_url) as conn:
        conn.execute('UPDATE public."user" SET salt = NULL, user_encrypted_dek = NULL WHERE id <> %s', (held,))
        write_legacy_copy(conn, legacy, svc.dek(legacy).reveal())
        write_legacy_copy(conn, stored, svc.dek(stored).reveal(), store_user_key=True)
        write_legacy_copy(conn, mismatched, os.urandom(32))  # would lose data if trusted
        found = svc.remove_weak_copies(conn)
        rows = dict(conn.execute('SELECT id, user_encrypted_dek IS NOT NULL OR salt IS NOT NULL OR user_key IS NOT NULL'
                                 ' FROM public."user"').fetchall())
    assert (sorted(found.removed), found.kept, found.refused) == (sorted([legacy, stored]), [held], [mismatched])
    assert rows == {legacy: False, stored: False, mismatched: True, held: True}
    assert svc.open_with_user_secret(held, certificate_secret(held)) == svc.dek(held)


def certificate_secret(user_id: str) -> bytes:
    """Stands in for material from a user's client certificate: nothing the database holds."""
    return b"cert-held:" + hashlib.sha256(b"outside the database" + user_id.encode()).digest()


def test_engine_hook_isolates_users_and_fails_closed(db_url, service, engine):
    alice, bob = add_users(db_url, service, 2)
    adapter = Adapter(service)
    adapter.install(engine)
    assert write_and_read(adapter, engine, alice) == [(alice, f"secret of {alice}")]
    assert sorted(write_and_read(adapter, engine, bob)) == sorted([(alice, "[encrypted]"), (bob, f"secret of {bob}")])
    with engine.begin() as conn:  # nobody bound: placeholders, never ciphertext
        assert {r[0] for r in conn.execute(sa.select(CHAT.c.title))} == {"[encrypted]"}
    with pytest.raises(sa.exc.DBAPIError) as excinfo:
        with engine.begin() as conn:
            conn.execute(sa.insert(CHAT).values(id="nobody", user_id=alice, title="x", meta={}))
    assert isinstance(errors.from_database(excinfo.value), errors.NoKeyActive)
    with adapter.acting_as_sync(bob):
        with pytest.raises(sa.exc.DBAPIError) as excinfo:
            with engine.begin() as conn:
                conn.execute(sa.update(CHAT).where(CHAT.c.id == f"c-{alice}").values(title="taken"))
    assert isinstance(errors.from_database(excinfo.value), errors.NotOwner)
    with psycopg.connect(db_url) as conn:
        titles = [r[0] for r in conn.execute("SELECT title FROM public.chat")]
    assert len(titles) == 2 and all(t.startswith("oc1:") for t in titles)


def test_keys_are_handed_over_only_to_transactions_that_name_a_protected_table(db_url, service, engine):
    """Lazy activation: a transaction on users or settings costs no round trip; one on chats gets the keys
    before its first such statement, and again after a savepoint that held the activation rolled back."""
    (alice,) = add_users(db_url, service, 1)
    adapter = Adapter(service)
    adapter.install(engine)
    with adapter.acting_as_sync(alice):
        with engine.begin() as conn:
            conn.execute(sa.text('SELECT count(*) FROM "user"'))
        assert adapter.metrics()["activations"] == 0
        with engine.begin() as conn:  # owui_crypto's own functions need the keys too
            assert conn.execute(sa.text("SELECT owui_crypto.active_user()")).scalar() == alice
        assert adapter.metrics()["activations"] == 1
        write_and_read(adapter, engine, alice)
        assert adapter.metrics()["activations"] == 3
        with engine.begin() as conn:
            with conn.begin_nested() as nested:
                conn.execute(sa.select(CHAT.c.title)).all()
                nested.rollback()
            assert conn.execute(sa.select(CHAT.c.title)).scalar() == f"secret of {alice}"
    assert adapter.metrics()["activations"] == 5


def test_refuses_drivers_that_inline_parameters(db_url, service):
    with pytest.raises(errors.UnsupportedDriver):
        Adapter(service).install(sa.create_engine("sqlite://"))
    with pytest.raises(errors.UnsupportedDriver, match="psycopg2"):
        Adapter(service).install(sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1)))
    client_side = sa.create_engine(sa_url(db_url), connect_args={"cursor_factory": psycopg.ClientCursor})
    Adapter(service).install(client_side)
    with pytest.raises(errors.UnsupportedDriver, match="client-side binding"):
        client_side.connect()
    client_side.dispose()


def test_async_engine_hook_and_context_follows_tasks_and_threads(db_url, service):
    alice, bob = add_users(db_url, service, 2)

    async def main() -> None:
        engine = create_async_engine(sa_url(db_url), pool_size=2)
        adapter = Adapter(service)
        adapter.install(engine)
        try:
            async with adapter.acting_as(alice):
                async with engine.begin() as conn:
                    await conn.execute(sa.insert(CHAT).values(id="a1", user_id=alice, title="alice async", meta={}))

                async def child() -> str:  # asyncio.create_task copies the context
                    async with engine.connect() as conn:
                        return (await conn.execute(sa.select(CHAT.c.title))).scalar_one()

                assert await asyncio.create_task(child()) == "alice async"
                # Starlette's run_in_threadpool is anyio's to_thread, which copies the context too.
                assert await asyncio.to_thread(acting_user) == alice
            async with adapter.acting_as(bob):
                async with engine.connect() as conn:
                    assert (await conn.execute(sa.select(CHAT.c.title))).scalar_one() == "[encrypted]"
        finally:
            await engine.dispose()

    asyncio.run(main())


def _pool_is_clean(engine: sa.Engine) -> list[tuple]:
    """Check out every pooled connection and read what key settings it holds outside a transaction."""
    leftovers, held = [], []
    for _ in range(engine.pool.size()):
        raw = engine.raw_connection()
        held.append(raw)
        cur = raw.cursor()
        cur.execute("SELECT current_setting('owui_crypto.user_key', true),"
                    " current_setting('owui_crypto.share_key', true)")
        row = cur.fetchone()
        raw.rollback()
        if any(row):
            leftovers.append(row)
    for raw in held:
        raw.close()
    return leftovers


def run_concurrency(url: str, service: KeyService, users: list[str], connect_args: dict) -> dict:
    engine = sa.create_engine(sa_url(url), pool_size=4, max_overflow=0, connect_args=connect_args)
    aengine = create_async_engine(sa_url(url), pool_size=4, max_overflow=0, connect_args=connect_args)
    adapter = Adapter(service)
    adapter.install(engine)
    adapter.install(aengine)
    leaks: list[str] = []
    thread_users, task_users = users[:8], users[8:16]

    def thread_work(uid: str) -> None:
        with adapter.acting_as_sync(uid):
            for i in range(15):
                with engine.begin() as conn:
                    conn.execute(sa.insert(CHAT).values(id=f"t-{uid}-{i}", user_id=uid, title=f"plain {uid} {i}",
                                                        meta={}))
                with engine.begin() as conn:
                    for owner, title in conn.execute(sa.select(CHAT.c.user_id, CHAT.c.title)):
                        if owner != uid and title != "[encrypted]":
                            leaks.append(f"{uid} read {owner}: {title}")

    async def task_work(uid: str) -> None:
        async with adapter.acting_as(uid):
            for i in range(15):
                async with aengine.begin() as conn:
                    await conn.execute(sa.insert(CHAT).values(id=f"a-{uid}-{i}", user_id=uid,
                                                              title=f"plain {uid} {i}", meta={}))
                async with aengine.connect() as conn:
                    for owner, title in await conn.execute(sa.select(CHAT.c.user_id, CHAT.c.title)):
                        if owner != uid and title != "[encrypted]":
                            leaks.append(f"{uid} read {owner}: {title}")
                await asyncio.sleep(0)

    async def tasks() -> None:
        await asyncio.gather(*(task_work(u) for u in task_users))
        await aengine.dispose()

    threads = [threading.Thread(target=thread_work, args=(u,)) for u in thread_users]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    leftovers = _pool_is_clean(engine)
    engine.dispose()
    return {"leaks": leaks, "leftovers": leftovers, **adapter.metrics()}


def test_concurrent_users_on_a_shared_pool(db_url, service):
    users = add_users(db_url, service, 16)
    result = run_concurrency(db_url, service, users, {})
    assert result["leaks"] == [] and result["leftovers"] == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM public.chat WHERE title LIKE 'oc1:%'").fetchone()[0] == 16 * 15
        assert conn.execute("SELECT count(*) FROM public.chat WHERE title NOT LIKE 'oc1:%'").fetchone()[0] == 0


@pytest.mark.pgbouncer
def test_concurrent_users_through_pgbouncer_transaction_pooling(db, db_url, service, pgbouncer):
    users = add_users(db_url, service, 16)
    # PgBouncer 1.18 cannot keep protocol-level prepared statements: psycopg must not make any.
    result = run_concurrency(pgbouncer.url(db), service, users, {"prepare_threshold": None})
    assert result["leaks"] == [] and result["leftovers"] == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM public.chat WHERE title LIKE 'oc1:%'").fetchone()[0] == 16 * 15
    # The pooler really moved clients between backends, and they recovered in-transaction.
    assert result["transport_renewals"] > 0
    print(f"pgbouncer: {result}")


def test_single_flight_one_kms_call_for_concurrent_binds(db_url, service):
    (uid,) = add_users(db_url, service, 1)
    service.cache.clear()
    before = service.kms.metrics()["calls"].get("Decrypt", 0)
    adapter = Adapter(service)

    async def bind_many() -> None:
        async def one() -> None:
            async with adapter.acting_as(uid):
                await asyncio.sleep(0.01)
        await asyncio.gather(*(one() for _ in range(16)))

    asyncio.run(bind_many())
    assert service.kms.metrics()["calls"].get("Decrypt", 0) - before == 1


def test_kms_outage_fails_fast_and_cached_users_keep_working(db_url, kms_server, engine):
    service = KeyService(kms_server.settings(kms_connect_timeout=1.0, kms_read_timeout=1.0, kms_max_attempts=2),
                         db_url)
    cached, uncached = add_users(db_url, service, 2)
    adapter = Adapter(service)
    adapter.install(engine)
    service.dek(cached)
    service.cache.evict(uncached)
    # KMS goes away: an endpoint that accepts connections and never answers.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    settings = kms_server.settings(kms_connect_timeout=1.0, kms_read_timeout=1.0, kms_max_attempts=2)
    service.kms = KmsKeys(settings, client=boto3.session.Session().client(
        "kms", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{hang.getsockname()[1]}",
        config=botocore_config(settings)))
    try:
        started = time.monotonic()
        with pytest.raises(errors.KmsUnreachable):
            with adapter.acting_as_sync(uncached):
                pass
        assert time.monotonic() - started < 5
        with adapter.acting_as_sync(cached):
            with engine.begin() as conn:
                conn.execute(sa.insert(CHAT).values(id="during-outage", user_id=cached, title="still works", meta={}))
                assert conn.execute(sa.select(CHAT.c.title)).scalar_one() == "still works"
        with pytest.raises(sa.exc.DBAPIError):
            with engine.begin() as conn:  # the uncached user never got bound: nothing is written in plaintext
                conn.execute(sa.insert(CHAT).values(id="no-key", user_id=uncached, title="plaintext?", meta={}))
    finally:
        hang.close()
    with psycopg.connect(db_url) as conn:
        assert [r[0][:4] for r in conn.execute("SELECT title FROM public.chat")] == ["oc1:"]


def test_secret_never_in_repr(db_url, service):
    (uid,) = add_users(db_url, service, 1)
    key = service.dek(uid)
    adapter = Adapter(service)
    with adapter.acting_as_sync(uid):
        from app_adapter.hook import _acting
        text = repr(_acting.get()) + repr(adapter) + repr(service) + repr(service.cache) + str(key)
    assert isinstance(key, SecretBytes)
    assert not any(form in text for form in key_forms(key.reveal()))
