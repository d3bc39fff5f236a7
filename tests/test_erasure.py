"""Erasure that reaches backups (OWUI_CRYPTO_ERASURE=grants), against moto over HTTP plus an authorization layer.

What is real: moto's KMS server over HTTP stores the keys, wraps and unwraps DEKs, and stores, lists and
deletes grants (CreateGrant, ListGrants, RetireGrant); PostgreSQL, ``pg_dump`` and ``pg_restore`` are real.

What is emulated, because moto 5 does not do it: moto authorizes nothing (any caller may Decrypt any blob;
grants change nothing; grant tokens are ignored). :class:`KmsAuthority` hooks the task role's botocore client
(``before-call``) and answers AccessDeniedException, before the request leaves, whenever real KMS would for a
role whose key policy and IAM policy are the statements ``iam.task_role_policy`` prints: a call is allowed when
one statement allows its action on the key with the request's condition keys (``kms:EncryptionContext:*``,
``kms:EncryptionContextKeys``, ``kms:GranteePrincipal``, ``kms:RetiringPrincipal``, ``kms:GrantOperations``,
``kms:GrantConstraintType``), or, for Decrypt, when a grant stored in moto (read back with ListGrants over HTTP)
names the role as grantee, lists Decrypt, and its EncryptionContextEquals constraint equals the request's
context. RetireGrant is allowed to a grant's retiring principal or to its grantee when the grant lists
RetireGrant, and answers NotFoundException for a grant that is gone (moto answers nothing). Optional: grants
that have not "spread" yet (KMS's eventual consistency) authorize only a Decrypt that presents their token;
a cap on grants per key (KMS's 50,000 quota) answers LimitExceededException. Calls that pass go to moto
unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders

from app_adapter import erasure, iam
from app_adapter.config import Settings, erasure_settings
from app_adapter.devdb import Server
from app_adapter.erasure import ErasureIncomplete, GrantQuotaExceeded
from app_adapter.errors import CannotUnwrap, ConfigError
from app_adapter.keys import KeyService
from app_adapter.kms import KmsKeys, botocore_config
from app_adapter.owui.lifecycle import UserLifecycle, reconcile
from tests.dumps import restore_list
from tests.kms_fixtures import REGION, KmsServer

ACCOUNT = "123456789012"  # moto's account
TASK_ROLE = f"arn:aws:iam::{ACCOUNT}:role/owui-TaskRole-ABC"
OTHER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/someone-else"


# -- the emulated authorization decision ---------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_allows(policy: dict[str, Any], action: str, resource: str, request: dict[str, Any]) -> bool:
    """IAM's answer for one request under ``policy`` (Allow statements only; an unknown operator fails)."""
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow" or action not in _as_list(statement["Action"]):
            continue
        if resource not in _as_list(statement["Resource"]):
            continue
        if all(_holds(op, body, request) for op, body in statement.get("Condition", {}).items()):
            return True
    return False


def _holds(operator: str, body: dict[str, Any], request: dict[str, Any]) -> bool:
    for key, wanted in body.items():
        value = request.get(key)
        if operator == "StringEquals":
            if value is None or isinstance(value, list) or value not in _as_list(wanted):
                return False
        elif operator == "Null":
            if (value is None) != (wanted == "true"):
                return False
        elif operator == "ForAllValues:StringEquals":
            if not set(value or []) <= set(_as_list(wanted)):
                return False
        else:
            raise AssertionError(f"the emulator does not know the operator {operator}")
    return True


def _context_keys(context: dict[str, str]) -> dict[str, Any]:
    """The condition keys KMS derives from an encryption context (of a request, or of a grant's constraint)."""
    if not context:
        return {}
    return {**{f"kms:EncryptionContext:{k}": v for k, v in context.items()}, "kms:EncryptionContextKeys": list(context)}


