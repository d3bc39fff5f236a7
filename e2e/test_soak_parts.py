"""The soak's own parts (scripts/soak_*.py), each against real services: the KMS fault proxy in front of moto,
PgBouncer restarted on its port, the pooled-connection probe that must catch a key left on a backend, and the
ledger and response scan that decide what counts as lost or leaked.

Run in .venv-owui (httpx, moto, psycopg), like the rest of e2e/.
"""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import botocore.exceptions
import psycopg
import pytest
from botocore.config import Config

from app_adapter import devdb, migrate
from scripts.soak_checks import PoolProbe
from scripts.soak_load import ChatLedger, chat_document, fingerprint, scan_response
from scripts.soak_stack import KmsFaultProxy
from tests.conftest import load_owui_schema
from tests.kms_fixtures import REGION
from tests.pgbouncer import PgBouncer


def test_ledger_accepts_the_acknowledged_version_or_an_uncertain_one_only() -> None:
    doc = chat_document("mkr001xaaaaaaaa title", ["mkr001xaaaaaaaa q", "mkr001xaaaaaaaa a"])
    first = fingerprint(doc["title"], doc)
    chat = ChatLedger("c1")
    chat.ack(first)
    assert chat.settled and chat.accepts(first)
    changed = (first[0], tuple((mid, text + " x") for mid, text in first[1]))
    assert not chat.accepts(changed)  # a write nobody acknowledged
    assert not chat.accepts((first[0], first[1][:1]))  # a message lost
    chat.maybe_written(changed)  # a write with no clear answer: either version may be there
    assert chat.accepts(first) and chat.accepts(changed) and not chat.settled
    chat.ack(first)
    assert not chat.accepts(changed)  # acknowledged later: only that one
    # a completion with no clear answer: its two messages may be absent, whole, or the reply cut short
    chat.extras = {"u": ("prompt",), "r": ("prefix:echo: prompt",)}
    assert chat.accepts((first[0], (*first[1], ("u", "prompt"), ("r", "echo: pro"))))
    assert chat.accepts((first[0], (*first[1], ("u", "prompt"))))
    assert not chat.accepts((first[0], (*first[1], ("u", "prompt"), ("r", "echo: other"))))


def test_scan_flags_other_markers_envelopes_and_placeholders() -> None:
    own = "mkr001xaaaaaaaa"
    assert scan_response(f'{{"title": "{own} hello"}}', own) == []
    assert scan_response('{"title": "mkr002xbbbbbbbb"}', own) == ["another user's marker (1 distinct)"]
    envelope = "oc1:0123456789abcdef:gAAAAABk"
    assert scan_response(f'"{envelope}"', own) == ["a real envelope (oc1:<key id>:...)"]
    assert scan_response('"oc1:not-an-envelope"', own) == []  # lookalikes are text
    assert scan_response('{"title": "[encrypted]"}', own) == ["the [encrypted] placeholder"]
    assert scan_response('{"title": "[encrypted]"}', own, placeholders_ok=True) == []


def test_kms_proxy_passes_throttles_and_drops(kms_server) -> None:
    proxy = KmsFaultProxy(kms_server.endpoint_url)
    proxy.start()
    try:
        client = boto3.client("kms", region_name=REGION, endpoint_url=proxy.url,
                              config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1,
                                            read_timeout=2))
        assert client.describe_key(KeyId=kms_server.cmk_id)["KeyMetadata"]["KeyId"] == kms_server.cmk_id
        proxy.mode = "throttle"
        with pytest.raises(botocore.exceptions.ClientError) as throttled:
            client.describe_key(KeyId=kms_server.cmk_id)
        assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
        proxy.mode = "down"
        with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            client.describe_key(KeyId=kms_server.cmk_id)
        proxy.mode = "pass"
        assert client.describe_key(KeyId=kms_server.cmk_id)["KeyMetadata"]["Enabled"] is True
        assert proxy.counts["throttle"] >= 1 and proxy.counts["down"] >= 1
    finally:
        proxy.stop()


@pytest.fixture
def installed_database(pg_server: devdb.Server) -> Iterator[str]:
    name = pg_server.create_database("owui_crypto_e2e_soak")
    load_owui_schema(pg_server.url(name))
    migrate.upgrade(pg_server.url(name))
    yield name
    pg_server.drop_database(name)


def test_pgbouncer_restarts_on_its_port_and_the_probe_catches_a_held_key(pg_server: devdb.Server,
                                                                          installed_database: str) -> None:
    bouncer = PgBouncer(pg_server.admin_url, pool_size=1)
    bouncer.start()
    try:
        url = devdb.Server(bouncer.admin_url, "pgbouncer").url(installed_database)
        probe = PoolProbe(url)
        assert probe.run(connections=2, transactions=3) == [] and probe.checks == 6
        port = bouncer.port
        bouncer.restart()
        assert bouncer.port == port
        assert probe.run(connections=1, transactions=2) == [] and probe.checks == 8
        # A key set for the session, not the transaction, stays on the pooled backend: the probe must see it.
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT set_config('owui_crypto.user_key', 'not-a-real-key', false)")
        problems = probe.run(connections=1, transactions=2)
        assert problems and all("owui_crypto.user_key" in p for p in problems)
        assert "not-a-real-key" not in " ".join(problems)  # the value is never echoed
    finally:
        bouncer.close()
