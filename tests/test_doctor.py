"""``owui-crypto doctor`` against real PostgreSQL (non-superuser roles, as in production) and moto over HTTP."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import psycopg
import pytest

from app_adapter.config import Settings
from app_adapter.doctor import Report, Status, diagnose, tls_finding
from app_adapter.keys import KeyService
from tests.kms_fixtures import KmsServer
from tests.roles import Site
from tests.test_cli import owui_crypto


def statuses(report: Report) -> dict[str, set[Status]]:
    found: dict[str, set[Status]] = {}
    for f in report.findings:
        found.setdefault(f.check, set()).add(f.status)
    return found


def failing(report: Report) -> set[str]:
    return {f.check for f in report.findings if f.status is Status.FAIL}


@pytest.fixture
def settings(kms_server: KmsServer) -> Settings:
    return kms_server.settings()


@pytest.fixture
def healthy(site: Site, settings: Settings) -> Iterator[Site]:
    """An install as documented: upgrade and grant by the owner, a server that logs no chat text, the share key
    registered by a first start, every user provisioned."""
    site.configure({"log_error_verbosity": "terse"})
    service = KeyService(settings, site.owner_url)
    try:
        service.share_key()
        with psycopg.connect(site.owner_url) as conn:
            conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', ("u-1", "u-1@example.com"))
            service.provision(conn, "u-1")
    finally:
        service.kms.close()
    yield site


def test_a_healthy_install_passes(healthy: Site, settings: Settings) -> None:
    report = diagnose(healthy.owner_url, settings=settings)
    assert report.ok and report.exit_code == 0, report.text()
    found = statuses(report)
    for check in ("kms.keys", "kms.round-trip", "kms.mac", "db.connect", "db.schema", "role.superuser",
                  "role.temp", "path.creators", "role.key-ring", "schema.drift", "data.plaintext", "server.logging",
                  "keys.share", "keys.users", "keys.sample"):
        assert found[check] == {Status.PASS}, (check, report.text())
    # The owner running the service is the documented single-role residual; loopback needs no TLS.
    assert found["role.owner"] == found["role.create"] == found["db.tls"] == {Status.WARN}
    assert "One role for everything" in report.text()


def test_the_granted_application_role_passes_every_privilege_item(healthy: Site, settings: Settings) -> None:
    report = diagnose(healthy.app_url, settings=settings)
    found = statuses(report)
    for check in ("role.superuser", "role.owner", "role.temp", "role.create", "role.key-ring", "keys.share"):
        assert found[check] == {Status.PASS}, (check, report.text())
    # What it may not see is said, not guessed.
    assert found["keys.users"] == {Status.WARN} and "run owui-crypto doctor as owui-crypto's owner" in report.text()
    assert report.ok
    healthy.grant_temp()
    again = diagnose(healthy.app_url, settings=settings)
    assert statuses(again)["role.temp"] == {Status.WARN} and "owui-crypto grant" in again.text()


def test_parameter_logging_fails_that_item(healthy: Site, settings: Settings) -> None:
    healthy.configure({"log_statement": "all", "log_parameter_max_length": "-1"})
    report = diagnose(healthy.owner_url, settings=settings)
    assert failing(report) == {"server.logging"} and report.exit_code == 1
    assert "log_parameter_max_length = 0" in report.text()


def test_a_disabled_cmk_fails(healthy: Site, kms_server: KmsServer) -> None:
    cmk = kms_server.create_key()
    settings = kms_server.settings(application_cmk_id=cmk)
    kms_server.admin.disable_key(KeyId=cmk)
    report = diagnose(healthy.owner_url, settings=settings)
    assert "kms.keys" in failing(report)
    assert "is in state Disabled" in next(f.message for f in report.findings if f.check == "kms.keys")
    # Under this CMK the registered share key does not open: a rewrap was not done, or not finished.
    assert "keys.share" in failing(report) and report.exit_code == 1


def test_drift_fails(healthy: Site, settings: Settings) -> None:
    with healthy.owner() as conn:
        conn.execute("ALTER TABLE public.chat ADD COLUMN added_later text")
    report = diagnose(healthy.owner_url, settings=settings)
    assert failing(report) == {"schema.drift"}
    assert "differ from the base table" in report.text() and "owui-crypto refresh" in report.text()


def test_a_superuser_fails(healthy: Site, settings: Settings) -> None:
    report = diagnose(healthy.server.url(healthy.name), settings=settings)
    assert failing(report) == {"role.superuser"}


def test_users_without_a_kms_copy_and_a_missing_share_key(site: Site, settings: Settings) -> None:
    site.configure({"log_error_verbosity": "terse"})
    with site.owner() as conn:
        conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', ("u-nokey", "n@example.com"))
    report = diagnose(site.owner_url, settings=settings)
    found = statuses(report)
    assert found["keys.share"] == {Status.WARN} and found["keys.users"] == {Status.FAIL}
    assert "u-nokey" in report.text() and "owui-crypto provision" in report.text()


def test_missing_kms_settings_fail_and_the_database_is_still_checked(healthy: Site) -> None:
    report = diagnose(healthy.owner_url, environ={"AWS_REGION": "us-east-1"})
    found = statuses(report)
    assert found["kms.settings"] == {Status.FAIL} and "KMS_HMAC_KEY_ID" in report.text()
    assert found["schema.drift"] == {Status.PASS} and found["keys.share"] == {Status.WARN}


def test_an_unreachable_database_is_one_failure(settings: Settings) -> None:
    report = diagnose("postgresql://nobody@127.0.0.1:1/none", settings=settings)
    assert failing(report) == {"db.connect"}


@pytest.mark.parametrize(("ssl", "mode", "host", "status"), [
    (False, "prefer", "127.0.0.1", Status.WARN),
    (False, "disable", "/var/run/postgresql", Status.WARN),
    (False, "prefer", "db.cluster-abc.us-east-1.rds.amazonaws.com", Status.FAIL),
    (True, "require", "db.cluster-abc.us-east-1.rds.amazonaws.com", Status.WARN),
    (True, "verify-ca", "db.example", Status.WARN),
    (True, "verify-full", "db.example", Status.PASS),
])
def test_tls(ssl: bool, mode: str, host: str, status: Status) -> None:
    assert tls_finding(ssl, mode, host).status is status


def test_the_command_prints_each_item_and_json(healthy: Site) -> None:
    text = owui_crypto("doctor", "--database-url", healthy.owner_url)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "PASS  kms.round-trip" in text.stdout and "WARN  db.tls" in text.stdout
    assert "what to do:" in text.stdout and text.stdout.rstrip().endswith("0 fail")
    machine = owui_crypto("doctor", "--json", "--database-url", healthy.owner_url)
    parsed = json.loads(machine.stdout)
    assert parsed["ok"] is True and parsed["counts"]["FAIL"] == 0
    assert {"check", "status", "message", "action"} <= set(parsed["findings"][0])
    healthy.configure({"log_statement": "all", "log_parameter_max_length": "-1"})
    failed = owui_crypto("doctor", "--json", "--database-url", healthy.owner_url)
    assert failed.returncode == 1 and json.loads(failed.stdout)["ok"] is False


def test_accepted_cmks_are_checked_and_their_decrypt_proven_once_a_key_is_under_them(
        healthy: Site, settings: Settings, kms_server: KmsServer) -> None:
    from app_adapter.kms import KmsKeys
    from app_adapter.rewrap import rewrap

    new = kms_server.create_key()
    accepting = dataclasses.replace(settings, accepted_cmk_ids=(new,))
    # Step 1 of the rewrap sequence: the new key accepted, nothing under it yet: usable, Decrypt not yet proven.
    before = diagnose(healthy.owner_url, settings=accepting)
    assert before.ok, before.text()
    assert statuses(before)["kms.accepted"] == {Status.WARN}
    assert "not proven" in before.text()
    with KmsKeys(accepting) as kms:
        assert rewrap(healthy.owner_url, kms, new, [settings.application_cmk_id], progress=False).complete
    # After the rewrap: every key is under the accepted one, and it opens them.
    after = diagnose(healthy.owner_url, settings=accepting)
    found = statuses(after)
    assert after.ok and found["kms.accepted"] == found["keys.sample"] == found["keys.share"] == {Status.PASS}, \
        after.text()
    # An accepted key that could not decrypt fails kms.keys, as the primary would.
    kms_server.admin.disable_key(KeyId=new)
    assert "kms.keys" in failing(diagnose(healthy.owner_url, settings=accepting))
