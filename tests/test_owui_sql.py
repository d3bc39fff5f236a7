"""The SQL Open WebUI 0.12.4 actually runs, through the views."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.types.json import Json

from tests.owui import insert_chat, raw

# Open WebUI's chat search (models/chats.py:2157-2346), as it reaches PostgreSQL
# for a one-word query: the title, chat_message rows, history.messages and the
# legacy messages list, then its \u0000 and \x00 safety filters.
OWUI_SEARCH = r"""
SELECT chat.id FROM chat
WHERE chat.user_id = %(me)s AND CAST((chat.meta ->> 'internal') AS BOOLEAN) IS NOT true
  AND chat.archived = false
  AND (chat.title ILIKE %(title_key)s::VARCHAR
   OR EXISTS (SELECT 1 FROM chat_message AS message WHERE message.chat_id = chat.id
        AND message.user_id = chat.user_id AND json_typeof(message.content) = 'string'
        AND LOWER(message.content #>> '{}') LIKE '%%' || %(content_key)s || '%%')
   OR EXISTS (SELECT 1 FROM json_each(chat.chat #> '{history,messages}') AS history_message
        WHERE json_typeof(history_message.value -> 'content') = 'string'
        AND LOWER(history_message.value ->> 'content') LIKE '%%' || %(content_key)s || '%%')
   OR EXISTS (SELECT 1 FROM json_array_elements(chat.chat -> 'messages') AS legacy_message
        WHERE json_typeof(legacy_message -> 'content') = 'string'
        AND LOWER(legacy_message ->> 'content') LIKE '%%' || %(content_key)s || '%%'))
  AND chat.chat::text NOT LIKE '%%\\u0000%%' AND chat.title::text NOT LIKE '%%\x00%%'
ORDER BY chat.updated_at DESC, chat.id LIMIT 60 OFFSET 0
"""


def search(conn, me: str, word: str) -> list[str]:
    return [r[0] for r in conn.execute(OWUI_SEARCH, {"me": me, "title_key": f"%{word}%", "content_key": word})]


def test_owui_search_finds_the_owners_matches_only(app, keyring):
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    by_title = insert_chat(app, alice, "Hiking plans", [("user", "nothing here")])
    by_text = insert_chat(app, alice, "Trip", [("user", "Is Gornergrat open?"), ("assistant", "Yes")])
    insert_chat(app, alice, "Unrelated", [("user", "cooking pasta")])
    # A chat whose only copy of the word is in chat_message (history edited elsewhere).
    only_messages = insert_chat(app, alice, "Other", [("user", "plain")])
    app.execute("UPDATE chat_message SET content = %s WHERE chat_id = %s", (Json("riffelsee lake"), only_messages))
    app.commit()
    keyring.activate(app, alice)
    assert search(app, alice, "hiking") == [by_title]
    assert search(app, alice, "gornergrat") == [by_text]
    assert search(app, alice, "riffelsee") == [only_messages]
    app.commit()
    # Bob searching Alice's chats (as an admin search would) sees nothing of hers.
    keyring.activate(app, bob)
    assert search(app, alice, "hiking") == [] and search(app, alice, "gornergrat") == []


def test_timer_select_for_update_skip_locked_without_a_key(app, app2, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    ids = [insert_chat(app, alice, f"timer {i}", [("user", "x")]) for i in range(3)]
    app.execute("UPDATE chat SET timer_at = 10 WHERE id = ANY(%s)", (ids,))
    app.commit()
    # Another transaction holds one row (utils/timers.py runs with no user bound).
    app2.execute("SELECT id FROM chat WHERE id = %s FOR UPDATE", (ids[0],))
    rows = app.execute("SELECT chat.* FROM chat WHERE chat.timer_at IS NOT NULL AND chat.timer_at <= 100"
                       " ORDER BY chat.timer_at FOR UPDATE SKIP LOCKED").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids[1:])
    assert {r[2] for r in rows} == {"[encrypted]"}
    before = [raw(app, "chat", "chat", i) for i in ids[1:]]
    app.execute("UPDATE chat SET timer_at = NULL, updated_at = 99 WHERE id = ANY(%s)", (ids[1:],))
    app.commit()
    app2.rollback()
    assert [raw(app, "chat", "chat", i) for i in ids[1:]] == before


def test_sqlalchemy_orm_crud_with_returning(db_url, keyring):
    """Open WebUI's ORM shape: insert, update and delete with RETURNING, FOR UPDATE."""
    alice = keyring.user()
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1),
                              connect_args={"options": "-c search_path=owui_crypto_view,public,pg_temp"})
    meta = sa.MetaData()
    chat = sa.Table("chat", meta, sa.Column("id", sa.String, primary_key=True), sa.Column("user_id", sa.String),
                    sa.Column("title", sa.Text), sa.Column("chat", sa.JSON), sa.Column("meta", sa.JSON),
                    sa.Column("pinned", sa.Boolean), sa.Column("updated_at", sa.BigInteger))
    try:
        with engine.begin() as conn:
            keyring.activate(conn.connection.dbapi_connection, alice)
            row = conn.execute(sa.insert(chat).values(id="o1", user_id=alice, title="orm title",
                                                      chat={"history": {"messages": {}}}, meta={})
                               .returning(chat.c.id, chat.c.title)).one()
            assert tuple(row) == ("o1", "orm title")
            row = conn.execute(sa.update(chat).where(chat.c.id == "o1").values(title="orm renamed", pinned=True)
                               .returning(chat.c.title, chat.c.pinned)).one()
            assert tuple(row) == ("orm renamed", True)
            locked = conn.execute(sa.select(chat.c.title).where(chat.c.id == "o1").with_for_update()).scalar_one()
            assert locked == "orm renamed"
        with engine.begin() as conn:
            stored = conn.execute(sa.text("SELECT title FROM public.chat WHERE id = 'o1'")).scalar_one()
            assert stored.startswith("oc1:")
            keyring.activate(conn.connection.dbapi_connection, alice)
            gone = conn.execute(sa.delete(chat).where(chat.c.id == "o1").returning(chat.c.title)).scalar_one()
            assert gone == "orm renamed"
    finally:
        engine.dispose()


def test_direct_plaintext_writes_are_sealed_or_refused(app, keyring):
    alice = keyring.user()
    # Past the view, without a key: refused, nothing written.
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("INSERT INTO public.chat (id, user_id, title, meta) VALUES ('d1', %s, 'plain', '{}')", (alice,))
    assert excinfo.value.sqlstate == "OC001"
    app.rollback()
    assert app.execute("SELECT count(*) FROM public.chat").fetchone()[0] == 0
    # Past the view, with the owner's key: sealed on the way in.
    keyring.activate(app, alice)
    app.execute("INSERT INTO public.chat (id, user_id, title, meta) VALUES ('d1', %s, 'plain', '{}')", (alice,))
    assert raw(app, "chat", "title", "d1").startswith("oc1:")
    assert app.execute("SELECT title FROM chat WHERE id = 'd1'").fetchone()[0] == "plain"


def test_upsert_on_base_table_with_excluded_seals_once(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    insert_chat(app, alice, "first", [("user", "x")], chat_id="u1")
    app.execute("INSERT INTO public.chat (id, user_id, title, meta) VALUES ('u1', %s, 'second', '{}')"
                " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title", (alice,))
    stored = raw(app, "chat", "title", "u1")
    assert stored.startswith("oc1:") and stored.count("oc1:") == 1
    assert app.execute("SELECT title FROM chat WHERE id = 'u1'").fetchone()[0] == "second"


def test_copy_out_and_back_in_is_not_sealed_twice(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "copied", [("user", "copy me")])
    app.commit()
    before = app.execute("SELECT * FROM public.chat ORDER BY id").fetchall()
    with app.cursor() as cur:
        with cur.copy("COPY public.chat TO STDOUT") as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        cur.execute("DELETE FROM public.chat_message")
        cur.execute("DELETE FROM public.chat")
        with cur.copy("COPY public.chat FROM STDIN") as copy:  # no key active
            copy.write(data)
    app.commit()
    assert app.execute("SELECT * FROM public.chat ORDER BY id").fetchall() == before
    keyring.activate(app, alice)
    assert app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == "copied"