@dataclass
class KmsAuthority:
    """The authorization decision of real KMS for one role, in front of moto (see the module docstring)."""

    admin: Any  # an unhooked client: moto as it is
    policy: dict[str, Any]
    role: str = TASK_ROLE
    grant_quota: int | None = None
    delay_grants: bool = False  # new grants work only with their token until propagate()
    refuse: set[str] = field(default_factory=set)  # operations answered AccessDenied whatever the policy says
    denied: list[tuple[str, str]] = field(default_factory=list)  # (operation, reason) of every refusal
    _arns: dict[str, str] = field(default_factory=dict)
    _unspread: dict[str, str] = field(default_factory=dict)  # grant id -> token, while delay_grants

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-call.kms.*", self._before_call)
        client.meta.events.register("after-call.kms.CreateGrant", self._after_create_grant)
        return client

    def propagate(self) -> None:
        self._unspread.clear()

    def _arn(self, key_id: str) -> str:
        if key_id not in self._arns:
            self._arns[key_id] = self.admin.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
        return self._arns[key_id]

    def _grants(self, key_arn: str) -> list[dict[str, Any]]:
        return list(self.admin.list_grants(KeyId=key_arn)["Grants"])

    def _before_call(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        operation = model.name
        body = json.loads(params["body"] or b"{}")
        reason = self._refusal(operation, body)
        if reason is None:
            return None
        self.denied.append((operation, reason))
        code, message = reason.split(": ", 1)
        return (AWSResponse("https://kms.emulated", 400, HTTPHeaders(), None),
                {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400}})

    def _refusal(self, operation: str, body: dict[str, Any]) -> str | None:
        if operation in self.refuse:
            return f"AccessDeniedException: {operation} refused by the test"
        key = self._arn(body["KeyId"]) if body.get("KeyId") else ""
        if operation == "RetireGrant":
            return self._retire_refusal(key, body)
        request: dict[str, Any] = {}
        if operation == "CreateGrant":
            constraints = body.get("Constraints") or {}
            kinds = [k for k in ("EncryptionContextEquals", "EncryptionContextSubset") if constraints.get(k)]
            request = {**_context_keys(constraints.get(kinds[0], {}) if kinds else {}),
                       "kms:GranteePrincipal": body.get("GranteePrincipal"),
                       "kms:RetiringPrincipal": body.get("RetiringPrincipal"),
                       "kms:GrantOperations": body.get("Operations") or None}
            if kinds:
                request["kms:GrantConstraintType"] = kinds[0]
            if self.grant_quota is not None and len(self._grants(key)) >= self.grant_quota:
                return "LimitExceededException: the grants quota of this key is reached"
        else:
            request = _context_keys(body.get("EncryptionContext") or {})
        if policy_allows(self.policy, f"kms:{operation}", key, request):
            return None
        if operation == "Decrypt" and self._grant_allows_decrypt(key, body):
            return None
        return f"AccessDeniedException: {self.role} is not authorized to perform kms:{operation} on {key}"

    def _grant_allows_decrypt(self, key: str, body: dict[str, Any]) -> bool:
        context = body.get("EncryptionContext") or {}
        tokens = set(body.get("GrantTokens") or [])
        for grant in self._grants(key):
            if grant["GranteePrincipal"] != self.role or "Decrypt" not in grant["Operations"]:
                continue
            if grant["GrantId"] in self._unspread and self._unspread[grant["GrantId"]] not in tokens:
                continue
            constraints = grant.get("Constraints") or {}
            equals, subset = constraints.get("EncryptionContextEquals"), constraints.get("EncryptionContextSubset")
            if equals is not None and equals != context:
                continue
            if subset is not None and not set(subset.items()) <= set(context.items()):
                continue
            return True
        return False

    def _retire_refusal(self, key: str, body: dict[str, Any]) -> str | None:
        found = [g for g in self._grants(key) if g["GrantId"] == body.get("GrantId")]
        if not found:
            return f"NotFoundException: grant {body.get('GrantId')} not found"
        grant = found[0]
        if grant.get("RetiringPrincipal") == self.role or (
                grant["GranteePrincipal"] == self.role and "RetireGrant" in grant["Operations"]):
            return None
        return f"AccessDeniedException: {self.role} may not retire grant {grant['GrantId']}"

    def _after_create_grant(self, parsed: dict[str, Any], **_: Any) -> None:
        if self.delay_grants and "GrantId" in parsed:
            self._unspread[parsed["GrantId"]] = parsed["GrantToken"]


