#!/usr/bin/env python3
"""make demo-core: the SQL core and the adapter, without Open WebUI (quick).

PostgreSQL (local or a container), AWS KMS emulated by moto over HTTP, Open
WebUI 0.12.4's real schema with owui-crypto installed. Two users get KMS-HMAC
ids and KMS-wrapped keys; Alice writes a chat through the engine hook; then
the same row is shown three ways: as Alice reads it, as Bob reads it, and as
it sits in the database (and in a pg_dump).
"""

from __future__ import annotations

import argparse
import json
import subprocess

import psycopg
import sqlalchemy as sa

from app_adapter.devstack import local_stack, side_by_side
from app_adapter.hook import Adapter
from app_adapter.keys import KeyService


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with local_stack() as stack:
        print(f"PostgreSQL: {stack.server.origin}, database {stack.database}")
        print(f"KMS:        moto at {stack.kms_endpoint} (HMAC_512 key + symmetric CMK)\n")
        service = KeyService(stack.settings, stack.url)
        alice, bob = (service.kms.user_id(e) for e in ("alice@example.com", "bob@example.com"))
        with psycopg.connect(stack.url) as conn:
            for uid, email in ((alice, "alice@example.com"), (bob, "bob@example.com")):
                conn.execute('INSERT INTO public."user" (id, email, name, role) VALUES (%s, %s, %s, %s)',
                             (uid, email, email.split("@")[0], "user"))
                done = service.provision(conn, uid)
                print(f"user {email:<18} id {uid}  (KMS HMAC)  key {done.key_id}")
        print()
        engine = sa.create_engine(stack.url.replace("postgresql://", "postgresql+psycopg://", 1))
        adapter = Adapter(service)
        adapter.install(engine)
        chat = {"title": "Knee surgery questions", "history": {"messages": {"m1": {
            "role": "user", "content": "My MRI shows a torn meniscus. What are my options?"}}, "currentId": "m1"}}
        with adapter.acting_as_sync(alice), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO chat (id, user_id, title, chat, meta, created_at, updated_at) "
                                 "VALUES ('chat-1', :u, :t, CAST(:c AS json), '{}', 0, 0)"),
                         {"u": alice, "t": chat["title"], "c": json.dumps(chat)})
        select = sa.text("SELECT title, chat::text FROM chat WHERE id = 'chat-1'")
        with adapter.acting_as_sync(alice), engine.begin() as conn:
            a_title, a_chat = conn.execute(select).one()
        with adapter.acting_as_sync(bob), engine.begin() as conn:
            b_title, b_chat = conn.execute(select).one()
        with psycopg.connect(stack.url) as conn:
            raw_title, raw_chat = conn.execute(
                "SELECT title, chat::text FROM public.chat WHERE id = 'chat-1'").fetchone()
        side_by_side("title, as Alice reads it", a_title, "title, as stored in public.chat", raw_title)
        side_by_side("chat, as Alice reads it", a_chat, "chat, as stored in public.chat", raw_chat)
        side_by_side("title, as Bob reads it", b_title, "chat, as Bob reads it", b_chat)
        dump = subprocess.run(["pg_dump", stack.url], capture_output=True, text=True, check=True).stdout
        found = [w for w in ("Knee surgery", "meniscus") if w in dump]
        print(f"pg_dump of the database: {len(dump):,} bytes; chat text found in it: {found or 'none'}")
        print(f"KMS calls: {service.kms.metrics()['calls']}")
        engine.dispose()
        service.kms.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
