"""``owui-crypto rewrap``: every wrapped key moved to another CMK with KMS ReEncrypt.

Real PostgreSQL and moto over HTTP (moto 5 implements ReEncrypt, so no
Stubber is needed). moto does not refuse calls on a disabled key; the tests
that disable the old CMK add that refusal on the client, as real KMS does it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import psycopg
import pytest

from app_adapter.doctor import Status, diagnose
from app_adapter.errors import CannotUnwrap, ConfigError, KeyUnavailable
from app_adapter.iam import policy_from_environment
from app_adapter.keys import SHARE_KEY, KeyService
from app_adapter.kms import KmsKeys
from app_adapter.rewrap import RewrapError, rewrap
from app_adapter.secret import SecretBytes
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


def kms_for(kms_server: KmsServer, cmk: str, *accepted: str) -> KmsKeys:
    return KmsKeys(kms_server.settings(application_cmk_id=cmk, accepted_cmk_ids=accepted))


@contextmanager
def service_on(kms_server: KmsServer, cmk: str, db_url: str, *accepted: str) -> Iterator[KeyService]:
    """The adapter's KeyService with KMS_APPLICATION_CMK_ID=cmk and OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS=accepted."""
    service = KeyService(kms_server.settings(application_cmk_id=cmk, accepted_cmk_ids=accepted), db_url)
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
    with kms_for(kms_server, old, new) as kms:
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

    with kms_for(kms_server, old, new) as kms:
        kms.client.meta.events.register("before-call.kms.ReEncrypt", fail_on_the_14th)
        with pytest.raises(RewrapError, match="run rewrap again"):
            rewrap(old_service.dsn, kms, new, [old], batch=5, workers=1, progress=False)
    # No deployment key here; batches of 5: two committed (calls 1-10), the third lost at call 14.
    with kms_for(kms_server, old, new) as kms:
        done = rewrap(old_service.dsn, kms, new, [old], batch=5, workers=2, progress=False)
    assert (done.already, done.moved, done.complete) == (10, 13, True)
    with kms_for(kms_server, old, new) as kms:
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

    with kms_for(kms_server, old, new) as kms:
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
    with kms_for(kms_server, old, new) as kms:
        done = rewrap(old_service.dsn, kms, new, [old], progress=False)
    assert done.moved == 3 and [who for who, _ in done.foreign] == ["user x-0000", "user x-0001"]
    assert [who for who, _ in done.unopenable] == ["user z-broken"]
    assert not done.complete
    lines = "\n".join(done.problem_lines())
    assert "neither a --from key nor the target" in lines and "would not re-encrypt" in lines
    after = blobs(db_url)
    assert all(after[w] == before[w] for w in ("user x-0000", "user x-0001", "user z-broken"))
    with kms_for(kms_server, old, new) as kms:
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
    env = {"KMS_APPLICATION_CMK_ID": old, "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS": new}
    result = owui_crypto("rewrap", "--to", new, "--no-progress", "--database-url", db_url, env=env)
    assert result.returncode == 0, result.stderr
    assert "6 moved, 0 already there" in result.stdout and "rows/s" in result.stdout
    assert f"set KMS_APPLICATION_CMK_ID={new} and OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS={old}" in result.stdout
    assert f"rewrap --to {new} again" in result.stdout
    # After the switch (step 3's settings), a second run with no --from: the old key is an accepted one, so it is a
    # source; nothing is moved twice.
    again = owui_crypto("rewrap", "--to", new, "--no-progress", "--database-url", db_url,
                        env={"KMS_APPLICATION_CMK_ID": new, "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS": old})
    assert again.returncode == 0 and "0 moved, 6 already there" in again.stdout, again.stderr
    assert "next:" not in again.stdout
    with service_on(kms_server, new, db_url) as service:
        assert {u: service.dek(u) for u in users} == deks