# -- fixtures --------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One deployment with erasure on: its own CMK (so its grants are its own), the task role's KMS client."""

    kms_server: KmsServer
    settings: Settings
    authority: KmsAuthority
    hmac_arn: str
    cmk_arn: str
    clients: list[Any] = field(default_factory=list)

    def settings_with(self, **overrides: Any) -> Settings:
        return self.kms_server.settings(application_cmk_id=self.settings.application_cmk_id,
                                        **{"erasure": "grants", "erasure_grantee": TASK_ROLE, **overrides})

    def task_role_kms(self, authority: KmsAuthority | None = None, *, authorize: bool = True) -> KmsKeys:
        """A KmsKeys whose calls are decided as real KMS would for the task role (one per 'process');
        ``authorize=False``: moto alone, which allows everything (to time moto without the emulator)."""
        client = boto3.session.Session().client("kms", region_name=REGION, config=botocore_config(self.settings))
        if authorize:
            (authority or self.authority).attach(client)
        self.clients.append(client)
        return KmsKeys(self.settings, client=client)

    def service(self, db_url: str, authority: KmsAuthority | None = None, *, authorize: bool = True,
                **overrides: Any) -> KeyService:
        return KeyService(self.settings_with(**overrides), db_url,
                          kms=self.task_role_kms(authority, authorize=authorize))

    def grants(self) -> list[dict[str, Any]]:
        return list(self.kms_server.admin.list_grants(KeyId=self.cmk_arn)["Grants"])

    def authority_for(self, **settings: str) -> KmsAuthority:
        mode, grantee = erasure_settings(settings)
        return KmsAuthority(self.kms_server.admin,
                            iam.task_role_policy(self.hmac_arn, self.cmk_arn, erasure=mode, grantee_arn=grantee))


@pytest.fixture
def site(kms_server: KmsServer) -> Iterator[Site]:
    admin = kms_server.admin
    cmk = kms_server.create_key("SYMMETRIC_DEFAULT")
    settings = kms_server.settings(application_cmk_id=cmk, erasure="grants", erasure_grantee=TASK_ROLE)
    hmac_arn = admin.describe_key(KeyId=kms_server.hmac_key_id)["KeyMetadata"]["Arn"]
    cmk_arn = admin.describe_key(KeyId=cmk)["KeyMetadata"]["Arn"]
    policy = iam.task_role_policy(hmac_arn, cmk_arn, erasure="grants", grantee_arn=TASK_ROLE)
    handle = Site(kms_server, settings, KmsAuthority(admin, policy), hmac_arn, cmk_arn)
    yield handle
    for client in handle.clients:
        client.close()


def add_users(db_url: str, service: KeyService, *user_ids: str) -> None:
    with psycopg.connect(db_url) as conn:
        for user_id in user_ids:
            conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (user_id, f"{user_id}@example.com"))
            service.provision(conn, user_id)


def forget(db_url: str, service: KeyService, user_id: str) -> bool:
    with psycopg.connect(db_url) as conn:
        return service.forget(conn, user_id)


def wrapped_dek(db_url: str, user_id: str) -> bytes | None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute('SELECT kms_encrypted_dek FROM public."user" WHERE id = %s', (user_id,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def pg_dump_public(url: str, path: Path) -> None:
    """A backup: the public schema (users with their kms_encrypted_dek, chats), as tests/dumps.py takes it."""
    subprocess.run(["pg_dump", "--schema=public", "--no-owner", "--no-privileges", "--format=custom",
                    f"--file={path}", url], check=True, capture_output=True, timeout=300)


def pg_restore_fresh(pg_server: Server, path: Path) -> tuple[str, str]:
    listing = subprocess.run(["pg_restore", "--list", str(path)], check=True, capture_output=True, text=True).stdout
    kept = path.with_suffix(".list")
    kept.write_text(restore_list(listing))
    name = pg_server.create_database("owui_crypto_t_restored")
    url = pg_server.url(name)
    subprocess.run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", f"--use-list={kept}",
                    f"--dbname={url}", str(path)], check=True, capture_output=True, timeout=300)
    return name, url


# -- the end-to-end promise ------------------------------------------------------------------------------------


