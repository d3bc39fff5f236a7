"""The least-privilege IAM policy of the role that runs owui-crypto (the ECS task role).

It allows exactly the KMS calls :mod:`app_adapter.kms` makes, on the two keys
it makes them on, with the encryption contexts it sends:

* ``kms:DescribeKey`` on both keys (``check_keys``, run at every start);
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
* optionally ``secretsmanager:GetSecretValue`` on one database secret, for a
  role that fetches the secret itself. owui-crypto never calls Secrets
  Manager: on ECS the task definition's ``secrets`` are fetched by the task
  *execution* role, so ``deploy/owui-crypto.yaml`` gives the task role no
  Secrets Manager access at all.

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
from collections.abc import Mapping
from typing import Any

from app_adapter.errors import ConfigError

__all__ = [
    "DB_SECRET_ENV",
    "DESCRIPTION",
    "policy_from_environment",
    "policy_json",
    "task_role_policy",
]

#: Environment variable naming the database secret's ARN (optional).
DB_SECRET_ENV = "OWUI_CRYPTO_DB_SECRET_ARN"

#: The ``owui-crypto iam-policy --help`` text.
DESCRIPTION = """\
Print the least-privilege IAM policy (JSON) for the role that runs owui-crypto,
e.g. the ECS task role: kms:DescribeKey on both keys, kms:GenerateMac on the
HMAC key, and on the application CMK only the operations owui-crypto calls,
only with its own encryption context (application=open-webui).

The keys must be given as key ARNs (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID):
IAM authorizes KMS calls on the key, not on an alias. Find a key's ARN with
  aws kms describe-key --key-id alias/NAME --query KeyMetadata.Arn --output text

deploy/owui-crypto.yaml gives its task role exactly this document."""

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


def task_role_policy(hmac_key_arn: str, cmk_arn: str, db_secret_arn: str | None = None) -> dict[str, Any]:
    """The policy document for ``hmac_key_arn`` and ``cmk_arn`` (both key ARNs).

    ``db_secret_arn`` adds ``secretsmanager:GetSecretValue`` on that secret.
    Raises :class:`ConfigError` on an alias or anything else than a key ARN.
    """
    hmac_key_arn = _key_arn(hmac_key_arn, "the HMAC key (--hmac-key-arn, KMS_HMAC_KEY_ID)")
    cmk_arn = _key_arn(cmk_arn, "the application CMK (--cmk-arn, KMS_APPLICATION_CMK_ID)")
    statements: list[dict[str, Any]] = [
        {"Sid": "DescribeKeys", "Effect": "Allow", "Action": "kms:DescribeKey", "Resource": [hmac_key_arn, cmk_arn]},
        {"Sid": "UserIdsFromEmails", "Effect": "Allow", "Action": "kms:GenerateMac", "Resource": hmac_key_arn},
    ]
    from app_adapter import kms

    for sid, actions, builder in _CMK_USES:
        context = getattr(kms, builder)(_VARIES)
        statements.append(
            {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": cmk_arn,
             "Condition": _context_condition(context)}
        )
    if db_secret_arn is not None:
        if not _SECRET_ARN_RE.match(db_secret_arn):
            raise ConfigError(
                f"{DB_SECRET_ENV}={db_secret_arn!r} is not a Secrets Manager secret ARN; expected the full ARN, "
                "e.g. arn:aws:secretsmanager:us-east-1:111122223333:secret:owui/db-AbCdEf"
            )
        statements.append(
            {"Sid": "DatabaseSecret", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
             "Resource": db_secret_arn}
        )
    return {"Version": "2012-10-17", "Statement": statements}


def policy_from_environment(
    hmac_key_arn: str | None = None,
    cmk_arn: str | None = None,
    db_secret_arn: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """:func:`task_role_policy` with each missing argument read from the environment:
    ``KMS_HMAC_KEY_ID``, ``KMS_APPLICATION_CMK_ID``, :data:`DB_SECRET_ENV` (omitted if unset)."""
    hmac = hmac_key_arn or _env(environ, "KMS_HMAC_KEY_ID")
    cmk = cmk_arn or _env(environ, "KMS_APPLICATION_CMK_ID")
    if hmac is None:
        raise ConfigError("no HMAC key: pass --hmac-key-arn or set KMS_HMAC_KEY_ID to the key's ARN")
    if cmk is None:
        raise ConfigError("no application CMK: pass --cmk-arn or set KMS_APPLICATION_CMK_ID to the key's ARN")
    return task_role_policy(hmac, cmk, db_secret_arn or _env(environ, DB_SECRET_ENV))


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


def _context_condition(context: Mapping[str, str]) -> dict[str, Any]:
    fixed = {f"kms:EncryptionContext:{k}": v for k, v in sorted(context.items()) if v != _VARIES}
    varying = {f"kms:EncryptionContext:{k}": "false" for k, v in sorted(context.items()) if v == _VARIES}
    return {
        "StringEquals": fixed,
        "Null": varying,
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": sorted(context)},
    }
