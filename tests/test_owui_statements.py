"""app_adapter.owui.statements: Open WebUI's ``INSERT ... ON CONFLICT (id) DO NOTHING`` on chat_message."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.types.json import Json
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app_adapter import errors
from app_adapter.hook import Adapter
from app_adapter.keys import KeyService
from app_adapter.owui.statements import SearchRewrite, UpsertRetarget
from tests.owui import insert_chat

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


# -- chat search: SearchRewrite ------------------------------------------------------------------------

SEARCHES = json.loads((Path(__file__).parent / "fixtures" / "owui_0_12_4_search.json").read_text())["statements"]


def opened(conn) -> int:
    """Values opened (fernet_open calls) so far in this transaction."""
    return conn.execute("SELECT COALESCE(pg_stat_get_xact_function_calls("
                        "'owui_crypto.fernet_open(bytea, text, bigint, bigint)'::regprocedure), 0)").fetchone()[0]


def run_search(app, keyring, user, sql, params) -> tuple[list[str], int]:
    keyring.activate(app, user)
    app.execute("SET LOCAL track_functions = 'all'")
    before = opened(app)
    rows = [r[0] for r in app.execute(sql, {**params, "user_id_1": user})]
    count = opened(app) - before
    app.rollback()
    return rows, count


@pytest.fixture
def searchable(app, keyring):
    """Alice's chats: matches by title, by history, by chat_message only, an archived match, others; Bob's match."""
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    chats = {
        "title": insert_chat(app, alice, "Gornergrat trip", [("user", "nothing"), ("assistant", "here")]),
        "history": insert_chat(app, alice, "Trip", [("user", "Is gornergrat open?"), ("assistant", "Yes")]),
        "both": insert_chat(app, alice, "Lakes", [("user", "Riffelsee then Gornergrat"), ("assistant", "ok")]),
        "messages": insert_chat(app, alice, "Other", [("user", "plain")]),
        "archived": insert_chat(app, alice, "Gornergrat archived", [("user", "x")]),
    }
    for i in range(6):
        insert_chat(app, alice, f"Unrelated {i}", [("user", f"cooking pasta {i}"), ("assistant", "fine")])
    app.execute("UPDATE chat_message SET content = %s WHERE chat_id = %s", (Json("gornergrat riffelsee"),
                                                                             chats["messages"]))
    app.execute("UPDATE chat SET archived = true WHERE id = %s", (chats["archived"],))
    app.execute("UPDATE chat SET updated_at = updated_at + n FROM (SELECT id, row_number() OVER (ORDER BY id) AS n"
                " FROM public.chat) AS o WHERE chat.id = o.id")  # distinct times: a stable order to compare
    app.commit()
    keyring.activate(app, bob)
    insert_chat(app, bob, "Gornergrat too", [("user", "gornergrat")])
    app.commit()
    return alice, chats


@pytest.mark.parametrize("query", sorted(SEARCHES))
def test_search_rewrite_returns_the_same_rows_opening_fewer_values(app, keyring, searchable, query):
    alice, chats = searchable
    sql, params = SEARCHES[query]["sql"], SEARCHES[query]["params"]
    rewrite = SearchRewrite()
    reshaped = rewrite.rewrite(sql)
    assert reshaped != sql and rewrite.count == 1
    rows, before = run_search(app, keyring, alice, sql, params)
    rows_after, after = run_search(app, keyring, alice, reshaped, params)
    assert rows_after == rows
    assert after < before or before == 0
    if query == "gornergrat":
        assert set(rows) == {chats["title"], chats["history"], chats["both"], chats["messages"]}
        # Each value at most once: 10 unarchived chats (title, body, summary) and their 21 messages.
        assert after <= 10 * 3 + 21 < before
    if query == "archived:true gornergrat":
        assert rows == [chats["archived"]]


def test_search_rewrite_leaves_other_statements_alone():
    rewrite = SearchRewrite()
    one_term = SEARCHES["gornergrat"]["sql"]
    others = ["SELECT chat.id, chat.title FROM chat WHERE chat.user_id = %(user_id_1)s::VARCHAR",
              one_term + " FOR UPDATE",
              one_term.replace("\nFROM chat \nWHERE chat.user_id", "\nFROM chat \nWHERE chat.folder_id"),
              one_term.replace("FROM chat_message AS message", "FROM chat_message AS msg")]
    assert [rewrite.rewrite(s) for s in others] == others
    assert rewrite.count == 0
    # The CASE stays where it decides the order (two terms) ...
    assert "ORDER BY CASE WHEN" in rewrite.rewrite(SEARCHES["gornergrat riffelsee"]["sql"])
    # ... and goes where every row returned passed the same test in WHERE.
    assert "ORDER BY CASE" not in rewrite.rewrite(one_term)


def test_the_installed_search_rewrite_reshapes_what_the_engine_sends(setup):
    engine, adapter, (alice, _) = setup
    search = SearchRewrite()
    search.install(engine)
    sql, params = SEARCHES["gornergrat"]["sql"], SEARCHES["gornergrat"]["params"]
    with adapter.acting_as_sync(alice), engine.connect() as conn:
        rows = conn.exec_driver_sql(sql, {**params, "user_id_1": alice}).all()
    assert rows == [] and search.count == 1
