"""The least-privilege IAM policy of the role that runs owui-crypto (the ECS task role).

It allows exactly the KMS calls :mod:`app_adapter.kms` makes, on the two keys
it makes them on, with the encryption contexts it sends:

* ``kms:DescribeKey`` on both keys and each accepted CMK (``check_keys``, run at every start);
* ``kms:GenerateMac`` on the HMAC key (user ids). No ``kms:MacAlgorithm``
  condition: each HMAC KeySpec supports exactly one algorithm and the
  Resource pins the key, so KMS already refuses every other algorithm; the
  condition would deny nothing and be one more place to update;
* on the application CMK, per kind of wrapped key, the operations the code
  calls for it, only with this application's encryption context:
  ``kms:GenerateDataKey`` and ``kms:Decrypt`` for user DEKs (new users,
  unwrapping), ``kms:Encrypt`` and ``kms:Decrypt`` for deployment keys (the
  share key). ``kms:Encrypt`` of a user DEK (``KmsKeys.wrap_dek``) and
  ``kms:ReEncrypt*`` are left out: no code path calls them (CMK rotation is
  transparent to old blobs and needs no ReEncrypt).
* on each accepted CMK (``OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS``, while moving to
  another CMK with ``owui-crypto rewrap``): ``kms:Decrypt`` only, with the same
  contexts. Nothing is wrapped under an accepted key, so it gets no
  GenerateDataKey or Encrypt; the key that becomes primary gets them when it
  becomes ``KMS_APPLICATION_CMK_ID``.
* optionally ``secretsmanager:GetSecretValue`` on one database secret
  (``OWUI_CRYPTO_DB_SECRET_ARN``), which owui-crypto then reads itself
  (:mod:`app_adapter.aurora`). Without it, on ECS the task definition's
  ``secrets`` are fetched by the task *execution* role, so
  ``deploy/owui-crypto.yaml`` gives the task role no Secrets Manager access for it;
* optionally ``secretsmanager:GetSecretValue`` on the owner's secret
  (``OWUI_CRYPTO_OWNER_DB_SECRET_ARN``: the master user's, which ``owui-crypto serve``
  reads at start to migrate and grant as the owner); the kit's task role has it;
* optionally ``rds-db:connect`` on one database user (``OWUI_CRYPTO_DB_USER_ARN``,
  ``arn:aws:rds-db:REGION:ACCOUNT:dbuser:RESOURCE_ID/USER``), for RDS IAM
  authentication (``OWUI_CRYPTO_DB_IAM_AUTH``): required then, refused with a
  wildcard (the role would connect as any user of any database).
* with ``OWUI_CRYPTO_ERASURE=grants`` (:mod:`app_adapter.erasure`): no ``kms:Decrypt``
  of user DEKs (each user's comes from a grant that forgetting the user retires),
  ``kms:CreateGrant`` only of such grants (to the role itself, ``Decrypt`` and
  ``RetireGrant`` only, ``EncryptionContextEquals`` a user context), and
  ``kms:ListGrants`` on the CMK. RetireGrant needs no policy: the grant names the
  role as its retiring principal.

The encryption-context conditions are derived from the context builders in
:mod:`app_adapter.kms`, so the policy follows the code: the fixed fields
(``application``, ``purpose``) must equal this application's values, the
per-key field (``user_id``, ``name``) must be present, and no other field
may appear (``ForAllValues`` on ``kms:EncryptionContextKeys``; it is true for
an empty set, which the ``StringEquals`` and ``Null`` conditions rule out).
A role holding this policy cannot have the CMK wrap or unwrap anything under
another application's or another purpose's context.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from app_adapter.config import ACCEPTED_CMKS_ENV, OWNER_SECRET_ENV, erasure_settings
from app_adapter.errors import ConfigError

__all__ = [
    "DB_SECRET_ENV",
    "DB_USER_ARN_ENV",
    "DESCRIPTION",
    "policy_from_environment",
    "policy_json",
    "secret_arn",
    "task_role_policy",
]

#: Environment variable naming the database secret's ARN (optional).
DB_SECRET_ENV = "OWUI_CRYPTO_DB_SECRET_ARN"
#: Environment variable naming the ``rds-db`` ARN of the database user, for IAM authentication (optional).
DB_USER_ARN_ENV = "OWUI_CRYPTO_DB_USER_ARN"

#: The ``owui-crypto iam-policy --help`` text.
DESCRIPTION = """\
Print the least-privilege IAM policy (JSON) for the role that runs owui-crypto,
e.g. the ECS task role: kms:DescribeKey on both keys, kms:GenerateMac on the
HMAC key, and on the application CMK only the operations owui-crypto calls,
only with its own encryption context (application=open-webui).

