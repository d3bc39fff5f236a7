"""``owui-crypto doctor``: everything an operator should check after deploying, in one run.

Why: a deployment can look healthy (Open WebUI serves, chats open) while
something owui-crypto relies on is wrong -- a CMK scheduled for deletion, a
task role without ``kms:Decrypt`` for a new user's context, a server that logs
bind parameters, a connection without TLS, the service running as the role
that owns owui-crypto's functions. Each of those is checked elsewhere or only
documented; ``doctor`` asks them all, with the same ``DATABASE_URL`` and KMS
settings as the service, and says for each what to do.

Every item is PASS, WARN (works, but weaker than it could be; or not
checkable from this role) or FAIL (a promise of SECURITY.md or the service
itself is broken). The exit code is 0 only without a FAIL. One item failing,
even with an unexpected error, never hides the others.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import psycopg

from app_adapter import serverchecks, userkeys
from app_adapter.config import OWNER_URL_ENV, Settings, two_roles
from app_adapter.errors import OwuiCryptoError
from app_adapter.kms import KmsKeys

__all__ = ["Finding", "Report", "Status", "diagnose", "tls_finding"]

#: Hosts whose traffic stays on this machine: no TLS there is a WARN, not a FAIL.
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})
_SHOWN_IDS = 10


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """One checked item. ``check`` is a stable id for machines (``--json``)."""

    check: str
    status: Status
    message: str
    action: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status is not Status.FAIL for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        return {s.value: sum(f.status is s for f in self.findings) for s in Status}

    def text(self) -> str:
        lines = []
        for f in self.findings:
            lines.append(f"{f.status.value}  {f.check}: {f.message}")
            if f.action:
                lines.append(f"      what to do: {f.action}")
        c = self.counts()
        lines.append(f"owui-crypto doctor: {c['PASS']} pass, {c['WARN']} warn, {c['FAIL']} fail")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps({"ok": self.ok, "counts": self.counts(),
                           "findings": [{**asdict(f), "status": f.status.value} for f in self.findings]}, indent=2)


@dataclass
class _Probe:
    """What the checks share: one autocommit connection (a failed query spoils nothing) and one KMS client."""

    dsn: str
    settings: Settings | None
    kms: KmsKeys | None
    conn: psycopg.Connection[Any] | None = None
    installed: bool = False
    role: str = ""
    superuser: bool = False
    owner: bool = False  # the role owns (or may act as the owner of) owui-crypto's functions
    accepted_arns: tuple[str, ...] = ()  # the accepted CMKs, by ARN (kms.keys)
    opened_by: set[str] = field(default_factory=set)  # ARNs of the keys that opened a sampled blob (keys.sample)


Check = Callable[[_Probe], list[Finding]]


def diagnose(dsn: str, *, settings: Settings | None = None, environ: Mapping[str, str] = os.environ,
             kms: KmsKeys | None = None) -> Report:
    """Run every check against the database at ``dsn`` (libpq URL) and KMS.

    ``settings`` default to the environment; a ConfigError there is reported
    as a FAIL and the database checks still run. ``kms`` replaces the client
    (tests); otherwise one is made and closed here.
    """
    report = Report()
    if settings is None:
        try:
            settings = Settings.from_env(environ)
        except OwuiCryptoError as exc:
            report.findings.append(Finding("kms.settings", Status.FAIL, str(exc),
                                           "set the KMS variables as for owui-crypto serve (README, Configuration)"))
    own_kms = kms is None and settings is not None
    if own_kms and settings is not None:
        kms = KmsKeys(settings)
    probe = _Probe(dsn, settings, kms)
    try:
        if kms is not None:
            kms_checks: tuple[Check, ...] = (_kms_keys, _kms_round_trip, _kms_mac)
            for check in kms_checks:
                report.findings += _guarded(check, probe)
        report.findings += _connect(probe)
        if probe.conn is not None:
            for check in _DATABASE_CHECKS:
                report.findings += _guarded(check, probe)
            report.findings.append(serve_roles(probe.role, probe.owner or probe.superuser, environ))
    finally:
        if probe.conn is not None:
            probe.conn.close()
        if own_kms and kms is not None:
            kms.close()
    return report


def _guarded(check: Check, probe: _Probe) -> list[Finding]:
    """The check's findings; an error becomes a finding of its own instead of ending the run."""
    name = check.__name__.lstrip("_").replace("_", ".", 1).replace("_", "-")
    try:
        return check(probe)
    except psycopg.errors.InsufficientPrivilege as exc:
        return [Finding(name, Status.WARN, f"not checked: role {probe.role} may not look ({_first_line(exc)})",
                        "run owui-crypto doctor as owui-crypto's owner too (the role that ran owui-crypto upgrade)")]
    except (OwuiCryptoError, psycopg.Error) as exc:
        return [Finding(name, Status.FAIL, f"{type(exc).__name__}: {_first_line(exc)}")]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- KMS --------------------------------------------------------------------------


