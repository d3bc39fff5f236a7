"""The owui-crypto command, run as a user runs it: a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg
from psycopg import sql

from app_adapter.kms import KmsKeys

UUID_V8 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def owui_crypto(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app_adapter.cli", *args], check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_help_lists_every_command():
    out = owui_crypto("--help").stdout
    for command in ("upgrade", "downgrade", "refresh", "check", "grant", "user-id", "check-keys", "provision",
                    "forget", "serve"):
        assert command in out


def test_user_id_uses_the_hmac_keys_own_algorithm(kms_server):
    result = owui_crypto("user-id", "  Alice@Example.COM ")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert UUID_V8.match(printed)
    calls = []
    with KmsKeys(kms_server.settings()) as kms:
        kms.client.meta.events.register("before-parameter-build.kms.GenerateMac",
                                        lambda params, **_: calls.append(params["MacAlgorithm"]))
        assert kms.user_id("alice@example.com") == printed
    assert calls == ["HMAC_SHA_512"]  # the session's HMAC key is HMAC_512


def test_user_id_refuses_a_mismatched_algorithm_before_calling(kms_server):
    result = owui_crypto("user-id", "alice@example.com", env={"OWUI_CRYPTO_KMS_MAC_ALGORITHM": "HMAC_SHA_256"})
    assert result.returncode == 1
    assert "HMAC_SHA_256" in result.stderr and "HMAC_512" in result.stderr


def test_missing_setting_is_named(kms_server):
    result = owui_crypto("user-id", "a@b.c", env={"KMS_HMAC_KEY_ID": ""})
    assert result.returncode == 1 and "KMS_HMAC_KEY_ID" in result.stderr


def test_check_refresh_and_grant(db_url, run_id):
    first = owui_crypto("check", "--database-url", db_url)
    assert first.returncode == 1 and "log_error_verbosity = default" in first.stdout  # the server's default
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_error_verbosity = terse").format(
            sql.Identifier(conn.info.dbname)))
    assert owui_crypto("check", "--database-url", db_url).stdout.strip().endswith("healthy")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.chat ADD COLUMN added_later text")
    result = owui_crypto("check", "--database-url", db_url)
    assert result.returncode == 1 and "differ from the base table" in result.stdout
    assert owui_crypto("refresh", "--database-url", db_url).returncode == 0
    undecided = owui_crypto("check", "--database-url", db_url)
    assert undecided.returncode == 1 and "chat.added_later (text) is neither sealed nor plaintext" in undecided.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO owui_crypto.plaintext_column VALUES ('chat', 'added_later', 'a flag of the test')")
    assert owui_crypto("check", "--database-url", db_url).returncode == 0


def test_provision_and_forget(db_url, kms_server):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO public."user" (id, email) VALUES ('u-cli', 'cli@example.com')""")
    first = owui_crypto("provision", "u-cli", "--database-url", db_url)
    assert first.returncode == 0 and "now has key" in first.stdout, first.stderr
    assert "already had key" in owui_crypto("provision", "u-cli", "--database-url", db_url).stdout
    assert owui_crypto("forget", "u-cli", "--database-url", db_url).returncode == 2  # needs --yes
    assert owui_crypto("forget", "u-cli", "--yes", "--database-url", db_url).returncode == 0
    with psycopg.connect(db_url) as conn:
        assert conn.execute("""SELECT kms_encrypted_dek, salt FROM public."user" WHERE id = 'u-cli'""").fetchone() \
            == (None, None)
        assert conn.execute("SELECT count(*) FROM owui_crypto.user_key").fetchone() == (0,)


def test_downgrade_refusal_is_explained(db_url, keyring, app):
    from tests.owui import insert_chat

    alice = keyring.user()
    keyring.activate(app, alice)
    insert_chat(app, alice, "kept", [("user", "x")])
    app.commit()
    result = owui_crypto("downgrade", "--database-url", db_url)
    assert result.returncode == 1
    assert "sealed values remain" in result.stderr and "Export or delete" in result.stderr


def test_seal_existing_seals_plaintext_written_before_install(db_url, kms_server):
    with psycopg.connect(db_url) as conn:
        conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s), (%s, %s)',
                     ("old-alice", "a@old", "old-nokey", "n@old"))
        # Rows from before owui-crypto: written with its triggers off, as they would have been.
        conn.execute("ALTER TABLE public.chat DISABLE TRIGGER owui_crypto_seal_direct")
        conn.execute("ALTER TABLE public.chat_message DISABLE TRIGGER owui_crypto_seal_direct")
        conn.execute("INSERT INTO public.chat (id, user_id, title, chat, meta) VALUES "
                     "('old1', 'old-alice', 'legacy title', '{\"m\": 1}', '{}'), "
                     "('old2', 'old-nokey', 'orphan title', NULL, '{}')")
        conn.execute("INSERT INTO public.chat_message (id, chat_id, role, content) VALUES "
                     "('old1-m', 'old1', 'user', '\"legacy message\"')")
        conn.execute("ALTER TABLE public.chat ENABLE TRIGGER owui_crypto_seal_direct")
        conn.execute("ALTER TABLE public.chat_message ENABLE TRIGGER owui_crypto_seal_direct")
    assert owui_crypto("provision", "old-alice", "--database-url", db_url).returncode == 0
    check = owui_crypto("check", "--database-url", db_url)
    assert check.returncode == 1 and "chat.title holds 2 plaintext values" in check.stdout
    result = owui_crypto("seal-existing", "--no-progress", "--database-url", db_url)
    assert "sealed 2 rows of 1 users" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1 and "chat.title: 1 plaintext values remain" in result.stdout
    with psycopg.connect(db_url) as conn:
        rows = dict(conn.execute("SELECT id, title FROM public.chat").fetchall())
        assert rows["old1"].startswith("oc1:") and rows["old2"] == "orphan title"
        assert conn.execute("SELECT content::text FROM public.chat_message").fetchone()[0].startswith('"oc1:')
