"""owui-crypto rekey: a user's new DEK opens everything, the old one opens nothing, nobody else is touched."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Json

from app_adapter import errors
from app_adapter.hook import VIEW_SEARCH_PATH
from app_adapter.rekey import rekey
from app_adapter.transport import Transport
from tests.owui import insert_chat
from tests.test_adapter import add_users
from tests.test_coverage import _feedback


def activate(conn: psycopg.Connection, user_id: str, key: bytes) -> None:
    with conn.cursor() as cur:
        Transport().activate(cur, user_id, key, None, search_path=VIEW_SEARCH_PATH)


def snapshot(conn: psycopg.Connection, user_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT c.title, c.chat::text, m.content::text, f.data->>'reason', f.data->>'rating', f.snapshot::text"
        "  FROM chat c JOIN chat_message m ON m.chat_id = c.id LEFT JOIN feedback f ON f.user_id = c.user_id"
        " WHERE c.user_id = %s ORDER BY c.id, m.id", (user_id,)).fetchall()


def test_rekey_reseals_under_a_new_key_and_the_old_one_opens_nothing(db_url, service) -> None:
    alice, bob = add_users(db_url, service, 2)
    old = service.dek(alice).reveal()
    with psycopg.connect(db_url) as conn:
        for uid in (alice, bob):
            activate(conn, uid, service.dek(uid).reveal())
            insert_chat(conn, uid, f"title of {uid[:6]}", [("user", f"question of {uid}"), ("assistant", "answer")])
            _feedback(conn, f"fb-{uid}", uid, f"reason of {uid}")
            conn.commit()
        activate(conn, alice, old)
        before = snapshot(conn, alice)
        conn.rollback()
        activate(conn, bob, service.dek(bob).reveal())
        bob_before = snapshot(conn, bob), conn.execute("SELECT title FROM public.chat WHERE user_id = %s",
                                                        (bob,)).fetchall()
        conn.rollback()
    done = rekey(service, alice)
    assert done.old_key_id != done.new_key_id and done.values >= 4  # title, chat, summary, messages, feedback
    with psycopg.connect(db_url) as conn:
        activate(conn, alice, service.dek(alice).reveal())  # the cache was evicted: the new KMS copy
        assert snapshot(conn, alice) == before and before[0][3] == f"reason of {alice}"
        conn.rollback()
        raw = " ".join(r[0] for r in conn.execute("SELECT t::text FROM public.chat t WHERE user_id = %s", (alice,)))
        assert f"oc1:{done.new_key_id}:" in raw and f"oc1:{done.old_key_id}:" not in raw
        with pytest.raises(psycopg.Error) as refused:
            activate(conn, alice, old)
        assert isinstance(errors.from_database(refused.value), errors.WrongKey)
        conn.rollback()
        activate(conn, bob, service.dek(bob).reveal())
        assert (snapshot(conn, bob), conn.execute("SELECT title FROM public.chat WHERE user_id = %s",
                                                  (bob,)).fetchall()) == bob_before


def test_rekey_leaves_placeholders_and_plaintext_alone(db_url, service) -> None:
    (alice,) = add_users(db_url, service, 1)
    with psycopg.connect(db_url) as conn:
        for table in ("memory", "feedback"):  # rows from before owui-crypto, as they would have been written
            conn.execute(f"ALTER TABLE public.{table} DISABLE TRIGGER owui_crypto_seal_direct")
        conn.execute("INSERT INTO public.memory (id, user_id, content) VALUES ('legacy', %s, 'from before')",
                     (alice,))
        conn.execute("INSERT INTO public.feedback (id, user_id, data, created_at, updated_at)"
                     " VALUES ('other-key', %s, %s, 0, 0)",
                     (alice, Json({"rating": 1, "reason": "oc1:0123456789abcdef:gAAAA-not-ours"})))
        for table in ("memory", "feedback"):
            conn.execute(f"ALTER TABLE public.{table} ENABLE TRIGGER owui_crypto_seal_direct")
        conn.commit()
    assert rekey(service, alice).values == 0
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT content FROM public.memory WHERE id = 'legacy'").fetchone() == ("from before",)
