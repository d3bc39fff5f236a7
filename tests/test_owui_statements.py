"""app_adapter.owui.statements: Open WebUI's ``INSERT ... ON CONFLICT (id) DO NOTHING`` on chat_message."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app_adapter import errors
from app_adapter.hook import Adapter
from app_adapter.keys import KeyService
from app_adapter.owui.statements import UpsertRetarget

METADATA = sa.MetaData()
CHAT = sa.Table("chat", METADATA, sa.Column("id", sa.Text, primary_key=True), sa.Column("user_id", sa.Text),
                sa.Column("title", sa.Text), sa.Column("chat", sa.JSON), sa.Column("meta", sa.JSON))
MESSAGE = sa.Table("chat_message", METADATA, sa.Column("id", sa.Text, primary_key=True),
                   sa.Column("chat_id", sa.Text), sa.Column("user_id", sa.Text), sa.Column("role", sa.Text),
                   sa.Column("content", sa.JSON))


@pytest.fixture
def setup(kms_server, db_url):
    service = KeyService(kms_server.settings(), db_url)
    ids = []
    with psycopg.connect(db_url) as conn:
        for name in ("alice", "bob"):
            uid = str(uuid.uuid4())
            conn.execute('INSERT INTO "user" (id, email, name, role) VALUES (%s, %s, %s, %s)',
                         (uid, f"{name}@example.com", name, "user"))
            service.provision(conn, uid)
            ids.append(uid)
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    adapter = Adapter(service)
    adapter.install(engine)
    with adapter.acting_as_sync(ids[0]), engine.begin() as conn:
        conn.execute(sa.insert(CHAT).values(id="c1", user_id=ids[0], title="t", chat={}, meta={}))
    yield engine, adapter, ids
    engine.dispose()
    service.kms.close()


def upsert(rows):
    return pg_insert(MESSAGE).on_conflict_do_nothing(index_elements=["id"]), rows


def test_postgresql_refuses_on_conflict_on_the_view(setup):
    engine, adapter, (alice, _) = setup
    with adapter.acting_as_sync(alice), pytest.raises(sa.exc.ProgrammingError, match="ON CONFLICT"):
        with engine.begin() as conn:
            conn.execute(*upsert([{"id": "c1-m1", "chat_id": "c1", "user_id": alice, "role": "user",
                                   "content": "hello"}]))


def test_the_upsert_goes_to_the_base_table_sealed_and_owner_checked(setup, db_url):
    engine, adapter, (alice, bob) = setup
    retarget = UpsertRetarget(MESSAGE)
    retarget.install(engine)
    rows = [{"id": f"c1-m{i}", "chat_id": "c1", "user_id": alice, "role": "user", "content": f"secret {i}"}
            for i in range(3)]
    with adapter.acting_as_sync(alice), engine.begin() as conn:
        conn.execute(*upsert(rows))
        conn.execute(*upsert([{**rows[0], "content": "newer"}]))  # conflict: nothing happens
        conn.execute(sa.insert(MESSAGE).values(id="c1-plain", chat_id="c1", user_id=alice, role="user",
                                               content="plain insert"))  # not retargeted: through the view
    assert retarget.count == 2
    with adapter.acting_as_sync(alice), engine.connect() as conn:
        read = dict(conn.execute(sa.select(MESSAGE.c.id, MESSAGE.c.content)).all())
    assert read == {"c1-m0": "secret 0", "c1-m1": "secret 1", "c1-m2": "secret 2", "c1-plain": "plain insert"}
    with psycopg.connect(db_url) as conn:
        stored = [r[0] for r in conn.execute("SELECT content::text FROM public.chat_message")]
    assert len(stored) == 4 and all(s.startswith('"oc1:') for s in stored)
    # Bob cannot add to Alice's chat through the base table either.
    with adapter.acting_as_sync(bob), pytest.raises(sa.exc.DBAPIError) as refused:
        with engine.begin() as conn:
            conn.execute(*upsert([{"id": "c1-bob", "chat_id": "c1", "user_id": bob, "role": "user",
                                   "content": "intruder"}]))
    assert isinstance(errors.from_database(refused.value), errors.NotOwner)