def test_doctor_tells_a_rewrap_whose_setting_was_not_switched(kms_server: KmsServer, cmks: tuple[str, str],
                                                              old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    make_users(old_service, 3)
    old_service.share_key()
    with kms_for(kms_server, old, new) as kms:
        assert rewrap(old_service.dsn, kms, new, [old], progress=False).complete

    def failing(cmk: str) -> set[str]:
        report = diagnose(db_url, settings=kms_server.settings(application_cmk_id=cmk))
        return {f.check for f in report.findings if f.status is Status.FAIL}

    assert {"keys.share", "keys.sample"} <= failing(old)
    assert not {"keys.share", "keys.sample", "kms.keys", "kms.round-trip"} & failing(new)


# -- a fleet serving through a rewrap (OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS) ---------------------------------------

_WAIT = 60.0  # bound of every wait below, in seconds (never asserted on: a timeout shows as a missing event)


@dataclass
class Served:
    """What one serving adapter did: requests answered, failures, and the keys that opened its blobs."""

    name: str
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    opened_by: set[str] = field(default_factory=set)
    midway_pass: threading.Event = field(default_factory=threading.Event)


def serve(service: KeyService, db_url: str, users: list[str], deks: dict[str, SecretBytes], share: SecretBytes,
          midway: threading.Event, stop: threading.Event, served: Served) -> None:
    """Answer every user again and again, each time from KMS (cache cleared), as a cache miss of a request does;
    after ``stop``, one more full pass. A failure is any exception or a wrong key."""
    def opened(parsed: dict[str, Any], **_: Any) -> None:
        if "Plaintext" in parsed:  # an answer, not the refusal of a key tried on the way
            served.opened_by.add(parsed["KeyId"])

    service.kms.client.meta.events.register("after-call.kms.Decrypt", opened)
    stopping = False
    for _ in range(2_000):  # bounded; ends long before on a normal run
        saw_midway = midway.is_set()
        for user_id in list(users):
            service.cache.clear()
            try:
                if service.dek(user_id) != deks[user_id]:
                    served.failures.append(f"{user_id}: another key")
                with psycopg.connect(db_url, autocommit=True) as conn:
                    row = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key_wrapped(%s)",
                                       (SHARE_KEY,)).fetchone()
                assert row is not None
                if service.kms.unwrap_deployment_key(SHARE_KEY, bytes(row[0])) != share:
                    served.failures.append("share key: another key")
            except Exception as exc:  # every failure is counted, and none may happen
                served.failures.append(f"{user_id}: {type(exc).__name__}: {exc}")
            served.requests += 2
        if saw_midway:
            served.midway_pass.set()  # a whole pass while the rewrap was paused half way
        if stopping:
            return
        stopping = stop.is_set()


def key_arn(kms_server: KmsServer, key_id: str) -> str:
    return str(kms_server.admin.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])


def test_a_fleet_serves_through_a_rewrap_with_zero_failed_requests(
        kms_server: KmsServer, cmks: tuple[str, str], old_service: KeyService, db_url: str) -> None:
    """The README's sequence: 1. instances accept the new key, 2. rewrap while they serve, 3. the new key becomes
    primary with the old one accepted, rewrap again for sign-ups of the meantime, 4. the old key is dropped.
    One instance runs step 1's settings and another already step 3's (a rolling restart overlapping the rewrap);
    both serve every user from KMS throughout, and sign-ups happen half way."""
    old, new = cmks
    old_arn, new_arn = key_arn(kms_server, old), key_arn(kms_server, new)
    users = make_users(old_service, 40)
    deks = {u: old_service.dek(u) for u in users}
    share = old_service.share_key()
    midway, stop = threading.Event(), threading.Event()
    step1, step3 = Served("old primary, new accepted"), Served("new primary, old accepted")

    with service_on(kms_server, old, db_url, new) as first, service_on(kms_server, new, db_url, old) as third, \
            kms_for(kms_server, old, new) as kms:
        first.kms.check_keys()
        third.kms.check_keys()
        threads = [threading.Thread(target=serve, args=(s, db_url, users, deks, share, midway, stop, r))
                   for s, r in ((first, step1), (third, step3))]
        calls = 0

        def half_way(**_: Any) -> None:
            """At the 21st ReEncrypt (the share key and 19 users moved): two sign-ups, one per instance, then wait
            until both instances served everyone once with the keys split between the CMKs."""
            nonlocal calls
            calls += 1
            if calls == 21:
                for service, user_id in ((first, "late-under-old"), (third, "late-under-new")):
                    make_users_named(service, user_id)
                    deks[user_id] = service.dek(user_id)
                    users.append(user_id)
                midway.set()
                step1.midway_pass.wait(_WAIT)
                step3.midway_pass.wait(_WAIT)

        kms.client.meta.events.register("before-call.kms.ReEncrypt", half_way)
        for thread in threads:
            thread.start()
        try:
            done = rewrap(old_service.dsn, kms, new, [old], batch=5, workers=1, progress=False)
        finally:
            stop.set()
            for thread in threads:
                thread.join(_WAIT)
        assert not any(t.is_alive() for t in threads)

    for served in (step1, step3):
        assert served.failures == [], served.name
        assert served.midway_pass.is_set(), served.name
        assert served.requests >= 2 * 42 * 2, served.name  # at least the half-way pass and the last one
        assert served.opened_by == {old_arn, new_arn}, served.name  # both kinds of blob were served
    # The share key and the 40 users; the sign-ups sort before the rows rewrap had reached, so this run left them
    # where they were made.
    assert done.complete and done.moved == 41 and done.already == 0
    before = blobs(db_url)

    # Step 3: the new key primary, the old one accepted; the second run moves what was made under the old one.
    with service_on(kms_server, new, db_url, old) as switched, kms_for(kms_server, new, old) as kms:
        again = rewrap(old_service.dsn, kms, new, [old], progress=False)
        assert {u: switched.dek(u) for u in users} == deks
    assert (again.moved, again.already, again.complete) == (1, 42, True)
    assert [w for w, b in blobs(db_url).items() if b != before[w]] == ["user late-under-old"]

    # Step 4: the old key dropped from the settings and disabled: everything opens under the new key alone.
    kms_server.admin.disable_key(KeyId=old)
    with service_on(kms_server, new, db_url) as last:
        refuse_disabled_keys(last.kms, kms_server.admin)
        last.kms.check_keys()
        assert {u: last.dek(u) for u in users} == deks
        assert last.share_key() == share