def test_a_backup_restored_after_the_deletion_no_longer_opens_the_users_key(site, db_url, pg_server, tmp_path):
    service = site.service(db_url)
    add_users(db_url, service, "alice", "bob")
    alice_dek, bob_dek = service.dek("alice"), service.dek("bob")
    backup = tmp_path / "before-deletion.dump"
    pg_dump_public(db_url, backup)  # the backup holds both users' kms_encrypted_dek

    assert forget(db_url, service, "alice") is True
    assert wrapped_dek(db_url, "alice") is None

    name, restored = pg_restore_fresh(pg_server, backup)
    try:
        alice_blob = wrapped_dek(restored, "alice")
        assert alice_blob is not None  # the backup still holds the deleted user's wrapped DEK
        # The application, as the task role, in a new process (an empty key cache) on the restored database.
        after_restore = site.service(restored)
        assert after_restore.dek("bob") == bob_dek
        with pytest.raises(CannotUnwrap):
            after_restore.dek("alice")
        # The routine sync on the restored database reports alice (a key, no grant) and does not grant her.
        assert after_restore.erasure is not None
        with psycopg.connect(restored, autocommit=True) as conn:
            report = after_restore.erasure.sync(conn)
        assert (report.missing, report.stray, report.clean) == (["alice"], [], False)
        with pytest.raises(CannotUnwrap):
            site.service(restored).dek("alice")
        # The only refusals of the whole run, the two attempts on alice's blob: every other call the code made
        # with erasure on, the policy (or a grant) allowed.
        assert site.authority.denied == 2 * [("Decrypt", f"AccessDeniedException: {TASK_ROLE} is not authorized "
                                                         f"to perform kms:Decrypt on {site.cmk_arn}")]

        # The hole this closes: with the default policy (erasure off) the same blob opens for the task role,
        # and the ciphertext itself is intact (moto, which authorizes nothing, opens it).
        before_the_feature = site.service(restored, site.authority_for(), erasure="off", erasure_grantee=None)
        assert before_the_feature.dek("alice") == alice_dek
        unguarded = site.kms_server.admin.decrypt(
            CiphertextBlob=alice_blob, KeyId=site.settings.application_cmk_id,
            EncryptionContext={"purpose": "user-dek-encryption", "application": "open-webui", "user_id": "alice"})
        assert unguarded["Plaintext"] == alice_dek.reveal()
    finally:
        pg_server.drop_database(name)


# -- provisioning and forgetting -------------------------------------------------------------------------------


def test_provision_makes_one_narrow_grant_per_user_and_forget_retires_it(site, db_url):
    service = site.service(db_url)
    add_users(db_url, service, "carol", "dave")
    by_name = {g["Name"]: g for g in site.grants()}
    assert set(by_name) == {"owui-crypto-user-carol", "owui-crypto-user-dave"}
    carol = by_name["owui-crypto-user-carol"]
    assert carol["GranteePrincipal"] == carol["RetiringPrincipal"] == TASK_ROLE
    assert carol["Operations"] == ["Decrypt", "RetireGrant"]
    assert carol["Constraints"] == {"EncryptionContextEquals": {
        "purpose": "user-dek-encryption", "application": "open-webui", "user_id": "carol"}}

    # carol's grant opens carol's blob only: dave's blob under carol's context is refused by KMS's context
    # check, and no grant lets the role Decrypt under a context of its choosing.
    with pytest.raises(CannotUnwrap):
        service.kms.unwrap_dek("carol", wrapped_dek(db_url, "dave"))
    with pytest.raises(CannotUnwrap):
        service.kms.unwrap_dek("nobody", wrapped_dek(db_url, "dave"))

    assert forget(db_url, service, "carol") is True
    assert [g["Name"] for g in site.grants()] == ["owui-crypto-user-dave"]
    assert forget(db_url, service, "carol") is False  # again: nothing left, no error
    assert service.kms.metrics()["calls"]["RetireGrant"] == 1


def test_a_new_grant_works_at_once_through_its_token(site, db_url):
    site.authority.delay_grants = True
    here = site.service(db_url)
    add_users(db_url, here, "erin")
    # The process that provisioned erin shows the grant's token, so her first request does not wait.
    assert here.dek("erin") is not None
    # Another process has no token: until the grant has spread (up to ~5 minutes in KMS) it is refused.
    elsewhere = site.service(db_url)
    with pytest.raises(CannotUnwrap):
        elsewhere.dek("erin")
    site.authority.propagate()
    assert elsewhere.dek("erin") == here.dek("erin")


