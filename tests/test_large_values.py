"""The envelope check on values of every padding and on values over 134,217,727 characters (migration 0010).

80_hardening.sql counted an envelope's base64 padding with ``rtrim(value, '=')``, which in a UTF8 database
allocates 8 bytes a character: a chat of about 100 MB (the soak's hostile 50 MB body, sent twice by the web
client's shape) failed with "invalid memory alloc request size" and Open WebUI's write was refused.
"""

from __future__ import annotations

import os

import psycopg

from app_adapter import envelope

KEY_ID = "0123456789abcdef"


def key_id(conn: psycopg.Connection, value: str) -> str | None:
    return conn.execute("SELECT owui_crypto.envelope_key_id(%s::text)", (value,)).fetchone()[0]


def test_every_padding_of_a_genuine_envelope_is_recognised(conn: psycopg.Connection) -> None:
    master = os.urandom(32)
    paddings = set()
    for size in range(0, 64):
        sealed = envelope.seal(master, KEY_ID, "chat:title:x", "x" * size)
        paddings.add(len(sealed) - len(sealed.rstrip("=")))
        assert key_id(conn, sealed) == KEY_ID, size
        assert key_id(conn, sealed[:-1]) is None  # a character short: not an envelope
    assert paddings == {0, 1, 2}


def test_padding_anywhere_but_the_end_is_not_an_envelope(conn: psycopg.Connection) -> None:
    sealed = envelope.seal(os.urandom(32), KEY_ID, "chat:title:x", "y" * 40)
    body = sealed.rstrip("=")
    assert key_id(conn, body[:30] + "=" + body[31:] + sealed[len(body):]) is None


def test_an_envelope_over_134_million_characters_is_checked_not_refused(conn: psycopg.Connection) -> None:
    # Shaped as an envelope of 100.7 MB of ciphertext: 21 characters of prefix, then a token whose length in bytes
    # is 57 + 16k. Built in the server, so the test sends no 134 MB parameter.
    token_bytes = 57 + 16 * 6_291_457  # 100,663,369 bytes: 134,217,828 base64 characters, two of them "="
    chars = (token_bytes + 2) // 3 * 4
    pad = chars - (token_bytes * 4 + 2) // 3
    assert chars + 21 > 134_217_727 and pad == 2
    found = conn.execute(
        "SELECT owui_crypto.envelope_key_id('oc1:' || %s || ':gA' || repeat('A', %s) || repeat('=', %s))",
        (KEY_ID, chars - 2 - pad, pad)).fetchone()[0]
    assert found == KEY_ID