def _kms_keys(p: _Probe) -> list[Finding]:
    """Exist, Enabled, right usage and spec, by DescribeKey: a running service notices a key disabled or
    scheduled for deletion only at its next start or cache miss, and emulators never."""
    assert p.kms is not None
    try:
        found = p.kms.check_keys()
    except OwuiCryptoError as exc:
        return [Finding("kms.keys", Status.FAIL, str(exc))]
    p.accepted_arns = found.accepted_arns
    accepted = f", and accepted CMK(s) {', '.join(found.accepted_arns)}," if found.accepted_arns else ""
    return [Finding("kms.keys", Status.PASS,
                    f"HMAC key {found.hmac_key_arn} ({found.hmac_key_spec}, {found.mac_algorithm}) and application "
                    f"CMK {found.cmk_arn}{accepted} exist, are Enabled and of the right usage and spec")]


def _kms_round_trip(p: _Probe) -> list[Finding]:
    """What every sign-up and every cache miss does, for a throw-away user id: the permission (and the
    encryption-context condition of the IAM policy) is proven, not read from a policy document."""
    assert p.kms is not None
    throwaway = f"owui-crypto-doctor-{secrets.token_hex(8)}"
    try:
        dek, blob = p.kms.new_dek(throwaway)
        same = p.kms.unwrap_dek(throwaway, blob) == dek
    except OwuiCryptoError as exc:
        return [Finding("kms.round-trip", Status.FAIL, str(exc),
                        "the role needs kms:GenerateDataKey and kms:Decrypt on the application CMK with this "
                        "application's encryption context: attach what owui-crypto iam-policy prints")]
    if not same:
        return [Finding("kms.round-trip", Status.FAIL, "Decrypt gave back another key than GenerateDataKey made",
                        "KMS_APPLICATION_CMK_ID or the endpoint (AWS_ENDPOINT_URL_KMS) is not what it should be")]
    return [Finding("kms.round-trip", Status.PASS,
                    "GenerateDataKey then Decrypt, with this application's encryption context, gave the same key")]


def _kms_mac(p: _Probe) -> list[Finding]:
    assert p.kms is not None
    try:
        p.kms.user_id("owui-crypto-doctor@example.invalid")
    except OwuiCryptoError as exc:
        return [Finding("kms.mac", Status.FAIL, str(exc),
                        "the role needs kms:GenerateMac on the HMAC key (owui-crypto iam-policy)")]
    return [Finding("kms.mac", Status.PASS, f"GenerateMac works ({p.kms.mac_algorithm()}): user ids can be made")]


# -- the database -----------------------------------------------------------------