def test_a_failed_retirement_is_loud_rolls_back_and_the_startup_reconcile_retries_it(site, db_url, caplog):
    service = site.service(db_url)
    add_users(db_url, service, "frank")
    site.authority.refuse.add("RetireGrant")

    # The operator's path (owui-crypto forget): the error reaches the caller, the transaction rolls back.
    with caplog.at_level(logging.ERROR, logger="owui_crypto.erasure"), pytest.raises(ErasureIncomplete) as info:
        forget(db_url, service, "frank")
    assert "nothing was forgotten" in str(info.value)
    assert any("a KMS grant could not be retired" in r.getMessage() for r in caplog.records)
    assert wrapped_dek(db_url, "frank") is not None  # still registered: a later run can try again

    # Open WebUI's path: the user row is gone first; the failed forget is logged and leaves the registration,
    # which the next start's reconcile finds (an orphan) and forgets again, retiring the grant this time.
    with psycopg.connect(db_url) as conn:
        conn.execute('DELETE FROM public."user" WHERE id = %s', ("frank",))
    assert UserLifecycle(service).forget("frank") is False
    assert [g["Name"] for g in site.grants()] == ["owui-crypto-user-frank"]
    site.authority.refuse.clear()
    assert reconcile(service).forgotten == ("frank",)
    assert site.grants() == []


def test_forget_looks_again_when_its_index_is_stale(site, db_url):
    first, second = site.service(db_url), site.service(db_url)
    add_users(db_url, first, "gina", "hal")
    assert first.erasure is not None
    first.erasure.retire("hal")  # any retire builds the index: gina -> her first grant
    # Meanwhile another process forgets gina, and she signs up again there: a new grant, which the first
    # process's index does not know.
    forget(db_url, second, "gina")
    with psycopg.connect(db_url) as conn:
        conn.execute('DELETE FROM public."user" WHERE id = %s', ("gina",))
    add_users(db_url, second, "gina")
    (newer,) = [g["GrantId"] for g in site.grants() if g["Name"] == "owui-crypto-user-gina"]

    assert forget(db_url, first, "gina") is True
    assert newer not in {g["GrantId"] for g in site.grants()}


def test_beyond_the_grants_quota_provisioning_fails_and_writes_nothing(site, db_url):
    site.authority.grant_quota = 1
    service = site.service(db_url)
    add_users(db_url, service, "ivan")
    with pytest.raises(GrantQuotaExceeded, match="quota of grants"):
        add_users(db_url, service, "judy")
    assert wrapped_dek(db_url, "judy") is None  # the whole sign-up rolled back
    with psycopg.connect(db_url) as conn:
        assert conn.execute('SELECT count(*) FROM public."user" WHERE id = %s', ("judy",)).fetchone() == (0,)


# -- switching an existing deployment on, and finding what is off -----------------------------------------------


def test_sync_grants_existing_users_retires_strays_and_reports_foreign_grants(site, db_url, monkeypatch, capsys):
    # Users provisioned before the switch (erasure off, the default policy: the role Decrypts on its own).
    before = site.service(db_url, erasure="off", erasure_grantee=None)
    assert before.erasure is None
    add_users(db_url, before, "kim", "lee")
    assert site.grants() == []

    service = site.service(db_url)
    assert service.erasure is not None
    service.erasure.grant("ghost")  # a grant whose user never committed (or whose forget never retired it)
    foreign = site.kms_server.admin.create_grant(KeyId=site.cmk_arn, GranteePrincipal=OTHER_ROLE,
                                                 Operations=["Decrypt"])["GrantId"]

    with psycopg.connect(db_url, autocommit=True) as conn:
        seen = service.erasure.sync(conn, apply=False)
        assert (seen.missing, seen.foreign, seen.users, seen.grants) == (["kim", "lee"], [foreign], 2, 2)
        assert len(seen.stray) == 1 and not seen.clean
        routine = service.erasure.sync(conn)  # retires the stray grant; grants nobody without being asked
        assert (routine.missing, routine.failed, len(site.grants())) == (["kim", "lee"], [], 1)
        done = service.erasure.sync(conn, grant_missing=True)  # switching on: once
    assert done.failed == [] and done.granted_missing
    assert sorted(g["Name"] for g in site.grants() if g["GrantId"] != foreign) == [
        "owui-crypto-user-kim", "owui-crypto-user-lee"]
    assert service.dek("kim") == before.dek("kim")  # through kim's new grant: the role has no Decrypt of its own

    # The command: check reports what is off and exits 1 while a foreign grant can open user DEKs.
    environ = {"AWS_REGION": REGION, "KMS_HMAC_KEY_ID": site.kms_server.hmac_key_id,
               "KMS_APPLICATION_CMK_ID": site.settings.application_cmk_id, "OWUI_CRYPTO_ERASURE": "grants",
               "OWUI_CRYPTO_ERASURE_GRANTEE": TASK_ROLE, "DATABASE_URL": db_url}
    assert erasure.main(["check"], environ) == 1
    out = capsys.readouterr().out
    assert f"grant {foreign} was not made by owui-crypto" in out and "0 grants missing" in out
    site.kms_server.admin.revoke_grant(KeyId=site.cmk_arn, GrantId=foreign)
    assert erasure.main(["check"], environ) == 0
    assert erasure.main(["sync"], environ) == 0
    with pytest.raises(SystemExit):
        erasure.main(["check", "--grant-missing"], environ)
    assert erasure.main(["check"], {**environ, "OWUI_CRYPTO_ERASURE": "off", "OWUI_CRYPTO_ERASURE_GRANTEE": ""}) == 1