def make_users_named(service: KeyService, user_id: str) -> None:
    with psycopg.connect(service.dsn) as conn:
        conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (user_id, f"{user_id}@example.com"))
        service.provision(conn, user_id)


def test_a_key_under_a_cmk_neither_primary_nor_accepted_is_refused(
        kms_server: KmsServer, cmks: tuple[str, str], old_service: KeyService, db_url: str) -> None:
    """Fail closed: a wrapped key planted from a third CMK opens on no instance of the sequence."""
    old, new = cmks
    with service_on(kms_server, kms_server.create_key(), db_url) as elsewhere:
        make_users_named(elsewhere, "planted")
    for primary, accepted in ((old, (new,)), (new, (old,)), (new, ())):
        with service_on(kms_server, primary, db_url, *accepted) as service:
            with pytest.raises(CannotUnwrap):
                service.dek("planted")
            assert service.kms.metrics()["errors"] == {"CannotUnwrap": 1}


def test_rewrap_refuses_a_target_the_instances_would_not_open(
        kms_server: KmsServer, cmks: tuple[str, str], old_service: KeyService, db_url: str) -> None:
    old, new = cmks
    make_users(old_service, 3)
    before = blobs(db_url)
    with kms_for(kms_server, old) as kms:
        with pytest.raises(RewrapError, match="add it to OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS on every instance"):
            rewrap(old_service.dsn, kms, new, [old], progress=False)
    result = owui_crypto("rewrap", "--to", new, "--no-progress", "--database-url", db_url,
                         env={"KMS_APPLICATION_CMK_ID": old})
    assert result.returncode != 0 and "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS" in result.stderr
    assert blobs(db_url) == before


def test_iam_policy_gives_accepted_cmks_decrypt_only() -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/{}-12ab-34cd-56ef-1234567890ab"
    hmac_key, cmk, other = arn.format("1111abcd"), arn.format("2222abcd"), arn.format("3333abcd")
    env = {"KMS_HMAC_KEY_ID": hmac_key, "KMS_APPLICATION_CMK_ID": cmk,
           "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS": f"{other}, {cmk},"}
    statements = {s["Sid"]: s for s in policy_from_environment(environ=env)["Statement"]}
    assert statements["DescribeKeys"]["Resource"] == [hmac_key, cmk, other]
    for sid in ("UserDataKeys", "DeploymentKeys"):
        assert statements[f"Accepted{sid}"]["Action"] == ["kms:Decrypt"]
        assert statements[f"Accepted{sid}"]["Resource"] == [other]
        assert statements[f"Accepted{sid}"]["Condition"] == statements[sid]["Condition"]
        assert statements[sid]["Resource"] == cmk  # GenerateDataKey and Encrypt stay on the primary alone
    without = policy_from_environment(environ={**env, "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS": ""})
    assert "Accepted" not in json.dumps(without)
    # With erasure by grants, users' Decrypt comes from grants, on the accepted key as on the primary.
    grants = {s["Sid"] for s in policy_from_environment(environ={
        **env, "OWUI_CRYPTO_ERASURE": "grants",
        "OWUI_CRYPTO_ERASURE_GRANTEE": "arn:aws:iam::111122223333:role/owui"})["Statement"]}
    assert "AcceptedDeploymentKeys" in grants and "AcceptedUserDataKeys" not in grants
    with pytest.raises(ConfigError, match="OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS.*alias"):
        policy_from_environment(environ={**env, "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS": "alias/next"})


def test_rewrap_throughput(kms_server: KmsServer, cmks: tuple[str, str], old_service: KeyService, db_url: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """Rows/s of rewrap, one and four ReEncrypt calls in flight. OWUI_CRYPTO_BENCH_USERS: users (100)."""
    old, new = cmks
    count = int(os.environ.get("OWUI_CRYPTO_BENCH_USERS", "100"))
    make_users(old_service, count)
    rates = {}
    for workers, source, target in ((1, old, new), (4, new, old)):
        with kms_for(kms_server, source, target) as kms:
            done = rewrap(old_service.dsn, kms, target, [source], workers=workers, progress=False)
        assert done.complete and done.moved == count
        rates[workers] = done.rows_per_second
    with capsys.disabled():
        print(f"\nrewrap: {count} users, " + ", ".join(f"{w} in flight {r:.0f} rows/s" for w, r in rates.items()))