def _connect(p: _Probe) -> list[Finding]:
    try:
        p.conn = psycopg.connect(p.dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        return [Finding("db.connect", Status.FAIL, f"cannot connect: {_first_line(exc)}",
                        "check DATABASE_URL (or --database-url), PGPASSWORD and the network path")]
    row = p.conn.execute(
        """SELECT current_user, r.rolsuper, to_regnamespace('owui_crypto') IS NOT NULL,
                  EXISTS (SELECT 1 FROM pg_catalog.pg_proc f JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
                           WHERE n.nspname = 'owui_crypto' AND pg_catalog.pg_has_role(f.proowner, 'USAGE'))
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user""").fetchone()
    assert row is not None
    p.role, p.superuser, p.installed, p.owner = row
    return [Finding("db.connect", Status.PASS, f"connected to {p.conn.info.dbname} as {p.role}")]


def _db_schema(p: _Probe) -> list[Finding]:
    from alembic.script import ScriptDirectory

    from app_adapter import migrate

    if not p.installed:
        return [Finding("db.schema", Status.FAIL, "owui-crypto is not installed in this database (no schema "
                        "owui_crypto)", "owui-crypto upgrade, as the database owner")]
    conn = _conn(p)
    heads = set(ScriptDirectory.from_config(migrate.alembic_config(p.dsn)).get_heads())
    table = conn.execute("SELECT to_regclass('owui_crypto_alembic_version') IS NOT NULL").fetchone()
    current = {r[0] for r in conn.execute("SELECT version_num FROM owui_crypto_alembic_version")} \
        if table and table[0] else set()
    if current != heads:
        at = ", ".join(sorted(current)) or "no known revision"
        return [Finding("db.schema", Status.FAIL, f"owui-crypto's schema is at {at}; this release's is "
                        f"{', '.join(sorted(heads))}",
                        "owui-crypto upgrade, as the database owner")]
    return [Finding("db.schema", Status.PASS, f"owui-crypto's schema is installed, at {', '.join(sorted(heads))}")]


def _role_superuser(p: _Probe) -> list[Finding]:
    if p.superuser:
        return [Finding("role.superuser", Status.FAIL,
                        f"{p.role} is a superuser: SQL injected into Open WebUI would run as one, and a superuser "
                        "can read the key any backend holds (SECURITY.md, assumptions)",
                        "connect Open WebUI as the database owner (not a superuser; the master user on Aurora is "
                        "not one) or, better, as a role given owui-crypto grant")]
    return [Finding("role.superuser", Status.PASS, f"{p.role} is not a superuser")]


def _role_owner(p: _Probe) -> list[Finding]:
    if p.owner:
        return [Finding("role.owner", Status.WARN,
                        f"{p.role} owns (or may act as the owner of) owui-crypto's functions: if Open WebUI "
                        f"connects as {p.role}, SQL injected "
                        "into it runs as their owner and could replace them or plant code in public, then read the "
                        "keys of the users whose transactions follow (SECURITY.md, residual 'One role for "
                        "everything')",
                        "run the service as a role given owui-crypto grant ROLE and keep this role for migrations; "
                        "if this is only the migrating role, this item is expected")]
    return [Finding("role.owner", Status.PASS,
                    f"{p.role} does not own owui-crypto's functions: it acts only through owui-crypto grant")]


def serve_roles(role: str, owns: bool, environ: Mapping[str, str]) -> Finding:
    """How owui-crypto serve would connect Open WebUI with this environment: with the owner's URL apart (two roles),
    or as DATABASE_URL's role for everything (the single-role residual)."""
    if two_roles(environ):
        return Finding("serve.roles", Status.PASS, f"two roles: owui-crypto serve migrates as {OWNER_URL_ENV}'s "
                       f"role and serves Open WebUI as {role}, which it refuses if {role} could act as the owner")
    if owns:
        return Finding("serve.roles", Status.WARN,
                       f"one role: {OWNER_URL_ENV} is not set, so owui-crypto serve runs Open WebUI as {role}, which "
                       "owns owui-crypto's functions: SQL injected into Open WebUI could replace them (SECURITY.md, "
                       "'One role for everything')",
                       f"set {OWNER_URL_ENV} to this role's URL and DATABASE_URL to a login role of its own "
                       "(README, Two roles)")
    return Finding("serve.roles", Status.WARN,
                   f"{OWNER_URL_ENV} is not set and {role} does not own owui-crypto's functions: owui-crypto serve "
                   "could not migrate as it", f"set {OWNER_URL_ENV} to the owner's URL (README, Two roles)")


def _role_temp(p: _Probe) -> list[Finding]:
    conn = _conn(p)
    row = conn.execute("SELECT has_database_privilege(current_database(), 'TEMPORARY')").fetchone()
    temp = bool(row and row[0])
    if p.owner:
        if temp:
            return [Finding("role.temp", Status.PASS, f"{p.role} (the owner) has TEMP, which activate() needs for "
                            "its transport entries")]
        return [Finding("role.temp", Status.FAIL, f"{p.role} owns owui-crypto but has no TEMP on the database: "
                        "activate() keeps transport entries in a temporary table and will fail",
                        f"GRANT TEMPORARY ON DATABASE {conn.info.dbname} TO {p.role}")]
    if temp:
        return [Finding("role.temp", Status.WARN,
                        f"{p.role} may create temporary objects: a session could plant pg_temp.owui_crypto_transport "
                        "and make activation refuse on that session (OC004; fail closed, but a denial of service)",
                        f"owui-crypto grant {p.role} (revokes TEMP from it and from PUBLIC)")]
    return [Finding("role.temp", Status.PASS, f"{p.role} may not create temporary objects")]


def _role_create(p: _Probe) -> list[Finding]:
    """This role on the keyed path; serverchecks.path_creators covers the granted roles and PUBLIC."""
    conn = _conn(p)
    schemas = [r[0] for r in conn.execute(
        "SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY(%s)"
        " AND has_schema_privilege(n.oid, 'CREATE') ORDER BY 1", (list(serverchecks.KEYED_PATH_SCHEMAS),))]
    if not schemas:
        return [Finding("role.create", Status.PASS, f"{p.role} may not create objects on the keyed path "
                        f"({', '.join(serverchecks.KEYED_PATH_SCHEMAS)})")]
    where = ", ".join(schemas)
    if p.owner:
        return [Finding("role.create", Status.WARN, f"{p.role} (the owner) may create objects in {where}, which every"
                        " keyed transaction searches: part of the single-role residual (see role.owner)",
                        "run the service as a role given owui-crypto grant")]
    return [Finding("role.create", Status.FAIL,
                    f"{p.role} may create objects in {where}, which every keyed transaction searches: a function or "
                    "operator planted there runs inside other users' transactions and can read their key",
                    f"owui-crypto grant {p.role}, or REVOKE CREATE ON SCHEMA {schemas[0]} FROM {p.role}")]


def _path_creators(p: _Probe) -> list[Finding]:
    problems = serverchecks.path_creators(_conn(p))
    if not problems:
        return [Finding("path.creators", Status.PASS, "no granted role and not PUBLIC may create objects on the "
                        "keyed path")]
    return [Finding("path.creators", Status.FAIL, line) for line in problems]


def _role_key_ring(p: _Probe) -> list[Finding]:
    row = _conn(p).execute(
        """SELECT has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'owui_crypto' AND c.relname = 'user_key'""").fetchone()
    reads, writes = (bool(row[0]), bool(row[1])) if row else (False, False)
    if p.owner:
        return [Finding("role.key-ring", Status.PASS, f"{p.role} (the owner) reads and writes owui_crypto.user_key,"
                        " as it must")]
    if writes:
        return [Finding("role.key-ring", Status.FAIL,
                        f"{p.role} may write owui_crypto.user_key directly: it could replace or remove users' key "
                        "registrations instead of going through register_user_key()",
                        f"REVOKE ALL ON owui_crypto.user_key FROM {p.role}, then owui-crypto grant {p.role}")]
    if reads:
        return [Finding("role.key-ring", Status.WARN,
                        f"{p.role} may read owui_crypto.user_key (fingerprints only, no keys; more than "
                        "owui-crypto grant gives)", f"REVOKE SELECT ON owui_crypto.user_key FROM {p.role}")]
    return [Finding("role.key-ring", Status.PASS, f"{p.role} may not read or write owui_crypto.user_key")]


def _schema_drift(p: _Probe) -> list[Finding]:
    rows = _conn(p).execute("SELECT table_name, problem FROM owui_crypto.drift()").fetchall()
    if not rows:
        return [Finding("schema.drift", Status.PASS, "views, triggers and definer functions match the tables")]
    return [Finding("schema.drift", Status.FAIL, f"{table or 'owui_crypto'}: {problem}",
                    "owui-crypto refresh (after Open WebUI changed a table); if it stays, owui-crypto upgrade")
            for table, problem in rows]


def _data_plaintext(p: _Probe) -> list[Finding]:
    rows = _conn(p).execute("SELECT * FROM owui_crypto.unsealed_counts() WHERE unsealed > 0").fetchall()
    if not rows:
        return [Finding("data.plaintext", Status.PASS, "no plaintext left in protected columns")]
    return [Finding("data.plaintext", Status.FAIL, f"{table}.{column} holds {n} plaintext values written before "
                    "owui-crypto was installed", "owui-crypto seal-existing (provision their owners first)")
            for table, column, n in rows]


def _server_logging(p: _Probe) -> list[Finding]:
    problems = serverchecks.leaking_settings(_conn(p))
    if not problems:
        return [Finding("server.logging", Status.PASS, "no server setting puts chat text or keys into the log")]
    # serverchecks words a setting it could not read this way; such an item is unknown, not broken.
    return [Finding("server.logging", Status.WARN if line.startswith("cannot read ") else Status.FAIL, line)
            for line in problems]


def tls_finding(ssl_in_use: bool, sslmode: str, host: str) -> Finding:
    """TLS of the connection, as the server sees it, and what libpq was told to check.

    Without TLS the transport entry activate() returns crosses the network in
    clear, and with it every key wrapped under it: FAIL off this machine.
    sslmode below verify-full encrypts but does not check who answers.
    """
    local = host in LOCAL_HOSTS or host.startswith("/")
    if not ssl_in_use:
        if local:
            return Finding("db.tls", Status.WARN, f"the connection to {host or 'the local socket'} is not encrypted "
                           "(it stays on this machine)", "use sslmode=verify-full wherever the database is remote")
        return Finding("db.tls", Status.FAIL,
                       f"the connection to {host} is not encrypted: chat text and the transport keys activate() "
                       "returns cross the network in clear, and with them every user key sent under them",
                       "require TLS on the server (rds.force_ssl = 1 on RDS/Aurora) and connect with "
                       "sslmode=verify-full&sslrootcert=<the RDS CA bundle>")
    if sslmode != "verify-full":
        return Finding("db.tls", Status.WARN,
                       f"encrypted, but sslmode={sslmode} does not check the server's certificate and name: "
                       "whoever can redirect the connection could read it",
                       "sslmode=verify-full with sslrootcert=<the server's CA bundle> (for RDS/Aurora, AWS's "
                       "global-bundle.pem) in DATABASE_URL")
    return Finding("db.tls", Status.PASS, "encrypted, and sslmode=verify-full checks the server's certificate")


def _db_tls(p: _Probe) -> list[Finding]:
    conn = _conn(p)
    row = conn.execute("SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    options = {o.keyword: o.val for o in conn.pgconn.info}
    sslmode = (options.get(b"sslmode") or b"prefer").decode()
    return [tls_finding(bool(row and row[0]), sslmode, conn.info.host)]


def _keys_share(p: _Probe) -> list[Finding]:
    """Registered, and opens through KMS exactly as the adapter opens it (KeyService.share_key): a share key
    wrapped under another CMK (a rewrap not finished) or registered by someone else shows up here."""
    from app_adapter.keys import SHARE_KEY, KeyService

    conn = _conn(p)
    row = conn.execute("SELECT kms_key_id FROM owui_crypto.deployment_key_wrapped(%s) WHERE kms_wrapped IS NOT NULL",
                       (SHARE_KEY,)).fetchone()
    if row is None:
        return [Finding("keys.share", Status.WARN, "no share key is registered yet: shared chats cannot be sealed, "
                        "and until one is, any role allowed to call register_deployment_key could register its own",
                        "start owui-crypto serve once (it registers the share key) before granting other roles")]
    if p.settings is None or p.kms is None:
        return [Finding("keys.share", Status.WARN, "registered, but not opened: no KMS settings")]
    key = KeyService(p.settings, p.dsn, kms=p.kms).share_key()
    try:
        stored = conn.execute("SELECT fingerprint FROM owui_crypto.deployment_key WHERE name = %s",
                              (SHARE_KEY,)).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return [Finding("keys.share", Status.PASS, f"registered (wrapped under {row[0]}) and opens through KMS")]
    if stored is None or bytes(stored[0]) != userkeys.fingerprint(key):
        return [Finding("keys.share", Status.FAIL, "the share key opens through KMS, but it is not the key "
                        "registered in owui_crypto.deployment_key: activate() will refuse it",
                        "find out who changed owui_crypto.deployment_key; restore it from a backup")]
    return [Finding("keys.share", Status.PASS, f"registered (wrapped under {row[0]}), opens through KMS, and matches "
                    "its registered fingerprint")]


def _keys_users(p: _Probe) -> list[Finding]:
    conn = _conn(p)
    missing = [r[0] for r in conn.execute(
        'SELECT id FROM public."user" WHERE kms_encrypted_dek IS NULL ORDER BY id LIMIT %s', (_SHOWN_IDS + 1,))]
    row = conn.execute('SELECT count(*), count(*) FILTER (WHERE kms_encrypted_dek IS NULL) FROM public."user"'
                       ).fetchone()
    total, without = (int(row[0]), int(row[1])) if row else (0, 0)
    if not without:
        return [Finding("keys.users", Status.PASS, f"all {total} users have a KMS-wrapped key")]
    shown = ", ".join(missing[:_SHOWN_IDS]) + (", ..." if without > _SHOWN_IDS else "")
    findings = [Finding("keys.users", Status.FAIL,
                        f"{without} of {total} users have no KMS-wrapped key ({shown}): they can neither read nor "
                        "write chats", "owui-crypto provision USER_ID for each, or restart owui-crypto serve (it "
                        "provisions every user without a key)")]
    lost = _registered_without_kms_copy(conn)
    if lost:
        findings.append(Finding("keys.users", Status.FAIL,
                                f"{lost} of them have a registered key but no KMS copy of it: what is sealed under "
                                "it opens only with a user-held copy, if they have one",
                                "restore their kms_encrypted_dek from a backup; provisioning refuses (OC020) "
                                "until the registration is forgotten"))
    return findings


def _keys_sample(p: _Probe) -> list[Finding]:
    """The oldest and the newest user's KMS copy, opened as the adapter opens them (each Decrypt naming its key):
    after a rewrap, one of them fails if the new key is neither KMS_APPLICATION_CMK_ID nor accepted, or if the
    old one was dropped before the rewrap finished."""
    from app_adapter.errors import CannotUnwrap

    if p.kms is None or p.settings is None:
        return [Finding("keys.sample", Status.WARN, "users' keys not opened: no KMS settings")]
    rows = _conn(p).execute(
        """(SELECT id, kms_encrypted_dek FROM public."user" WHERE kms_encrypted_dek IS NOT NULL
             ORDER BY created_at, id LIMIT 1)
           UNION
           (SELECT id, kms_encrypted_dek FROM public."user" WHERE kms_encrypted_dek IS NOT NULL
             ORDER BY created_at DESC NULLS LAST, id DESC LIMIT 1)""").fetchall()
    if not rows:
        return [Finding("keys.sample", Status.PASS, "no user has a key yet")]
    refused = []
    opened_by: set[str] = set()
    for user_id, blob in rows:
        try:
            opened_by.add(p.kms.unwrap_dek_with_key(user_id, bytes(blob))[1])
        except CannotUnwrap:
            refused.append(user_id)
    p.opened_by |= opened_by
    allowed = f"KMS_APPLICATION_CMK_ID={p.settings.application_cmk_id}"
    if p.settings.accepted_cmk_ids:
        allowed += f" or OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS={','.join(p.settings.accepted_cmk_ids)}"
    if refused:
        return [Finding("keys.sample", Status.FAIL,
                        f"the KMS copy of user(s) {', '.join(refused)} does not open under {allowed}: it was wrapped "
                        "under another CMK",
                        "if a rewrap was started, accept its old key again (OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS) and "
                        "finish it (owui-crypto rewrap --to THIS_CMK --from OLD_CMK); otherwise "
                        "KMS_APPLICATION_CMK_ID names the wrong key")]
    return [Finding("keys.sample", Status.PASS, f"the oldest and newest user's keys open under {allowed} (opened by "
                    f"{', '.join(sorted(opened_by))})")]


def _kms_accepted(p: _Probe) -> list[Finding]:
    """Each accepted CMK is Enabled and of the right kind (kms.keys); here, whether the task role's Decrypt on it
    is proven by a real blob. KMS cannot be asked that without one, and nothing may be wrapped under an accepted
    key (the role has no GenerateDataKey on it), so before the rewrap moves a blob there it stays unproven."""
    if p.kms is None or p.settings is None or not p.settings.accepted_cmk_ids:
        return []
    if not p.accepted_arns:
        return []  # kms.keys failed and said why
    findings = []
    for arn in p.accepted_arns:
        if arn in p.opened_by:
            findings.append(Finding("kms.accepted", Status.PASS, f"accepted CMK {arn}: Enabled, and a sampled "
                                    "user's key wrapped under it opened (kms:Decrypt works)"))
        else:
            findings.append(Finding(
                "kms.accepted", Status.WARN,
                f"accepted CMK {arn} is Enabled, but no sampled key is wrapped under it, so kms:Decrypt on it is "
                "not proven (expected before a rewrap to it, or after the rewrap away from it)",
                "give the task role what owui-crypto iam-policy prints with OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS set; "
                "after the rewrap, run doctor again; once nothing is under the old key, drop it from the list"))
    return findings


def _registered_without_kms_copy(conn: psycopg.Connection[Any]) -> int:
    try:
        row = conn.execute('SELECT count(*) FROM public."user" u JOIN owui_crypto.user_key k ON k.user_id = u.id'
                           " WHERE u.kms_encrypted_dek IS NULL").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return 0  # only the owner reads the key ring; the first finding already says what to do
    return int(row[0]) if row else 0


def _conn(p: _Probe) -> psycopg.Connection[Any]:
    assert p.conn is not None
    return p.conn


def _needs_schema(check: Check) -> Check:
    """Skip a check that reads owui_crypto when it is not installed (db.schema already says so)."""

    def run(p: _Probe) -> list[Finding]:
        return check(p) if p.installed else []

    run.__name__ = check.__name__
    return run


_DATABASE_CHECKS: tuple[Check, ...] = (
    _db_schema,
    _role_superuser,
    _needs_schema(_role_owner),
    _role_temp,
    _role_create,
    _needs_schema(_path_creators),
    _needs_schema(_role_key_ring),
    _needs_schema(_schema_drift),
    _needs_schema(_data_plaintext),
    _server_logging,
    _db_tls,
    _needs_schema(_keys_share),
    _needs_schema(_keys_users),
    _needs_schema(_keys_sample),
    _needs_schema(_kms_accepted),
)