# -- the policy ------------------------------------------------------------------------------------------------


HMAC = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-1111-4111-8111-111111111111"
CMK = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/22222222-2222-4222-8222-222222222222"
USER = {"purpose": "user-dek-encryption", "application": "open-webui", "user_id": "u1"}


def _create_grant(context: dict[str, str] | None = None, *, kind: str = "EncryptionContextEquals",
                  grantee: str = TASK_ROLE, retiring: str | None = TASK_ROLE,
                  operations: tuple[str, ...] = ("Decrypt", "RetireGrant")) -> dict[str, Any]:
    request = {**_context_keys(USER if context is None else context), "kms:GranteePrincipal": grantee,
               "kms:RetiringPrincipal": retiring, "kms:GrantOperations": list(operations)}
    if (USER if context is None else context):
        request["kms:GrantConstraintType"] = kind
    return request


def test_the_erasure_policy_leaves_the_role_no_decrypt_of_its_own_and_only_narrow_grants():
    policy = iam.task_role_policy(HMAC, CMK, erasure="grants", grantee_arn=TASK_ROLE)
    default = iam.task_role_policy(HMAC, CMK)
    assert default == iam.task_role_policy(HMAC, CMK, erasure="off")  # off: exactly the policy of before
    assert policy_allows(default, "kms:Decrypt", CMK, _context_keys(USER))
    assert not policy_allows(policy, "kms:Decrypt", CMK, _context_keys(USER))
    assert policy_allows(policy, "kms:GenerateDataKey", CMK, _context_keys(USER))
    assert policy_allows(policy, "kms:Decrypt", CMK, _context_keys(
        {"purpose": "deployment-key", "application": "open-webui", "name": "share"}))  # the share key: unchanged
    assert policy_allows(policy, "kms:CreateGrant", CMK, _create_grant())
    assert policy_allows(policy, "kms:ListGrants", CMK, {})
    refused = {
        "to another principal": _create_grant(grantee=OTHER_ROLE),
        "retirable by another principal": _create_grant(retiring=OTHER_ROLE),
        "with no retiring principal": _create_grant(retiring=None),
        "a subset constraint": _create_grant(kind="EncryptionContextSubset"),
        "no constraint": _create_grant({}),
        "a context without the user": _create_grant({"purpose": "user-dek-encryption", "application": "open-webui"}),
        "a context with one more field": _create_grant({**USER, "tenant": "x"}),
        "the deployment keys' context": _create_grant({"purpose": "deployment-key", "application": "open-webui",
                                                       "name": "share"}),
        "ReEncryptFrom": _create_grant(operations=("Decrypt", "ReEncryptFrom")),
        "CreateGrant": _create_grant(operations=("Decrypt", "CreateGrant")),
        "no operation": {**_create_grant(), "kms:GrantOperations": None},
    }
    for what, request in refused.items():
        assert not policy_allows(policy, "kms:CreateGrant", CMK, request), what
    assert not policy_allows(policy, "kms:CreateGrant", HMAC, _create_grant())
    assert not policy_allows(policy, "kms:RevokeGrant", CMK, {})


def test_iam_policy_prints_the_erasure_policy_from_the_environment(capsys, monkeypatch):
    from app_adapter import cli

    monkeypatch.setenv("OWUI_CRYPTO_ERASURE", "grants")
    monkeypatch.setenv("OWUI_CRYPTO_ERASURE_GRANTEE", TASK_ROLE)
    monkeypatch.delenv(iam.DB_SECRET_ENV, raising=False)
    assert cli.main(["iam-policy", "--hmac-key-arn", HMAC, "--cmk-arn", CMK]) == 0
    assert json.loads(capsys.readouterr().out) == iam.task_role_policy(HMAC, CMK, erasure="grants",
                                                                       grantee_arn=TASK_ROLE)
    monkeypatch.delenv("OWUI_CRYPTO_ERASURE_GRANTEE")
    assert cli.main(["iam-policy", "--hmac-key-arn", HMAC, "--cmk-arn", CMK]) == 1
    assert "OWUI_CRYPTO_ERASURE_GRANTEE" in capsys.readouterr().err


