"""The AWS deployment kit: deploy/owui-crypto.yaml, deploy/app-role.sql and ``owui-crypto iam-policy``.

No AWS account is involved: the template is linted with cfn-lint, parsed with
cfn-lint's own loader (CloudFormation's ``!GetAtt``/``!Sub`` tags are not plain
YAML), and its references are resolved to fixed fake ARNs. The task definition's
environment goes through ``owui-crypto serve``'s own start-up checks (moto as
Secrets Manager), and app-role.sql runs on the real PostgreSQL.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from cfnlint.decode import decode
from psycopg import sql

from app_adapter import aurora, cli, devdb, iam, kms
from app_adapter.config import Settings
from app_adapter.kms import KmsKeys
from app_adapter.owui import compat, launcher
from tests.roles import Roles, as_role

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "owui-crypto.yaml"
APP_ROLE_SQL = ROOT / "deploy" / "app-role.sql"

REGION = "eu-central-1"
ACCOUNT = "111122223333"
HMAC_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-1111-4111-8111-111111111111"
CMK_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/22222222-2222-4222-8222-222222222222"
TASK_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/owui-TaskRole-ABC"
DB_SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:DatabaseSecret-AbCdEf"
WEBUI_SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:WebuiSecretKey-GhIjKl"

REFS = {
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::Partition": "aws",
    "AWS::StackName": "owui",
    "DatabaseSecret": DB_SECRET_ARN,
    "WebuiSecretKey": WEBUI_SECRET_ARN,
    "DatabaseMasterUsername": "owui_admin",
    "ApplicationDatabaseUsername": "owui_app",
    "DatabaseName": "openwebui",
    "LogGroup": "/ecs/owui/owui-crypto",
    "TaskRole": "owui-TaskRole-ABC",
    "ImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/owui-crypto:0.12.4",
}
GETATTS = {
    ("HmacKey", "Arn"): HMAC_ARN,
    ("ApplicationCmk", "Arn"): CMK_ARN,
    ("TaskRole", "Arn"): TASK_ROLE_ARN,
    ("ExecutionRole", "Arn"): f"arn:aws:iam::{ACCOUNT}:role/owui-ExecutionRole-DEF",
    ("DatabaseCluster", "Endpoint.Address"): "owui.cluster-abc.eu-central-1.rds.amazonaws.com",
    ("DatabaseCluster", "Endpoint.Port"): "5432",
    ("DatabaseCluster", "DBClusterResourceId"): "cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ",
}
ENDPOINT = "owui.cluster-abc.eu-central-1.rds.amazonaws.com"
APP_USER_ARN = f"arn:aws:rds-db:{REGION}:{ACCOUNT}:dbuser:cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ/owui_app"

# Every KMS operation that uses a key for cryptography; the account's own statement must grant none.
CRYPTO_ACTIONS = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext",
                  "kms:GenerateDataKeyPair", "kms:GenerateMac", "kms:VerifyMac", "kms:ReEncryptFrom",
                  "kms:ReEncryptTo", "kms:Sign", "kms:Verify", "kms:DeriveSharedSecret")


def _resolve(node: Any) -> Any:
    """The template fragment with Ref, Fn::GetAtt and Fn::Sub replaced by the fake values above."""
    if isinstance(node, dict):
        if len(node) == 1:
            ((name, value),) = node.items()
            if name == "Ref":
                return REFS[value]
            if name == "Fn::GetAtt":
                return GETATTS[tuple(value) if isinstance(value, list) else tuple(value.split(".", 1))]
            if name == "Fn::Sub":
                return re.sub(r"\$\{([^}]+)\}", lambda m: _lookup(m.group(1)), value)
        return {k: _resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v) for v in node]
    return node


def _lookup(name: str) -> str:
    if name in REFS:
        return REFS[name]
    resource, _, attribute = name.partition(".")
    return GETATTS[(resource, attribute)]


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    decoded, matches = decode(str(TEMPLATE))
    assert not matches, [str(m) for m in matches]
    return decoded


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return template["Resources"]


def _printed_policy(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert cli.main(["iam-policy", *args]) == 0
    out = capsys.readouterr().out
    assert out == json.dumps(json.loads(out), indent=2) + "\n"  # 2-space indent, nothing else printed
    return json.loads(out)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _container(resources: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The task's (environment, secrets), resolved."""
    (container,) = _resolve(resources["TaskDefinition"]["Properties"]["ContainerDefinitions"])
    return ({e["Name"]: e["Value"] for e in container["Environment"]},
            {s["Name"]: s["ValueFrom"] for s in container["Secrets"]})


