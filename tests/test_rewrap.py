"""``owui-crypto rewrap``: every wrapped key moved to another CMK with KMS ReEncrypt.

Real PostgreSQL and moto over HTTP (moto 5 implements ReEncrypt, so no
Stubber is needed). moto does not refuse calls on a disabled key; the tests
that disable the old CMK add that refusal on the client, as real KMS does it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import botocore.exceptions
import psycopg
import pytest

from app_adapter.doctor import Status, diagnose
from app_adapter.errors import CannotUnwrap, KeyUnavailable
from app_adapter.keys import KeyService
from app_adapter.kms import KmsKeys
from app_adapter.rewrap import RewrapError, rewrap
from tests.kms_fixtures import KmsServer
from tests.test_cli import owui_crypto


@pytest.fixture
def cmks(kms_server: KmsServer) -> tuple[str, str]:
    """An old and a new CMK of this test's own (so disabling one leaks into no other test)."""
    return kms_server.create_key(), kms_server.create_key()


@pytest.fixture
def old_service(kms_server: KmsServer, cmks: tuple[str, str], db_url: str) -> Iterator[KeyService]:
    with service_on(kms_server, cmks[0], db_url) as service:
        yield service


def make_users(service: KeyService, n: int, prefix: str = "u") -> list[str]:
    """n Open WebUI users, each provisioned as sign-up does (GenerateDataKey under the service's CMK)."""
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    with psycopg.connect(service.dsn) as conn:
        for user_id in ids:
            conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (user_id, f"{user_id}@example.com"))
            service.provision(conn, user_id)
    return ids


def blobs(db_url: str) -> dict[str, bytes]:
    with psycopg.connect(db_url) as conn:
        found = {f"user {i}": bytes(b) for i, b in conn.execute(
            'SELECT id, kms_encrypted_dek FROM public."user" WHERE kms_encrypted_dek IS NOT NULL')}
        found |= {f"deployment key {n}": bytes(b) for n, b in conn.execute(
            "SELECT name, kms_wrapped FROM owui_crypto.deployment_key")}
    return found


def refuse_disabled_keys(kms: KmsKeys, admin: Any) -> None:
    """Make the client refuse, as real KMS does, a Decrypt by a key that is not Enabled (moto answers anyway)."""

    def check(parsed: dict[str, Any], **_: Any) -> None:
        key = parsed.get("KeyId")
        if key and admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] != "Enabled":
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "DisabledException", "Message": f"{key} is disabled."}}, "Decrypt")

    kms.client.meta.events.register("after-call.kms.Decrypt", check)


def kms_for(kms_server: KmsServer, cmk: str) -> KmsKeys:
    return KmsKeys(kms_server.settings(application_cmk_id=cmk))


@contextmanager
def service_on(kms_server: KmsServer, cmk: str, db_url: str) -> Iterator[KeyService]:
    """The adapter's KeyService with KMS_APPLICATION_CMK_ID=cmk."""
    service = KeyService(kms_server.settings(application_cmk_id=cmk), db_url)
    try:
        yield service
    finally:
        service.kms.close()


