"""activate() sent in one flight with its transaction's BEGIN (app_adapter.transport.with_begin), and the
cheaper activate() of migration 0011: the same outcomes as the two-trip path, refusals included."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import create_async_engine

from app_adapter.hook import VIEW_SEARCH_PATH, Adapter
from app_adapter.transport import Transport, _Entry, with_begin
from tests.keyring import Keyring
from tests.test_adapter import CHAT, add_users, sa_url


def established(conn: psycopg.Connection) -> Transport:
    """A transport as the adapter's connect hook leaves it: one entry, committed."""
    transport = Transport()
    with conn.cursor() as cur:
        transport.establish(cur)
    conn.commit()
    return transport


def active(conn: psycopg.Connection) -> tuple[str | None, str]:
    user, level = conn.execute("SELECT owui_crypto.active_user(), current_setting('transaction_isolation')").fetchone()
    return user, level


def test_first_protected_statement_takes_begin_and_keys_in_one_flight(db_url, service):
    """Sync and async engines: the transaction that starts with a protected statement gets its keys with its
    BEGIN (one flight); one that ran another statement first gets them in a trip of their own. Both read
    the user's value."""
    (alice,) = add_users(db_url, service, 1)
    engine = sa.create_engine(sa_url(db_url))
    aengine = create_async_engine(sa_url(db_url))
    adapter = Adapter(service)
    adapter.install(engine)
    adapter.install(aengine)
    try:
        with adapter.acting_as_sync(alice):
            with engine.begin() as conn:
                conn.execute(sa.insert(CHAT).values(id="c1", user_id=alice, title="secret of alice", meta={}))
            with engine.begin() as conn:
                assert conn.execute(sa.select(CHAT.c.title)).scalar() == "secret of alice"
            assert adapter.metrics()["with_begin"] == adapter.metrics()["activations"] == 2
            with engine.begin() as conn:
                conn.execute(sa.text('SELECT count(*) FROM "user"'))
                assert conn.execute(sa.select(CHAT.c.title)).scalar() == "secret of alice"
            assert (adapter.metrics()["with_begin"], adapter.metrics()["activations"]) == (2, 3)

        async def read() -> list[Any]:
            async with adapter.acting_as(alice):
                titles = []
                for _ in range(3):
                    async with aengine.begin() as conn:
                        titles.append((await conn.execute(sa.select(CHAT.c.title))).scalar())
            await aengine.dispose()
            return titles

        assert asyncio.run(read()) == ["secret of alice"] * 3
        assert (adapter.metrics()["with_begin"], adapter.metrics()["activations"]) == (5, 6)
    finally:
        engine.dispose()


def test_flight_keeps_the_transaction_characteristics(db_url, service):
    """BEGIN is psycopg's own: the engine's isolation level and a read-only transaction still apply."""
    (alice,) = add_users(db_url, service, 1)
    engine = sa.create_engine(sa_url(db_url), isolation_level="SERIALIZABLE")
    adapter = Adapter(service)
    adapter.install(engine)
    try:
        with adapter.acting_as_sync(alice):
            with engine.begin() as conn:
                conn.execute(sa.insert(CHAT).values(id="c1", user_id=alice, title="secret of alice", meta={}))
            with engine.begin() as conn:
                row = conn.execute(sa.text("SELECT title, current_setting('transaction_isolation') FROM chat")).one()
            assert tuple(row) == ("secret of alice", "serializable")
            with engine.connect().execution_options(postgresql_readonly=True) as conn:
                row = conn.execute(sa.text("SELECT title, current_setting('transaction_read_only') FROM chat")).one()
                conn.rollback()
            assert tuple(row) == ("secret of alice", "on")
        assert adapter.metrics()["with_begin"] == 3
    finally:
        engine.dispose()


def test_refusal_in_the_flight_raises_its_sqlstate_and_the_connection_recovers(db_url, keyring: Keyring):
    """Bob's key offered for Alice, in the flight: OC005 as from the cursor, nothing active; after the
    rollback the same connection activates Alice properly."""
    alice, bob = keyring.user(), keyring.user()
    with psycopg.connect(db_url) as conn:
        transport = established(conn)
        with conn.cursor() as cur, pytest.raises(psycopg.Error) as excinfo:
            transport.activate(cur, alice, keyring.keys[bob], keyring.share(), first_trip=with_begin(conn))
        assert excinfo.value.sqlstate == "OC005"
        assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
        conn.rollback()
        with conn.cursor() as cur:
            transport.activate(cur, alice, keyring.keys[alice], keyring.share(), first_trip=with_begin(conn))
        assert active(conn) == (alice, "read committed")
        conn.rollback()
        assert active(conn)[0] is None


