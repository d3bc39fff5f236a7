"""Seen in the soak (issue 12): `owui-crypto serve` behind PgBouncer 1.18 in transaction pooling answered 500
"prepared statement "_pg3_0" does not exist" after a PgBouncer restart, and, SIGKILLed and restarted, did not start
("prepared statement "_pg3_0" already exists", in Open WebUI's Config.repair_config_rows).

Why: psycopg 3 prepares a statement on the server once a connection has run it 5 times (``prepare_threshold``),
under names it numbers per connection (``_pg3_0``, ...). Behind a pooler in transaction mode a client's
transactions land on any backend: a statement prepared on one is missing on the next. With
``OWUI_CRYPTO_TRANSACTION_POOLER=true`` serve turns that off on every pool before Open WebUI's engines exist.

Open WebUI's engine opens a connection per session (no pool of its own), so reads never reach the threshold; a
new chat does: it inserts each of its messages with the same statement, prepared from the sixth on. Behind one
server connection, the next session's connection (numbering its statements from ``_pg3_0`` again) meets the
backend that still holds the previous one's. The test writes new chats one after the other, ends every backend
(``pg_terminate_backend``, as the soak's fault does), writes and reads again, then SIGKILLs serve and restarts it on
the same PgBouncer.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app_adapter import devdb
from e2e.conftest import Owui, Roles, logged_database, start_owui, stop_owui
from e2e.llm_stub import LlmStub
from e2e.owui_api import new_chat, ok, signup
from tests.pgbouncer import PgBouncer
from tests.serverlog import LogWindow, server_log_path

POOLER = {"OWUI_CRYPTO_TRANSACTION_POOLER": "true"}


def read_concurrently(base_url: str, token: str, chat_id: str, threads: int = 4, each: int = 15) -> list[int]:
    """The same statements on several of serve's pooled connections, more than prepare_threshold times each."""
    def reads(_: int) -> list[int]:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            return [c.get(f"/api/v1/chats/{chat_id}").status_code for _ in range(each)]

    with ThreadPoolExecutor(threads) as pool:
        return sorted(code for codes in pool.map(reads, range(threads)) for code in codes)


def end_backends(pg_server: devdb.Server, database: str) -> int:
    with pg_server.connect() as admin:
        return len(admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                                 " AND backend_type = 'client backend'", (database,)).fetchall())


@pytest.fixture
def pooled(pg_server: devdb.Server, e2e_roles: Roles) -> Iterator[tuple[str, str]]:
    """A fresh database of the session's owner, and a superuser URL of it through PgBouncer (serve gets its roles'
    URLs from it), one server connection per role: every session meets the backend the previous one left."""
    with logged_database(pg_server, "owui_crypto_e2e_pooled", owner=e2e_roles.owner) as name:
        bouncer = PgBouncer(pg_server.admin_url, pool_size=1, users=(e2e_roles.owner, e2e_roles.app))
        bouncer.start()
        try:
            yield name, devdb.Server(bouncer.admin_url, "pgbouncer").url(name)
        finally:
            bouncer.close()


def start(url: str, name: str, llm: LlmStub, workdir: Path, roles: Roles) -> Owui:
    workdir.mkdir()
    return start_owui(url, name, llm, workdir, POOLER, roles=roles)


def test_serve_behind_pgbouncer_survives_new_backends_and_a_sigkill(pooled: tuple[str, str], pg_server: devdb.Server,
                                                                    e2e_roles: Roles, kms_server, llm: LlmStub,
                                                                    tmp_path: Path) -> None:
    name, url = pooled
    with pg_server.connect() as conn:
        log = LogWindow(server_log_path(conn))
    first = start(url, name, llm, tmp_path / "first", e2e_roles)
    try:
        assert "prepared statements are off" in first.log()
        with first.client() as anonymous:
            admin = signup(anonymous, "Pat Pool", "pat@example.com", "pooled-Pw-12345")
        with first.client(admin.token) as c:
            chats = [new_chat(c, admin, f"pooled {i}", n_messages=12) for i in range(4)]
            chat = chats[0]
            assert read_concurrently(first.base_url, admin.token, chat.id) == [200] * 60
            assert end_backends(pg_server, name) > 0
            chats += [new_chat(c, admin, f"after {i}", n_messages=12) for i in range(2)]
            assert {ok(c.get(f"/api/v1/chats/{each.id}")).json()["title"] for each in chats} == \
                {each.title for each in chats}
        assert not re.search(r'prepared statement "\w+" (does not|already) exist', first.log())
        # psycopg names its server-side prepared statements _pg3_N (savepoints too): none was executed here. (The
        # log is the server's: other databases' lines, the session's Open WebUI among them, are not this test's.)
        ours = [line for line in log.read().splitlines() if f"@{name} " in line]  # log_line_prefix: %u@%d
        assert len(ours) > 100, "this database's statements are not in the server log as user@database"
        assert [line for line in ours if re.search(r"execute _pg3_\d+", line)][:3] == []
    finally:
        os.kill(first.process.pid, signal.SIGKILL)  # as the soak's serve_kill: nothing is closed cleanly
        first.process.wait()
    second = start(url, name, llm, tmp_path / "second", e2e_roles)
    try:
        with second.client() as anonymous:
            token = ok(anonymous.post("/api/v1/auths/signin", json={"email": admin.email,
                                                                    "password": admin.password})).json()["token"]
        assert read_concurrently(second.base_url, token, chat.id) == [200] * 60
    finally:
        stop_owui(second)