def test_every_key_moves_and_opens_under_the_new_cmk_with_the_old_one_disabled(
        kms_server: KmsServer, cmks: tuple[str, str], old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    users = make_users(old_service, 25)
    deks = {u: old_service.dek(u) for u in users}
    share = old_service.share_key()

    sent: list[dict[str, Any]] = []
    with kms_for(kms_server, old) as kms:
        kms.client.meta.events.register("before-call.kms.ReEncrypt", lambda params, **_: sent.append(
            json.loads(params["body"])))
        done = rewrap(old_service.dsn, kms, new, [old], batch=7, workers=3, progress=False)
        calls = kms.metrics()["calls"]
    assert done.complete and done.moved == 26 and done.already == 0 and done.rows == 26
    assert done.rows_per_second > 0
    # Only ReEncrypt moved keys: no Decrypt, no Encrypt, no GenerateDataKey, so no DEK left KMS.
    assert set(calls) == {"DescribeKey", "ReEncrypt"} and calls["ReEncrypt"] == 26
    # The context is the one kms.py unwraps with, identical on both sides; no SourceKeyId.
    by_user = {s["SourceEncryptionContext"].get("user_id"): s for s in sent}
    assert by_user["u-0003"]["SourceEncryptionContext"] == {
        "purpose": "user-dek-encryption", "application": "open-webui", "user_id": "u-0003"}
    assert all(s["SourceEncryptionContext"] == s["DestinationEncryptionContext"] for s in sent)
    assert all("SourceKeyId" not in s for s in sent)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT kms_key_id FROM owui_crypto.deployment_key").fetchone()[0] == done.target_arn

    kms_server.admin.disable_key(KeyId=old)
    with service_on(kms_server, new, db_url) as service:
        refuse_disabled_keys(service.kms, kms_server.admin)
        service.kms.check_keys()
        assert {u: service.dek(u) for u in users} == deks
        assert service.share_key() == share
        # Each blob is still bound to its own user.
        with pytest.raises(CannotUnwrap):
            service.kms.unwrap_dek("u-0001", blobs(db_url)["user u-0002"])
    # The refusal is real: a blob still under the disabled old key does not open.
    with service_on(kms_server, old, db_url) as stale, kms_for(kms_server, old) as kms:
        refuse_disabled_keys(stale.kms, kms_server.admin)
        blob = kms.wrap_dek("late", deks[users[0]])
        with pytest.raises(KeyUnavailable, match="DisabledException"):
            stale.kms.unwrap_dek("late", blob)


def test_an_interrupted_run_resumes_from_the_blobs(kms_server: KmsServer, cmks: tuple[str, str],
                                                   old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    users = make_users(old_service, 23)
    deks = {u: old_service.dek(u) for u in users}
    calls = 0

    def fail_on_the_14th(**_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 14:
            raise botocore.exceptions.ClientError({"Error": {"Code": "KMSInternalException", "Message": "x"}},
                                                  "ReEncrypt")

    with kms_for(kms_server, old) as kms:
        kms.client.meta.events.register("before-call.kms.ReEncrypt", fail_on_the_14th)
        with pytest.raises(RewrapError, match="run rewrap again"):
            rewrap(old_service.dsn, kms, new, [old], batch=5, workers=1, progress=False)
    # No deployment key here; batches of 5: two committed (calls 1-10), the third lost at call 14.
    with kms_for(kms_server, old) as kms:
        done = rewrap(old_service.dsn, kms, new, [old], batch=5, workers=2, progress=False)
    assert (done.already, done.moved, done.complete) == (10, 13, True)
    with kms_for(kms_server, old) as kms:
        again = rewrap(old_service.dsn, kms, new, [old], progress=False)
    assert (again.already, again.moved) == (23, 0)
    with service_on(kms_server, new, db_url) as service:
        assert {u: service.dek(u) for u in users} == deks


def test_a_concurrent_change_is_never_overwritten(kms_server: KmsServer, cmks: tuple[str, str],
                                                  old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    make_users(old_service, 6)
    replaced = b"written by someone else meanwhile"

    def meanwhile(params: dict[str, Any], **_: Any) -> None:
        user = json.loads(params["body"])["SourceEncryptionContext"]["user_id"]
        with psycopg.connect(db_url, autocommit=True) as other:
            if user == "u-0001":  # forgotten while rewrap held its blob
                other.execute('UPDATE public."user" SET kms_encrypted_dek = NULL WHERE id = %s', (user,))
            elif user == "u-0004":  # and another one's blob replaced
                other.execute('UPDATE public."user" SET kms_encrypted_dek = %s WHERE id = %s', (replaced, user))

    with kms_for(kms_server, old) as kms:
        kms.client.meta.events.register("before-call.kms.ReEncrypt", meanwhile)
        done = rewrap(old_service.dsn, kms, new, [old], batch=4, workers=1, progress=False)
    assert (done.moved, done.vanished, done.changed) == (4, 1, ["user u-0004"])
    assert not done.complete and "run rewrap again" in done.problem_lines()[0]
    after = blobs(db_url)
    assert "user u-0001" not in after and after["user u-0004"] == replaced


def test_blobs_under_another_key_are_left_alone_unless_named(kms_server: KmsServer, cmks: tuple[str, str],
                                                             old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    third = kms_server.create_key()
    make_users(old_service, 3)
    with service_on(kms_server, third, db_url) as elsewhere:
        make_users(elsewhere, 2, prefix="x")
    with psycopg.connect(db_url) as conn:  # a blob that opens for nobody
        conn.execute('INSERT INTO public."user" (id, email, kms_encrypted_dek) VALUES (%s, %s, %s)',
                     ("z-broken", "z@example.com", b"not a kms blob"))
    before = blobs(db_url)
    with kms_for(kms_server, old) as kms:
        done = rewrap(old_service.dsn, kms, new, [old], progress=False)
    assert done.moved == 3 and [who for who, _ in done.foreign] == ["user x-0000", "user x-0001"]
    assert [who for who, _ in done.unopenable] == ["user z-broken"]
    assert not done.complete
    lines = "\n".join(done.problem_lines())
    assert "neither a --from key nor the target" in lines and "would not re-encrypt" in lines
    after = blobs(db_url)
    assert all(after[w] == before[w] for w in ("user x-0000", "user x-0001", "user z-broken"))
    with kms_for(kms_server, old) as kms:
        more = rewrap(old_service.dsn, kms, new, [old, third], progress=False)
    assert (more.moved, more.already, [w for w, _ in more.unopenable]) == (2, 3, ["user z-broken"])


def test_a_target_that_is_not_a_usable_cmk_stops_before_writing(kms_server: KmsServer, cmks: tuple[str, str],
                                                                old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    make_users(old_service, 2)
    before = blobs(db_url)
    hmac_key = kms_server.create_key("HMAC_256")
    kms_server.admin.disable_key(KeyId=new)
    with kms_for(kms_server, old) as kms:
        with pytest.raises(KeyUnavailable, match="--to"):
            rewrap(old_service.dsn, kms, new, [old], progress=False)
        with pytest.raises(KeyUnavailable, match="KeyUsage GENERATE_VERIFY_MAC"):
            rewrap(old_service.dsn, kms, hmac_key, [old], progress=False)
    assert blobs(db_url) == before


def test_the_command_moves_everything_and_says_what_next(kms_server: KmsServer, cmks: tuple[str, str],
                                                         old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    users = make_users(old_service, 5)
    deks = {u: old_service.dek(u) for u in users}
    old_service.share_key()
    env = {"KMS_APPLICATION_CMK_ID": old}
    result = owui_crypto("rewrap", "--to", new, "--no-progress", "--database-url", db_url, env=env)
    assert result.returncode == 0, result.stderr
    assert "6 moved, 0 already there" in result.stdout and "rows/s" in result.stdout
    assert f"set KMS_APPLICATION_CMK_ID={new}" in result.stdout and f"--to {new} --from {old} again" in result.stdout
    # After the switch, a second run (from the old key, for users who signed up meanwhile) moves nothing twice.
    again = owui_crypto("rewrap", "--to", new, "--from", old, "--no-progress", "--database-url", db_url,
                        env={"KMS_APPLICATION_CMK_ID": new})
    assert again.returncode == 0 and "0 moved, 6 already there" in again.stdout, again.stderr
    assert "next:" not in again.stdout
    with service_on(kms_server, new, db_url) as service:
        assert {u: service.dek(u) for u in users} == deks


def test_doctor_tells_a_rewrap_whose_setting_was_not_switched(kms_server: KmsServer, cmks: tuple[str, str],
                                                              old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    make_users(old_service, 3)
    old_service.share_key()
    with kms_for(kms_server, old) as kms:
        assert rewrap(old_service.dsn, kms, new, [old], progress=False).complete

    def failing(cmk: str) -> set[str]:
        report = diagnose(db_url, settings=kms_server.settings(application_cmk_id=cmk))
        return {f.check for f in report.findings if f.status is Status.FAIL}

    assert {"keys.share", "keys.sample"} <= failing(old)
    assert not {"keys.share", "keys.sample", "kms.keys", "kms.round-trip"} & failing(new)