# -- the template -------------------------------------------------------------------------------------------


def test_template_passes_cfn_lint():
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    assert cfn_lint.exists(), f"{cfn_lint} is missing: install the test extra (pip install -e '.[test]')"
    result = subprocess.run([str(cfn_lint), str(TEMPLATE)], check=False, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")  # no error, no warning


def test_task_role_policy_is_what_iam_policy_prints(template, resources, capsys, monkeypatch):
    """iam-policy given the task definition's own database variables, and the application role's rds-db ARN
    (the stack's ApplicationDatabaseUserArn output)."""
    for name in (iam.DB_SECRET_ENV, "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS", "OWUI_CRYPTO_ERASURE"):
        monkeypatch.delenv(name, raising=False)
    environment, _ = _container(resources)
    for name in ("DATABASE_URL", aurora.IAM_AUTH_ENV, launcher.OWNER_SECRET_ENV):
        monkeypatch.setenv(name, environment[name])
    user_arn = _resolve(template["Outputs"]["ApplicationDatabaseUserArn"]["Value"])
    assert user_arn == APP_USER_ARN
    monkeypatch.setenv(iam.DB_USER_ARN_ENV, user_arn)
    printed = _printed_policy(capsys, "--hmac-key-arn", HMAC_ARN, "--cmk-arn", CMK_ARN)
    assert [s["Sid"] for s in printed["Statement"]][-2:] == ["OwnerDatabaseSecret", "DatabaseIamAuth"]
    assert printed["Statement"][-2]["Resource"] == DB_SECRET_ARN and printed["Statement"][-1]["Resource"] == user_arn
    policy = resources["TaskRolePolicy"]
    assert policy["Type"] == "AWS::IAM::RolePolicy" and "Condition" not in policy
    assert policy["Properties"]["RoleName"] == {"Ref": "TaskRole"}
    assert _resolve(policy["Properties"]["PolicyDocument"]) == printed
    # The role has nothing else of its own; the only other policy on it is the optional ECS Exec one.
    assert set(resources["TaskRole"]["Properties"]) == {"Description", "AssumeRolePolicyDocument"}
    others = {name for name, r in resources.items()
              if name != "TaskRolePolicy" and r["Properties"].get("RoleName") == {"Ref": "TaskRole"}}
    assert others == {"TaskRoleExecuteCommandPolicy"}
    assert resources["TaskRoleExecuteCommandPolicy"]["Condition"] == "ExecuteCommand"


@pytest.mark.parametrize(("key", "arn"), [("HmacKey", HMAC_ARN), ("ApplicationCmk", CMK_ARN)])
def test_key_policies_give_the_task_role_the_same_statements(resources, key, arn):
    statements = _resolve(resources[key]["Properties"]["KeyPolicy"])["Statement"]
    task_role = [s for s in statements if s["Principal"] == {"AWS": TASK_ROLE_ARN}]
    expected = [{**{k: v for k, v in s.items() if k != "Resource"}, "Principal": {"AWS": TASK_ROLE_ARN},
                 "Resource": "*"}  # the key policies: KMS statements only
                for s in iam.task_role_policy(HMAC_ARN, CMK_ARN)["Statement"] if arn in _as_list(s["Resource"])]
    assert task_role == expected
    (admin,) = [s for s in statements if s not in task_role]
    assert admin["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    granted = [a for a in CRYPTO_ACTIONS if any(fnmatch.fnmatchcase(a, p) for p in _as_list(admin["Action"]))]
    assert granted == [], "the account's statement must administer the key, not use it"
    assert resources[key]["DeletionPolicy"] == resources[key]["UpdateReplacePolicy"] == "Retain"


def test_keys_are_the_ones_owui_crypto_expects(resources):
    hmac = resources["HmacKey"]["Properties"]
    assert (hmac["KeySpec"], hmac["KeyUsage"]) == ("HMAC_512", "GENERATE_VERIFY_MAC")
    cmk = resources["ApplicationCmk"]["Properties"]
    assert (cmk["KeySpec"], cmk["KeyUsage"], cmk["EnableKeyRotation"]) == ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", True)


def test_parameter_group_keeps_chat_text_out_of_the_log(resources):
    group = resources["DatabaseClusterParameterGroup"]["Properties"]
    assert group["Family"] == "aurora-postgresql15"
    assert group["Parameters"] == {
        "log_parameter_max_length": "0",
        "log_parameter_max_length_on_error": "0",
        "log_statement": "none",
        "log_min_duration_statement": "-1",
        "log_error_verbosity": "terse",
        "rds.force_ssl": "1",
    }
    cluster = resources["DatabaseCluster"]["Properties"]
    assert cluster["Engine"] == "aurora-postgresql"
    assert cluster["DBClusterParameterGroupName"] == {"Ref": "DatabaseClusterParameterGroup"}


def test_task_definition_passes_owui_cryptos_own_checks(resources):
    environment, task_secrets = _container(resources)
    assert environment["KMS_HMAC_KEY_ID"] == HMAC_ARN and environment["KMS_APPLICATION_CMK_ID"] == CMK_ARN
    # No database password in the task definition: the owner's is read by serve, the application role's is a token.
    assert task_secrets == {"WEBUI_SECRET_KEY": WEBUI_SECRET_ARN}
    assert "PGPASSWORD" not in environment and not [v for v in environment.values() if ":password" in v]
    # What Settings and `owui-crypto serve` would say about this environment.
    settings = Settings.from_env(environment)
    assert (settings.aws_region, settings.kms_mac_algorithm) == (REGION, "HMAC_SHA_512")
    url = launcher.normalise_database_url(environment["DATABASE_URL"])
    assert url == f"postgresql+psycopg://owui_app@{ENDPOINT}:5432/openwebui?sslmode=require"
    assert not set(environment) & {*launcher._URL_PARTS, "DATABASE_SCHEMA", "DATABASE_PASSWORD"}
    cluster = resources["DatabaseCluster"]["Properties"]
    assert cluster["EnableIAMDatabaseAuthentication"] is True
    # Only the execution role reads the task definition's secret.
    (statement,) = _resolve(resources["ExecutionRole"]["Properties"]["Policies"])[0]["PolicyDocument"]["Statement"]
    assert (statement["Action"], statement["Resource"]) == ("secretsmanager:GetSecretValue", WEBUI_SECRET_ARN)
    # One-off tasks override the command (README, "Deploy to AWS"): the entrypoint is the bare CLI.
    (container,) = resources["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert container["EntryPoint"] == ["owui-crypto"] and container["Command"][0] == "serve"


@pytest.fixture
def clean_serve_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(compat, "installed_version", lambda: "0.12.4")
    monkeypatch.setattr(compat, "installed_from_wheel", lambda: True)
    for name in (iam.DB_SECRET_ENV, aurora.IAM_AUTH_ENV, aurora.CA_BUNDLE_ENV, "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    aurora.reset()
    yield
    aurora.reset()


def test_serve_starts_with_two_roles_from_the_task_definition(resources, kms_server, clean_serve_environment,
                                                              monkeypatch):
    """The task's environment through serve's plan: the owner from the master secret (as SecretTargetAttachment
    leaves it: no dbname) completed by OWUI_CRYPTO_OWNER_DATABASE_URL, Open WebUI as owui_app with IAM tokens."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", kms_server.endpoint_url)
    password = secrets.token_hex(16)
    client = boto3.session.Session(region_name=os.environ["AWS_REGION"]).client("secretsmanager")
    try:
        arn = client.create_secret(Name="owui-master-" + secrets.token_hex(4), SecretString=json.dumps(
            {"username": "owui_admin", "password": password, "engine": "aurora-postgresql", "host": ENDPOINT,
             "port": 5432, "dbClusterIdentifier": "owui"}))["ARN"]
    finally:
        client.close()
    environment, _ = _container(resources)
    environ = {**environment, launcher.OWNER_SECRET_ENV: arn, "WEBUI_SECRET_KEY": "s" * 32}
    plan = launcher.plan(environ)
    assert plan.owner_url == f"postgresql+psycopg://owui_admin:{password}@{ENDPOINT}:5432/openwebui?sslmode=require"
    assert plan.database_url == f"postgresql+psycopg://owui_app@{ENDPOINT}:5432/openwebui?sslmode=require"
    assert launcher.OWNER_URL_ENV not in environ and launcher.OWNER_SECRET_ENV not in environ
    assert not [v for v in environ.values() if password in v] and password not in repr(plan)
    assert aurora.describe() == (f"database owui_app@{ENDPOINT}:5432: a fresh RDS IAM token per connection "
                                 f"(region {REGION}); sslmode=require")
    assert aurora._password_for({"host": ENDPOINT, "port": "5432", "user": "owui_admin"}) is None


# -- deploy/app-role.sql -----------------------------------------------------------------------------------------


@pytest.fixture
def stand_in_roles(pg_server: devdb.Server) -> Iterator[tuple[str, str]]:
    """(application role, stand-in for Aurora's rds_iam): cluster-wide, so random names, dropped afterwards."""
    suffix = secrets.token_hex(4)
    app, rds_iam = f"owui_crypto_t_kitapp_{suffix}", f"owui_crypto_t_rdsiam_{suffix}"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(rds_iam)))
    try:
        yield app, rds_iam
    finally:
        with pg_server.connect() as admin:
            for role in (app, rds_iam):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_app_role_sql_makes_a_role_serve_accepts_and_grants(pg_server: devdb.Server, roles: Roles,
                                                            owned_template: str, stand_in_roles: tuple[str, str]):
    app, rds_iam = stand_in_roles
    database = pg_server.create_database("owui_crypto_t_kit", template=owned_template, owner=roles.owner)
    try:
        url = pg_server.url(database)
        for _ in range(2):  # the second run changes nothing
            result = subprocess.run(["psql", url, "-X", "-q", "-v", f"app_role={app}", "-v", f"iam_role={rds_iam}",
                                     "-f", str(APP_ROLE_SQL)], check=False, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, result.stderr
        with pg_server.connect() as admin:
            row = admin.execute("SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolpassword IS NULL, "
                                "ARRAY(SELECT b.rolname::text FROM pg_auth_members m"
                                "        JOIN pg_roles b ON b.oid = m.roleid WHERE m.member = r.oid)"
                                "  FROM pg_authid r WHERE rolname = %s", (app,)).fetchone()
        assert row == (True, False, False, False, True, [rds_iam])
        app_url, owner_url = as_role(url, app), as_role(url, roles.owner)
        assert launcher.checked_application_role(app_url, owner_url) == app
        assert launcher.grant_application_role(owner_url, app) > 0
        assert launcher.checked_application_role(app_url, owner_url) == app
        with psycopg.connect(app_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT title FROM public.chat")
    finally:
        pg_server.drop_database(database)


# -- owui-crypto iam-policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["alias/owui-user-ids", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/owui-user-ids"])
def test_iam_policy_refuses_an_alias(alias):
    result = subprocess.run([sys.executable, "-m", "app_adapter.cli", "iam-policy", "--cmk-arn", CMK_ARN],
                            check=False, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "KMS_HMAC_KEY_ID": alias})
    assert result.returncode == 1 and result.stdout == ""
    assert "a key ARN is required" in result.stderr and alias in result.stderr
    assert "aws kms describe-key" in result.stderr


def test_iam_policy_refuses_a_bare_key_id_and_a_missing_key(monkeypatch, capsys):
    monkeypatch.delenv("KMS_APPLICATION_CMK_ID", raising=False)
    assert cli.main(["iam-policy", "--hmac-key-arn", HMAC_ARN, "--cmk-arn", CMK_ARN.rsplit("/", 1)[1]]) == 1
    assert "not a key ARN" in capsys.readouterr().err
    assert cli.main(["iam-policy", "--hmac-key-arn", HMAC_ARN]) == 1
    assert "KMS_APPLICATION_CMK_ID" in capsys.readouterr().err


def test_iam_policy_reads_the_environment_and_adds_the_secret_only_when_named(monkeypatch, capsys):
    monkeypatch.setenv("KMS_HMAC_KEY_ID", HMAC_ARN)
    monkeypatch.setenv("KMS_APPLICATION_CMK_ID", CMK_ARN)
    monkeypatch.delenv(iam.DB_SECRET_ENV, raising=False)
    without = _printed_policy(capsys)
    assert without == iam.task_role_policy(HMAC_ARN, CMK_ARN)
    assert not any(s["Action"] == "secretsmanager:GetSecretValue" for s in without["Statement"])
    monkeypatch.setenv(iam.DB_SECRET_ENV, DB_SECRET_ARN)
    with_secret = _printed_policy(capsys)
    assert with_secret["Statement"][:-1] == without["Statement"]
    assert with_secret["Statement"][-1] == {"Sid": "DatabaseSecret", "Effect": "Allow",
                                            "Action": "secretsmanager:GetSecretValue", "Resource": DB_SECRET_ARN}
    monkeypatch.setenv(iam.DB_SECRET_ENV, "owui/db")
    assert cli.main(["iam-policy"]) == 1 and "secret ARN" in capsys.readouterr().err


# -- the policy against the calls kms.py really makes -------------------------------------------------------


def _allows(policy: dict[str, Any], action: str, resource: str, context: dict[str, str]) -> bool:
    """IAM's answer for one request, for the condition operators the policy uses (an unknown one fails)."""
    for statement in policy["Statement"]:
        conditions = statement.get("Condition", {}).items()
        if (action in _as_list(statement["Action"]) and resource in _as_list(statement["Resource"])
                and all(_condition_holds(op, body, context) for op, body in conditions)):
            return True
    return False


def _condition_holds(operator: str, body: dict[str, Any], context: dict[str, str]) -> bool:
    prefix = "kms:EncryptionContext:"
    for key, wanted in body.items():
        if operator == "StringEquals":
            assert key.startswith(prefix)
            if context.get(key.removeprefix(prefix)) not in _as_list(wanted):
                return False
        elif operator == "Null":
            assert key.startswith(prefix) and wanted in ("true", "false")
            if (key.removeprefix(prefix) not in context) != (wanted == "true"):
                return False
        elif operator == "ForAllValues:StringEquals":
            assert key == "kms:EncryptionContextKeys"
            if not set(context) <= set(wanted):
                return False
        else:
            raise AssertionError(f"the test does not know the operator {operator}")
    return True


class _RecordingClient:
    """Answers like KMS and records (action, key, encryption context) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def _note(self, action: str, params: dict[str, Any]) -> None:
        self.calls.append((action, params["KeyId"], dict(params.get("EncryptionContext", {}))))

    def describe_key(self, **params: Any) -> dict[str, Any]:
        self._note("kms:DescribeKey", params)
        if params["KeyId"] == HMAC_ARN:
            meta = {"KeyUsage": "GENERATE_VERIFY_MAC", "KeySpec": "HMAC_512"}
        else:
            meta = {"KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT"}
        return {"KeyMetadata": {**meta, "Arn": params["KeyId"], "KeyState": "Enabled", "Enabled": True}}

    def generate_mac(self, **params: Any) -> dict[str, Any]:
        self._note("kms:GenerateMac", params)
        return {"Mac": bytes(64)}

    def generate_data_key(self, **params: Any) -> dict[str, Any]:
        self._note("kms:GenerateDataKey", params)
        return {"Plaintext": bytes(32), "CiphertextBlob": b"wrapped"}

    def encrypt(self, **params: Any) -> dict[str, Any]:
        self._note("kms:Encrypt", params)
        return {"CiphertextBlob": b"wrapped"}

    def decrypt(self, **params: Any) -> dict[str, Any]:
        self._note("kms:Decrypt", params)
        return {"Plaintext": bytes(32)}

    def close(self) -> None:
        pass


def test_policy_allows_every_call_the_application_makes_and_no_other_context():
    client = _RecordingClient()
    keys = KmsKeys(Settings(aws_region=REGION, hmac_key_id=HMAC_ARN, application_cmk_id=CMK_ARN), client=client)
    keys.check_keys()
    user = keys.user_id("alice@example.com")
    _, wrapped = keys.new_dek(user)
    keys.unwrap_dek(user, wrapped)
    keys.unwrap_deployment_key("share", keys.wrap_deployment_key("share", bytes(32)))
    policy = iam.task_role_policy(HMAC_ARN, CMK_ARN)
    for action, key, context in client.calls:
        assert _allows(policy, action, key, context), (action, key, context)
    assert {action for action, _, _ in client.calls} == {
        a for s in policy["Statement"] for a in _as_list(s["Action"])
    } == {f"kms:{operation}" for operation in kms._SNAKE_CASE}

    user_context = {"purpose": "user-dek-encryption", "application": "open-webui", "user_id": user}
    refused = [
        ("kms:Decrypt", CMK_ARN, {**user_context, "application": "another-app"}),
        ("kms:Decrypt", CMK_ARN, {**user_context, "purpose": "something-else"}),
        ("kms:Decrypt", CMK_ARN, {**user_context, "tenant": "x"}),
        ("kms:Decrypt", CMK_ARN, {"purpose": "user-dek-encryption", "application": "open-webui"}),
        ("kms:Decrypt", CMK_ARN, {}),
        ("kms:GenerateDataKey", CMK_ARN, {"purpose": "deployment-key", "application": "open-webui", "name": "x"}),
        ("kms:Encrypt", CMK_ARN, user_context),  # KmsKeys.wrap_dek: no code path calls it (below)
        ("kms:Decrypt", HMAC_ARN, user_context),
        ("kms:GenerateMac", CMK_ARN, {}),
        ("kms:ReEncryptFrom", CMK_ARN, user_context),
    ]
    for request in refused:
        assert not _allows(policy, *request), request


def test_no_code_path_encrypts_a_user_dek():
    """The policy leaves out kms:Encrypt for user DEKs because nothing calls KmsKeys.wrap_dek. If this fails,
    add kms:Encrypt to the UserDataKeys statement in app_adapter/iam.py and in deploy/owui-crypto.yaml."""
    callers = [str(path.relative_to(ROOT)) for path in (ROOT / "app_adapter").rglob("*.py")
               if path.name != "kms.py" and re.search(r"(?<!un)wrap_dek\(", path.read_text(encoding="utf-8"))]
    assert callers == []