The keys must be given as key ARNs (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID):
IAM authorizes KMS calls on the key, not on an alias. Find a key's ARN with
  aws kms describe-key --key-id alias/NAME --query KeyMetadata.Arn --output text

deploy/owui-crypto.yaml gives its task role exactly this document, as printed with its task
definition's OWUI_CRYPTO_DB_IAM_AUTH=true, OWUI_CRYPTO_DB_USER_ARN (the application role) and
OWUI_CRYPTO_OWNER_DB_SECRET_ARN (the master user's secret).

With OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS (key ARNs, comma-separated; the CMKs the instances also unwrap with
while a rewrap moves keys between CMKs) it adds kms:DescribeKey and kms:Decrypt on each, with the same
encryption contexts, and nothing else.

With OWUI_CRYPTO_ERASURE=grants and OWUI_CRYPTO_ERASURE_GRANTEE=<the task role's ARN> in the environment
it prints the policy of erasure that reaches backups instead: no kms:Decrypt of user DEKs of the role's
own, kms:CreateGrant of per-user Decrypt grants to itself, kms:ListGrants. The CMK's key policy must then
give the task role the same statements (README, "Erasure that reaches backups").

With OWUI_CRYPTO_DB_SECRET_ARN it adds secretsmanager:GetSecretValue on that secret (owui-crypto reads it
itself), and likewise with OWUI_CRYPTO_OWNER_DB_SECRET_ARN (the owner's secret, which serve reads at
start); with OWUI_CRYPTO_DB_USER_ARN=arn:aws:rds-db:REGION:ACCOUNT:dbuser:RESOURCE_ID/USER, rds-db:connect
on that database user, which OWUI_CRYPTO_DB_IAM_AUTH=true requires (README, "Connecting to Aurora")."""

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_KEY_ARN_RE = re.compile(rf"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{{12}}:key/(?:{_UUID}|mrk-[0-9a-f]{{32}})$")
_ALIAS_RE = re.compile(r"^(?:alias/|arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:alias/)")
_SECRET_ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+$")

# Placeholder for the one context field that varies per wrapped key.
_VARIES = "\x00varies"

# (Sid, KMS operations, name of the context builder in kms.py), one statement
# each. By name: kms imports boto3, which every other CLI command would pay for.
_CMK_USES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("UserDataKeys", ("kms:Decrypt", "kms:GenerateDataKey"), "_user_context"),
    ("DeploymentKeys", ("kms:Decrypt", "kms:Encrypt"), "_deployment_context"),
)


def task_role_policy(hmac_key_arn: str, cmk_arn: str, db_secret_arn: str | None = None, *,
                     erasure: str = "off", grantee_arn: str | None = None,
                     db_user_arn: str | None = None, accepted_cmk_arns: Sequence[str] = (),
                     owner_db_secret_arn: str | None = None) -> dict[str, Any]:
    """The policy document for ``hmac_key_arn`` and ``cmk_arn`` (both key ARNs).

    ``accepted_cmk_arns`` (key ARNs) get DescribeKey and Decrypt only, under the same context conditions.
    ``db_secret_arn`` adds ``secretsmanager:GetSecretValue`` on that secret. ``erasure="grants"`` (with
    ``grantee_arn``, the role's own ARN) gives the policy of :mod:`app_adapter.erasure`. ``db_user_arn`` adds
    ``rds-db:connect`` on that database user (RDS IAM authentication). ``owner_db_secret_arn`` adds
    ``secretsmanager:GetSecretValue`` on the owner's secret.
    Raises :class:`ConfigError` on an alias or anything else than a key ARN.
    """
    erasure, grantee = erasure_settings({"OWUI_CRYPTO_ERASURE": erasure,
                                         "OWUI_CRYPTO_ERASURE_GRANTEE": grantee_arn or ""})
    hmac_key_arn = _key_arn(hmac_key_arn, "the HMAC key (--hmac-key-arn, KMS_HMAC_KEY_ID)")
    cmk_arn = _key_arn(cmk_arn, "the application CMK (--cmk-arn, KMS_APPLICATION_CMK_ID)")
    accepted: list[str] = []
    for given in accepted_cmk_arns:
        arn = _key_arn(given, f"an accepted CMK ({ACCEPTED_CMKS_ENV})")
        if arn != cmk_arn and arn not in accepted:
            accepted.append(arn)
    statements: list[dict[str, Any]] = [
        {"Sid": "DescribeKeys", "Effect": "Allow", "Action": "kms:DescribeKey",
         "Resource": [hmac_key_arn, cmk_arn, *accepted]},
        {"Sid": "UserIdsFromEmails", "Effect": "Allow", "Action": "kms:GenerateMac", "Resource": hmac_key_arn},
    ]
    from app_adapter import kms

    for sid, actions, builder in _CMK_USES:
        context = getattr(kms, builder)(_VARIES)
        allowed = [a for a in actions  # with erasure, each user's grant allows Decrypt instead
                   if not (erasure == "grants" and builder == "_user_context" and a == "kms:Decrypt")]
        statements.append(
            {"Sid": sid, "Effect": "Allow", "Action": allowed, "Resource": cmk_arn,
             "Condition": _context_condition(context)}
        )
        if accepted and "kms:Decrypt" in allowed:
            statements.append(
                {"Sid": f"Accepted{sid}", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": accepted,
                 "Condition": _context_condition(context)}
            )
    if grantee is not None:
        statements.extend(_grant_statements(cmk_arn, grantee))
    if db_secret_arn is not None:
        statements.append(
            {"Sid": "DatabaseSecret", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
             "Resource": secret_arn(db_secret_arn)}
        )
    if owner_db_secret_arn is not None:
        statements.append(
            {"Sid": "OwnerDatabaseSecret", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
             "Resource": secret_arn(owner_db_secret_arn, OWNER_SECRET_ENV)}
        )
    if db_user_arn is not None:
        statements.append(
            {"Sid": "DatabaseIamAuth", "Effect": "Allow", "Action": "rds-db:connect",
             "Resource": _db_user_arn(db_user_arn)}
        )
    return {"Version": "2012-10-17", "Statement": statements}


def secret_arn(value: str, name: str = DB_SECRET_ENV) -> str:
    """``value`` if it is a full Secrets Manager secret ARN, else :class:`ConfigError` naming the variable ``name``.
    A full ARN: it is both what owui-crypto reads and the policy's Resource, so the two cannot drift apart."""
    if not _SECRET_ARN_RE.match(value):
        raise ConfigError(
            f"{name}={value!r} is not a Secrets Manager secret ARN; expected the full ARN, "
            "e.g. arn:aws:secretsmanager:us-east-1:111122223333:secret:owui/db-AbCdEf"
        )
    return value


_DB_USER_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:rds-db:[a-z0-9-]+:\d{12}:dbuser:(?:cluster|db|prx)-[A-Za-z0-9]+/(?P<user>[^*?/\s]+)$")
_DB_USER_ARN_EXAMPLE = ("arn:aws:rds-db:REGION:ACCOUNT:dbuser:RESOURCE_ID/USER, e.g. "
                        "arn:aws:rds-db:eu-central-1:111122223333:dbuser:cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ/owui_app; "
                        "the cluster's resource id: aws rds describe-db-clusters --db-cluster-identifier ID "
                        "--query 'DBClusters[0].DbClusterResourceId' --output text")


def _db_user_arn(value: str) -> str:
    value = value.strip()
    if "*" in value or "?" in value:
        raise ConfigError(f"{DB_USER_ARN_ENV}={value!r} has a wildcard: the role could connect as other users or to "
                          f"other databases. Name one user of one cluster: {_DB_USER_ARN_EXAMPLE}")
    if not _DB_USER_ARN_RE.match(value):
        raise ConfigError(f"{DB_USER_ARN_ENV}={value!r} is not the rds-db ARN of a database user; expected "
                          f"{_DB_USER_ARN_EXAMPLE}")
    return value


def policy_from_environment(
    hmac_key_arn: str | None = None,
    cmk_arn: str | None = None,
    db_secret_arn: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """:func:`task_role_policy` with each missing argument read from the environment:
    ``KMS_HMAC_KEY_ID``, ``KMS_APPLICATION_CMK_ID``, :data:`DB_SECRET_ENV` (omitted if unset); the accepted CMKs
    from ``OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS``; the owner's secret from ``OWUI_CRYPTO_OWNER_DB_SECRET_ARN``."""
    hmac = hmac_key_arn or _env(environ, "KMS_HMAC_KEY_ID")
    cmk = cmk_arn or _env(environ, "KMS_APPLICATION_CMK_ID")
    if hmac is None:
        raise ConfigError("no HMAC key: pass --hmac-key-arn or set KMS_HMAC_KEY_ID to the key's ARN")
    if cmk is None:
        raise ConfigError("no application CMK: pass --cmk-arn or set KMS_APPLICATION_CMK_ID to the key's ARN")
    erasure, grantee = erasure_settings(environ)
    accepted = [item.strip() for item in (_env(environ, ACCEPTED_CMKS_ENV) or "").split(",") if item.strip()]
    return task_role_policy(hmac, cmk, db_secret_arn or _env(environ, DB_SECRET_ENV), erasure=erasure,
                            grantee_arn=grantee, db_user_arn=_db_user_from_environment(environ),
                            accepted_cmk_arns=accepted, owner_db_secret_arn=_env(environ, OWNER_SECRET_ENV))


def _db_user_from_environment(environ: Mapping[str, str]) -> str | None:
    """:data:`DB_USER_ARN_ENV`; required when IAM authentication is on, and for the user of ``DATABASE_URL``."""
    from app_adapter.aurora import IAM_AUTH_ENV, iam_auth_requested

    arn = _env(environ, DB_USER_ARN_ENV)
    if arn is None:
        if iam_auth_requested(environ):
            raise ConfigError(f"IAM authentication is on ({IAM_AUTH_ENV}): the role needs rds-db:connect on the "
                              f"database user. Set {DB_USER_ARN_ENV}={_DB_USER_ARN_EXAMPLE}")
        return None
    match = _DB_USER_ARN_RE.match(_db_user_arn(arn))
    assert match is not None
    user = _database_url_user(environ)
    if user is not None and user != match.group("user"):
        raise ConfigError(f"{DB_USER_ARN_ENV} is for database user {match.group('user')!r} but DATABASE_URL "
                          f"connects as {user!r}: the token would be refused")
    return arn.strip()


def _database_url_user(environ: Mapping[str, str]) -> str | None:
    url = _env(environ, "DATABASE_URL")
    if url is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).username
    except ArgumentError:
        return None  # not ours to judge here; serve and the other commands say what is wrong with it


def policy_json(policy: Mapping[str, Any]) -> str:
    """``policy`` as printed: 2-space indent, keys in the order built (stable)."""
    return json.dumps(policy, indent=2)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _key_arn(value: str, what: str) -> str:
    value = value.strip()
    if _KEY_ARN_RE.match(value):
        return value
    hint = (
        f"; find it with: aws kms describe-key --key-id {value} --query KeyMetadata.Arn --output text"
    )
    if _ALIAS_RE.match(value):
        raise ConfigError(
            f"{what} is the alias {value!r}: a key ARN is required (IAM authorizes KMS calls on the key, "
            f"not on its alias){hint}"
        )
    raise ConfigError(f"{what} is {value!r}, not a key ARN (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID){hint}")


def _grant_statements(cmk_arn: str, grantee_arn: str) -> list[dict[str, Any]]:
    """CreateGrant of exactly the grants app_adapter.erasure makes, and ListGrants to find them.

    For CreateGrant, ``kms:EncryptionContext:*`` and ``kms:EncryptionContextKeys`` test the grant's
    constraint, so the same user-context condition applies; the grant must go to this role, be retirable by
    it, and allow only Decrypt and RetireGrant under an EncryptionContextEquals constraint.
    """
    from app_adapter import erasure, kms

    condition = _context_condition(kms._user_context(_VARIES))
    condition["StringEquals"].update({
        "kms:GrantConstraintType": "EncryptionContextEquals",
        "kms:GranteePrincipal": grantee_arn,
        "kms:RetiringPrincipal": grantee_arn,
    })
    condition["Null"]["kms:GrantOperations"] = "false"
    condition["ForAllValues:StringEquals"]["kms:GrantOperations"] = list(erasure.GRANT_OPERATIONS)
    return [
        {"Sid": "UserKeyGrants", "Effect": "Allow", "Action": "kms:CreateGrant", "Resource": cmk_arn,
         "Condition": condition},
        {"Sid": "FindUserKeyGrants", "Effect": "Allow", "Action": "kms:ListGrants", "Resource": cmk_arn},
    ]


def _context_condition(context: Mapping[str, str]) -> dict[str, Any]:
    fixed = {f"kms:EncryptionContext:{k}": v for k, v in sorted(context.items()) if v != _VARIES}
    varying = {f"kms:EncryptionContext:{k}": "false" for k, v in sorted(context.items()) if v == _VARIES}
    return {
        "StringEquals": fixed,
        "Null": varying,
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": sorted(context)},
    }