@pytest.mark.parametrize(("environ", "message"), [
    ({"OWUI_CRYPTO_ERASURE": "grants"}, "needs OWUI_CRYPTO_ERASURE_GRANTEE"),
    ({"OWUI_CRYPTO_ERASURE": "keys"}, "expected one of off, grants"),
    ({"OWUI_CRYPTO_ERASURE_GRANTEE": TASK_ROLE}, "OWUI_CRYPTO_ERASURE is off"),
    ({"OWUI_CRYPTO_ERASURE": "grants",
      "OWUI_CRYPTO_ERASURE_GRANTEE": f"arn:aws:sts::{ACCOUNT}:assumed-role/owui-TaskRole-ABC/task"},
     "not an IAM role ARN"),
])
def test_erasure_settings_are_checked(environ, message):
    with pytest.raises(ConfigError, match=message):
        erasure_settings(environ)
    assert erasure_settings({}) == ("off", None)
    assert erasure_settings({"OWUI_CRYPTO_ERASURE": "GRANTS", "OWUI_CRYPTO_ERASURE_GRANTEE": TASK_ROLE}) == (
        "grants", TASK_ROLE)


def test_erasure_is_off_by_default_and_changes_no_call(kms_server, db_url):
    settings = Settings.from_env({"AWS_REGION": REGION, "KMS_HMAC_KEY_ID": kms_server.hmac_key_id,
                                  "KMS_APPLICATION_CMK_ID": kms_server.cmk_id})
    assert (settings.erasure, settings.erasure_grantee) == ("off", None)
    service = KeyService(settings, db_url)
    try:
        assert service.erasure is None
        add_users(db_url, service, "max")
        service.dek("max")
        forget(db_url, service, "max")
        assert set(service.kms.metrics()["calls"]) == {"GenerateDataKey", "Decrypt"}
    finally:
        service.kms.close()


# -- throughput (measured, never asserted) -----------------------------------------------------------------------


def test_throughput_of_provision_and_forget(site, db_url, capsys):
    """Rows/s of provision and forget: erasure off; on, against moto alone; on, through the emulated
    authorization (whose ListGrants per decision adds its own cost). OWUI_CRYPTO_BENCH_USERS: users (50)."""
    count = int(os.environ.get("OWUI_CRYPTO_BENCH_USERS", "50"))
    results = {}
    for mode in ("off", "grants, moto alone", "grants, emulated authorization"):
        if mode == "off":
            service = site.service(db_url, site.authority_for(), erasure="off", erasure_grantee=None)
        else:
            service = site.service(db_url, authorize=mode.endswith("authorization"))
        users = [f"{mode[:6]}-{len(results)}-{i}" for i in range(count)]
        started = time.perf_counter()
        add_users(db_url, service, *users)
        provisioned = time.perf_counter() - started
        started = time.perf_counter()
        with psycopg.connect(db_url) as conn:
            for user_id in users:
                service.forget(conn, user_id)
        forgotten = time.perf_counter() - started
        latency = service.kms.metrics().get("latency", {})
        results[mode] = (count / provisioned, count / forgotten,
                         {op: f"{v['count']} x {1000 * v['sum'] / v['count']:.1f} ms" for op, v in latency.items()})
    assert site.grants() == []
    with capsys.disabled():
        for mode, (provision_rate, forget_rate, calls) in results.items():
            print(f"\nerasure={mode}: {count} users, provision {provision_rate:.0f} rows/s, "
                  f"forget {forget_rate:.0f} rows/s, KMS calls (count x mean latency) {calls}")


def test_grant_names_fit_kms():
    # CreateGrant's Name: 1 to 256 of [a-zA-Z0-9:/_-]; user ids are UUID-shaped (the KMS HMAC of the email).
    name = erasure.grant_name("0d3c6a38-1f1e-8a4b-9c2d-5e6f7a8b9c0d")
    assert re.fullmatch(r"[a-zA-Z0-9:/_-]{1,256}", name) and name.endswith("0d3c6a38-1f1e-8a4b-9c2d-5e6f7a8b9c0d")
