"""Hostile HTTP input (scripts/soak_hostile.py) against plain Open WebUI 0.12.4 and against ``owui-crypto serve``.

Plain Open WebUI is the reference: its statuses must equal EXPECTED_PLAIN_STATUS, so the table the soak judges
by cannot drift from what Open WebUI really answers. owui-crypto must accept every case (below 500, or plain's
own answer), store nothing half, answer the same status class as plain (or a clean 4xx where plain fails with a
5xx), and keep every hostile text sealed at rest and out of its logs.

Both servers are this module's own, each on a throw-away database (the first sign-up on a server becomes its
admin, and on the session server that must be test_owui.py's Alice), started side by side when the module
starts and stopped when it ends. The genuine envelopes the hostile user replays are read, as a database reader
would, from the owui-crypto database: another user's sealed chat title and one of the hostile user's own; a
third is forged under the hostile user's own key id with a key nobody holds.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app_adapter import devdb, envelope
from e2e.conftest import OFFLINE_ENV, Owui, Roles, free_port, logged_database, start_owui, stop_owui, wait_healthy
from e2e.llm_stub import LlmStub
from e2e.owui_api import add_user, chat_document, ok, signup, words
from scripts import soak_hostile as hostile
from tests.serverlog import LogWindow, server_log_path

REPO = Path(__file__).resolve().parent.parent
BIG_BYTES = int(float(os.environ.get("E2E_HOSTILE_BIG_MB", "50")) * 2**20)




@dataclass
class Side:
    """One server's run: its handle, the hostile user's outcomes by case, and what the run wrote."""

    server: Owui
    outcomes: dict[str, object]
    hostile_id: str
    replayed: tuple[str, ...] = ()  # the envelopes sent as text: two genuine, the last forged
    pg_log: str = ""


def _start_plain(url: str, database: str, llm: LlmStub, workdir: Path) -> Owui:
    """``open-webui serve`` from this venv, no owui-crypto at all, started as bench_owui.py starts it."""
    env = {**os.environ, **OFFLINE_ENV,
           "DATABASE_URL": url.replace("postgresql://", "postgresql+psycopg://", 1),
           "WEBUI_SECRET_KEY": "e2e-" + os.urandom(24).hex(), "DATA_DIR": str(workdir / "data"),
           "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": llm.base_url, "OPENAI_API_KEYS": "e2e-stub",
           "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE", "REDIS_URL"):
        env.pop(name, None)
    port = free_port()
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([str(Path(sys.executable).with_name("open-webui")), "serve", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=workdir)
    return Owui(f"http://127.0.0.1:{port}", database, url, log_path, process, env)


def _users(server: Owui, label: str) -> tuple[str, str, str]:
    """An admin (the first sign-up), the hostile user and a victim: (hostile token, hostile id, victim token)."""
    with server.client() as anon:
        admin = signup(anon, "Admin", f"admin-{label}@example.com", "admin-Pw-12345")
        with server.client(admin.token) as a:
            bad = add_user(a, "Hostile", f"hostile-{label}@example.com", "hostile-Pw-12345", anon)
            victim = add_user(a, "Victim", f"victim-{label}@example.com", "victim-Pw-12345", anon)
    return bad.token, bad.id, victim.token


def _envelopes(server: Owui, hostile_token: str, hostile_id: str, victim_token: str) -> list[str]:
    """Sealed values as a dump shows them: the victim's chat title, the hostile user's own, and a forgery."""
    ids = []
    for token in (victim_token, hostile_token):
        with server.client(token) as c:
            ids.append(ok(c.post("/api/v1/chats/new", json={"chat": chat_document(words("replayed"), [
                words("replayed message")])})).json()["id"])
    titles = [server.sql("SELECT title FROM public.chat WHERE id = %s", (i,))[0][0] for i in ids]
    assert all(t.startswith(envelope.PREFIX) for t in titles), "the titles are not sealed at rest"
    [(own_key_id,)] = server.sql("SELECT key_id FROM owui_crypto.user_key WHERE user_id = %s", (hostile_id,))
    forged = envelope.seal(os.urandom(32), own_key_id, f"chat.title/{ids[1]}", words("forged"))
    return [*titles, forged]


@pytest.fixture(scope="module")
def sides(pg_server: devdb.Server, e2e_roles: Roles, kms_server, llm: LlmStub,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Side]]:
    with logged_database(pg_server, "owui_crypto_e2e_hostile", owner=e2e_roles.owner) as crypto_db, \
            pg_server.scratch_database("owui_crypto_e2e_hostile_plain") as plain_db:
        plain = _start_plain(pg_server.url(plain_db), plain_db, llm, tmp_path_factory.mktemp("hostile-plain"))
        try:
            with pg_server.connect() as conn:
                pg_log = LogWindow(server_log_path(conn))
            crypto = start_owui(pg_server.url(crypto_db), crypto_db, llm, tmp_path_factory.mktemp("hostile-crypto"),
                                {}, roles=e2e_roles)
            try:
                wait_healthy(plain)
                token, hostile_id, victim = _users(crypto, "crypto")
                foreign = _envelopes(crypto, token, hostile_id, victim)
                marker = "hostilecrypto" + secrets.token_hex(4)
                started = time.monotonic()
                outcomes = hostile.run_hostile(crypto.base_url, token, foreign_envelopes=foreign, marker=marker,
                                               big_bytes=BIG_BYTES)
                crypto_s = time.monotonic() - started
                result = {"crypto": Side(crypto, {o.case: o for o in outcomes}, hostile_id, tuple(foreign),
                                         pg_log.read())}
                plain_token, plain_id, _ = _users(plain, "plain")
                started = time.monotonic()
                outcomes = hostile.run_hostile(plain.base_url, plain_token, foreign_envelopes=foreign,
                                               marker="hostileplain" + secrets.token_hex(4), big_bytes=BIG_BYTES)
                plain_s = time.monotonic() - started
                result["plain"] = Side(plain, {o.case: o for o in outcomes}, plain_id)
                print(f"\nhostile run: owui-crypto {crypto_s:.1f} s, plain Open WebUI {plain_s:.1f} s "
                      f"(big body {BIG_BYTES / 2**20:g} MiB)")
                for case, o in result["crypto"].outcomes.items():
                    print(f"  {case}: owui-crypto {o.detail} | plain {result['plain'].outcomes[case].detail}")
                yield result
            finally:
                stop_owui(crypto)
                kept = Path(tempfile.gettempdir()) / "owui-crypto-e2e-hostile-serve.log"
                kept.write_bytes(crypto.log_path.read_bytes())
        finally:
            stop_owui(plain)


def test_plain_open_webui_answers_as_the_table_says(sides: dict[str, Side]) -> None:
    got = {case: o.status for case, o in sides["plain"].outcomes.items()}
    expected = {case: hostile.expected_plain_status(case) for case in got}
    assert got == expected, "EXPECTED_PLAIN_STATUS in scripts/soak_hostile.py no longer matches plain Open WebUI"


def test_owui_crypto_accepts_every_case_and_stores_nothing_half(sides: dict[str, Side]) -> None:
    bad = [f"{case}: {o.detail}" for case, o in sides["crypto"].outcomes.items() if not o.accepted or o.stored_half]
    assert not bad, "\n".join(bad)
    assert set(sides["crypto"].outcomes) == set(sides["plain"].outcomes)


def test_owui_crypto_answers_as_plain_does_or_a_clean_4xx(sides: dict[str, Side]) -> None:
    differ = []
    for case, o in sides["crypto"].outcomes.items():
        plain = sides["plain"].outcomes[case].status
        if o.status // 100 != plain // 100 and not (plain >= 500 and 400 <= o.status < 500):
            differ.append(f"{case}: owui-crypto {o.status}, plain Open WebUI {plain} ({o.detail})")
    assert not differ, "\n".join(differ)


def test_plain_open_webui_stores_nothing_half_either(sides: dict[str, Side]) -> None:
    """The check itself is right: what it calls 'as sent' is what plain Open WebUI really stores."""
    bad = [f"{case}: {o.detail}" for case, o in sides["plain"].outcomes.items() if o.stored_half]
    assert not bad, "\n".join(bad)


def _at_rest(server: Owui) -> list[str]:
    """Every row of the tables the cases write, as a superuser reads the base tables."""
    rows = server.sql("SELECT t::text FROM public.chat t UNION ALL SELECT t::text FROM public.chat_message t "
                      "UNION ALL SELECT t::text FROM public.note t")
    return [r[0] for r in rows]


def test_hostile_texts_are_sealed_at_rest(sides: dict[str, Side]) -> None:
    side = sides["crypto"]
    stored = "\n".join(_at_rest(side.server))
    probes = {p for o in side.outcomes.values() for p in o.probes}
    assert len(probes) > 20
    found = sorted({p.split()[1] for p in probes if p in stored})
    assert not found, f"hostile texts stored in plaintext by the cases: {found}"
    plain_stored = "\n".join(_at_rest(sides["plain"].server))  # the search finds plaintext where there is some
    assert sum(p in plain_stored for o in sides["plain"].outcomes.values() for p in o.probes) > 10
    assert "oc1:0123456789abcdef:" not in stored  # the malformed lookalike, sealed like any text


def test_replayed_envelopes_are_sealed_again(sides: dict[str, Side]) -> None:
    """A sealed value sent as text is text: sealed anew under the sender's key, never kept as it came."""
    side = sides["crypto"]
    rows = _at_rest(side.server)
    *genuine, forged = side.replayed
    for value in genuine:  # in its own row only, where it was sealed
        assert sum(value in row for row in rows) == 1, "a replayed envelope is stored as it came"
    assert not any(forged in row for row in rows), "a forged envelope is stored as it came"


def test_no_hostile_text_in_the_logs(sides: dict[str, Side]) -> None:
    side = sides["crypto"]
    probes = {p for o in side.outcomes.values() for p in o.probes}
    serve_log = side.server.log()
    assert "chat" in side.pg_log  # every statement of this database was logged (parameters are not)
    in_serve = sorted({p.split()[1] for p in probes if p in serve_log})
    in_pg = sorted({p.split()[1] for p in probes if p in side.pg_log})
    assert not in_serve and not in_pg, f"hostile texts in serve's log: {in_serve}; in PostgreSQL's: {in_pg}"


def test_every_case_was_sent_to_both(sides: dict[str, Side]) -> None:
    names = set(hostile.EXPECTED_PLAIN_STATUS) | {f"foreign_envelope_{i}_{k}" for i in range(3) for k in ("chat",
                                                                                                         "note")}
    assert set(sides["plain"].outcomes) == names == set(sides["crypto"].outcomes)
    with httpx.Client(base_url=sides["crypto"].server.base_url, timeout=10) as c:
        assert c.get("/health").status_code == 200  # the server survived the run