def test_token_sent_with_begin_is_spent(db_url, keyring: Keyring):
    """What the flight sent, sent again verbatim in a later transaction: OC004, nobody active."""
    alice = keyring.user()
    sent: list[tuple[str, Any]] = []
    with psycopg.connect(db_url) as conn:
        transport = established(conn)
        flight = with_begin(conn)
        assert flight is not None

        def recording(sql: str, params: Any) -> Any:
            sent.append((sql, params))
            return flight(sql, params)

        with conn.cursor() as cur:
            transport.activate(cur, alice, keyring.keys[alice], keyring.share(), first_trip=recording)
        assert active(conn)[0] == alice
        conn.commit()
        ((sql, params),) = sent
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute(sql, params)
        assert excinfo.value.sqlstate == "OC004"
        conn.rollback()
        assert active(conn)[0] is None


def test_unknown_entry_in_the_flight_is_renewed_in_the_same_transaction(db_url, keyring: Keyring):
    """As behind a pooler that moved the client: the flight offers only an entry this backend does not hold
    (its id full of quotes and backslashes, which must reach the server as data); activate() answers with a
    fresh entry and the cursor's retry activates, inside the transaction the flight began."""
    alice = keyring.user()
    with psycopg.connect(db_url) as conn:
        conn.execute("SELECT owui_crypto.activate(NULL, '{}', '{}', '{}')")  # this backend's entry table
        conn.commit()
        transport = Transport()
        transport.known['x"\\y},{NULL'] = _Entry(Fernet(Fernet.generate_key()))
        with conn.cursor() as cur:
            transport.activate(cur, alice, keyring.keys[alice], keyring.share(), search_path=VIEW_SEARCH_PATH,
                               first_trip=with_begin(conn))
        assert (transport.round_trips, transport.renewals) == (2, 1)
        assert active(conn)[0] == alice
        assert conn.execute("SELECT current_setting('search_path')").fetchone()[0] == VIEW_SEARCH_PATH
        conn.rollback()


def test_no_flight_inside_a_begun_transaction_or_in_autocommit(db_url):
    with psycopg.connect(db_url) as conn:
        assert with_begin(conn) is not None
        conn.execute("SELECT 1")
        assert with_begin(conn) is None
        conn.rollback()
        conn.autocommit = True
        assert with_begin(conn) is None


@pytest.mark.parametrize("tamper", ["share of another counter", "share key not registered", "garbage share"])
def test_share_token_checks_of_the_cheaper_activate(db_url, keyring: Keyring, tamper: str):
    """Migration 0011 opens both tokens in one block: the share token must still carry the user token's
    counter (OC004), open under the entry (OC004) and be the registered share key (OC005); the counter is
    spent by the user token either way, and nothing is active."""
    alice = keyring.user()
    with psycopg.connect(db_url) as conn:
        transport = established(conn)
        ((entry_id, entry),) = transport.known.items()
        counter = entry.counter + 1
        user_token = entry.fernet.encrypt(counter.to_bytes(8, "big") + keyring.keys[alice]).decode()
        share = {"share of another counter": entry.fernet.encrypt((counter + 1).to_bytes(8, "big") + keyring.share()),
                 "share key not registered": entry.fernet.encrypt(counter.to_bytes(8, "big") + os.urandom(32)),
                 "garbage share": b"not a token"}[tamper].decode()
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("SELECT owui_crypto.activate(%s, %s, %s, %s)", (alice, [entry_id], [user_token], [share]))
        assert excinfo.value.sqlstate == {"share key not registered": "OC005"}.get(tamper, "OC004")
        conn.rollback()
        with pytest.raises(psycopg.Error) as excinfo:  # the user token was spent
            conn.execute("SELECT owui_crypto.activate(%s, %s, %s, %s)", (alice, [entry_id], [user_token], [None]))
        assert excinfo.value.sqlstate == "OC004"
        conn.rollback()
        assert active(conn)[0] is None


def test_share_only_activation_of_the_cheaper_activate(db_url, keyring: Keyring):
    """No user (a background task): the share key alone is active, and its token is spent."""
    with psycopg.connect(db_url) as conn:
        transport = established(conn)
        ((entry_id, entry),) = transport.known.items()
        token = entry.fernet.encrypt((entry.counter + 1).to_bytes(8, "big") + keyring.share()).decode()
        assert conn.execute("SELECT owui_crypto.activate(NULL, %s, %s, %s), current_setting('owui_crypto.share_key')"
                            ", current_setting('owui_crypto.user_id')",
                            ([entry_id], [None], [token])).fetchone() == (None, keyring.share().hex(), "")
        conn.rollback()
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("SELECT owui_crypto.activate(NULL, %s, %s, %s)", ([entry_id], [None], [token]))
        assert excinfo.value.sqlstate == "OC004"


def test_a_user_id_with_quotes_travels_as_data(db_url, keyring: Keyring):
    odd = f"o'dd\"\\{{user}},{uuid.uuid4()}"
    keyring.user(odd)
    with psycopg.connect(db_url) as conn:
        transport = established(conn)
        with conn.cursor() as cur:
            transport.activate(cur, odd, keyring.keys[odd], keyring.share(), first_trip=with_begin(conn))
        assert active(conn)[0] == odd
