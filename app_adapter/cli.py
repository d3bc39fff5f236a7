"""``owui-crypto``: install, check and operate per-user encryption of Open WebUI chats."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import psycopg
from psycopg import sql

from app_adapter import errors, migrate
from app_adapter.config import OWNER_URL_ENV, two_roles
from app_adapter.sqlrows import scalar

EPILOG = """environment:
  DATABASE_URL             Open WebUI's PostgreSQL database (postgresql+psycopg://...)
  OWUI_CRYPTO_OWNER_DATABASE_URL
                           serve: the owner's URL; migrates with it, serves as DATABASE_URL's role
  AWS_REGION, KMS_HMAC_KEY_ID, KMS_APPLICATION_CMK_ID, ...
                           KMS settings for user-id, check-keys, provision (see README)
"""


def _libpq(url: str | None) -> str:
    return migrate.database_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


def cmd_upgrade(args: argparse.Namespace) -> int:
    migrate.upgrade(args.database_url)
    print("owui-crypto: schema is at head; views and triggers rebuilt")
    return 0


def cmd_downgrade(args: argparse.Namespace) -> int:
    migrate.downgrade(args.database_url, args.revision)
    print(f"owui-crypto: downgraded to {args.revision}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    with psycopg.connect(_libpq(args.database_url)) as conn:
        n = scalar(conn, "SELECT owui_crypto.refresh()")
    print(f"owui-crypto: rebuilt views and triggers of {n} protected tables")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Drift between views and base tables, and server settings that would leak chat text."""
    from app_adapter.serverchecks import leaking_settings, path_creators

    problems = []
    with psycopg.connect(_libpq(args.database_url)) as conn:
        problems += [f"{t or 'owui_crypto'}: {p}" for t, p in conn.execute(
            "SELECT table_name, problem FROM owui_crypto.drift()")]
        for table, column, n in conn.execute("SELECT * FROM owui_crypto.unsealed_counts() WHERE unsealed > 0"):
            problems.append(f"{table}.{column} holds {n} plaintext values written before owui-crypto was "
                            "installed: run owui-crypto seal-existing")
        problems += leaking_settings(conn)
        problems += path_creators(conn)
        problems += [f"{t}.{c} ({type_sql}) is neither sealed nor plaintext by decision: a new Open WebUI column? "
                     "Decide in the policy (sql/90_coverage.sql); owui-crypto serve refuses to start until then"
                     for t, c, type_sql in conn.execute("SELECT * FROM owui_crypto.unclassified_columns()")]
        owns = scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc f WHERE f.pronamespace = "
                            "'owui_crypto'::regnamespace AND pg_catalog.pg_has_role(f.proowner, 'MEMBER'))")
    for line in problems:
        print(f"problem: {line}")
    if owns and not two_roles(os.environ):
        # Not a problem of the database (the exit code stays): how owui-crypto serve would use this role.
        print(f"warning: {OWNER_URL_ENV} is not set, so owui-crypto serve would run Open WebUI as this role, which "
              "owns owui-crypto's functions (SECURITY.md, 'One role for everything'); give Open WebUI a role of "
              f"its own in DATABASE_URL and this one in {OWNER_URL_ENV}")
    print("owui-crypto: healthy" if not problems else f"owui-crypto: {len(problems)} problem(s)")
    return 1 if problems else 0


def grant_application_role(conn: psycopg.Connection, role: str) -> str:
    """Let ROLE use the views, and take TEMP away from it (and from PUBLIC, which every role inherits):
    with no temporary objects, nothing a session leaves behind can shadow what a later user resolves.
    Runs as owui-crypto's owner on ``conn`` (its own transaction); returns the database's name.
    ``owui-crypto grant`` and ``owui-crypto serve`` with two roles share it."""
    conn.execute("INSERT INTO owui_crypto.grantee VALUES (%s) ON CONFLICT DO NOTHING", (role,))
    conn.execute("SELECT owui_crypto.refresh()")
    database = scalar(conn, "SELECT current_database()")
    # The owner keeps TEMP: activate() keeps each session's transport entries in a temporary table.
    conn.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {db} TO CURRENT_USER").format(db=sql.Identifier(database)))
    conn.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC, {role}").format(
        db=sql.Identifier(database), role=sql.Identifier(role)))
    # Nor code planted where every keyed transaction looks (PostgreSQL 14 and older let PUBLIC
    # create in public). A role that owns public itself is reported by check.
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}").format(role=sql.Identifier(role)))
    return str(database)


def cmd_grant(args: argparse.Namespace) -> int:
    with psycopg.connect(_libpq(args.database_url)) as conn:
        database = grant_application_role(conn, args.role)
    print(f"owui-crypto: {args.role} may now use the decrypting views (and nothing more); "
          f"TEMP on database {database} and CREATE on schema public are revoked from {args.role} and from PUBLIC")
    return 0


def cmd_remove_weak_copies(args: argparse.Namespace) -> int:
    service = _service(args)
    with psycopg.connect(service.dsn) as conn:
        found = service.remove_weak_copies(conn)
    print(f"owui-crypto: removed the database-openable key copies of {len(found.removed)} users; "
          f"kept {len(found.kept)} user-held copies")
    for user_id in found.refused:
        print(f"owui-crypto: user {user_id}: left as is, their KMS copy is missing or is not the same key "
              "(check kms_encrypted_dek before removing anything)", file=sys.stderr)
    return 1 if found.refused else 0


def _kms():
    from app_adapter.config import Settings
    from app_adapter.kms import KmsKeys

    return KmsKeys(Settings.from_env())


def cmd_user_id(args: argparse.Namespace) -> int:
    with _kms() as kms:
        kms.check_keys()
        print(kms.user_id(args.email))
    return 0


def cmd_check_keys(args: argparse.Namespace) -> int:
    with _kms() as kms:
        print(kms.check_keys())
    return 0


def _service(args: argparse.Namespace):
    from app_adapter.config import Settings
    from app_adapter.keys import KeyService

    return KeyService(Settings.from_env(), _libpq(args.database_url))


def cmd_provision(args: argparse.Namespace) -> int:
    service = _service(args)
    with psycopg.connect(service.dsn) as conn:
        done = service.provision(conn, args.user_id)
    print(f"owui-crypto: user {done.user_id} {'now has' if done.created else 'already had'} key {done.key_id}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    if not args.yes:
        print("owui-crypto: forget destroys the user's keys; everything sealed under them in this database "
              "becomes unreadable (backups taken earlier still hold the KMS-wrapped key). Run again with --yes.",
              file=sys.stderr)
        return 2
    service = _service(args)
    with psycopg.connect(service.dsn) as conn:
        found = service.forget(conn, args.user_id)
    print(f"owui-crypto: {'shredded the keys of' if found else 'no keys found for'} user {args.user_id}")
    return 0


def cmd_seal_existing(args: argparse.Namespace) -> int:
    from app_adapter.backfill import seal_existing

    done = seal_existing(_service(args), progress=not args.no_progress)
    print(f"owui-crypto: sealed {done.rows} rows of {done.users} users")
    for column, n in done.remaining.items():
        print(f"owui-crypto: {column}: {n} plaintext values remain; their owners have no key "
              "(provision them, then run seal-existing again)")
    return 1 if done.remaining else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app_adapter.serve import serve

    return serve(host=args.host, port=args.port)


def cmd_recover(args: argparse.Namespace) -> int:
    """Disaster recovery: decrypt in Python (not in SQL) so it works where owui-crypto's SQL is absent or broken."""
    from pathlib import Path

    from app_adapter.recover import read_share_key_file, recover

    share_wrapped = read_share_key_file(Path(args.share_key_file)) if args.share_key_file else None
    with _kms() as kms:
        users = None if args.all else [*(args.user or []), *(kms.user_id(e) for e in args.email or [])]
        done = recover(_libpq(args.database_url), kms, Path(args.out), users, share_wrapped=share_wrapped,
                       progress=not args.no_progress)
    for line in done.problem_lines():
        print(line)
    print(done.summary())
    return 0 if done.complete else 1


def cmd_iam_policy(args: argparse.Namespace) -> int:
    from app_adapter import iam

    print(iam.policy_json(iam.policy_from_environment(args.hmac_key_arn, args.cmk_arn, args.db_secret_arn)))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Every post-deploy check (KMS, the role's privileges, drift, logging, TLS, keys), each PASS/WARN/FAIL."""
    from app_adapter.doctor import diagnose

    report = diagnose(_libpq(args.database_url))
    print(report.json() if args.json else report.text())
    return report.exit_code


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Move every KMS-wrapped key to another CMK with ReEncrypt (no key leaves KMS); resumable."""
    from app_adapter.config import Settings
    from app_adapter.kms import KmsKeys
    from app_adapter.rewrap import rewrap

    settings = Settings.from_env()
    # After the switch (README, step 3) the old key is an accepted one: a second run needs no --from.
    sources = args.sources or [settings.application_cmk_id, *settings.accepted_cmk_ids]
    with KmsKeys(settings) as kms:
        done = rewrap(_libpq(args.database_url), kms, args.to, sources, batch=args.batch, workers=args.workers,
                      progress=not args.no_progress)
        configured = kms.key_arn(settings.application_cmk_id, "KMS_APPLICATION_CMK_ID")
    for line in done.problem_lines():
        print(f"owui-crypto: {line}", file=sys.stderr)
    print(done.summary())
    if done.complete and configured != done.target_arn:
        print(f"owui-crypto: next: on every instance set KMS_APPLICATION_CMK_ID={args.to} and "
              f"OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS={settings.application_cmk_id} and roll them (each instance opens "
              f"keys under either CMK meanwhile), then run owui-crypto rewrap --to {args.to} again with those "
              "settings: it moves the keys of users who signed up meanwhile (keys already moved are not rewritten)")
    return 0 if done.complete else 1


def cmd_rekey(args: argparse.Namespace) -> int:
    from app_adapter.rekey import rekey

    if not args.yes:
        print("owui-crypto: rekey gives the user a new key and reseals everything sealed under the old one, in one "
              "transaction (their rows are locked meanwhile). Run again with --yes.", file=sys.stderr)
        return 2
    done = rekey(_service(args), args.user_id)
    rate = done.values / done.seconds if done.seconds else 0.0
    print(f"owui-crypto: user {done.user_id}: key {done.old_key_id} -> {done.new_key_id}; resealed {done.values} "
          f"values in {done.seconds:.1f} s ({rate:.0f} values/s). Other instances refuse the old key from now on.")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="owui-crypto", description="Install, check and operate per-user encryption of Open WebUI chats.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--database-url", default=None, help="overrides DATABASE_URL")
        return p

    with_db(add("upgrade", cmd_upgrade, "install or upgrade owui-crypto's SQL (alembic upgrade head), then refresh"))
    p = with_db(add("downgrade", cmd_downgrade, "remove owui-crypto's SQL; refuses while sealed data exists"))
    p.add_argument("revision", nargs="?", default="base")
    with_db(add("refresh", cmd_refresh, "rebuild views and triggers after Open WebUI changed a protected table"))
    with_db(add("check", cmd_check, "report drift and server settings that would leak; exit 1 on any problem"))
    p = with_db(add("grant", cmd_grant, "let ROLE use the decrypting views (an application role)"))
    p.add_argument("role")
    p = add("user-id", cmd_user_id, "print the user id (KMS HMAC) of EMAIL")
    p.add_argument("email")
    add("check-keys", cmd_check_keys, "check that both KMS keys exist, are enabled and of the right spec")
    p = add("iam-policy", cmd_iam_policy, "print the least-privilege IAM policy (JSON) for the ECS task role")
    from app_adapter import iam  # cheap: iam imports kms (boto3) only when a policy is built
    p.description, p.formatter_class = iam.DESCRIPTION, argparse.RawDescriptionHelpFormatter
    p.add_argument("--hmac-key-arn", metavar="ARN", help="ARN of the HMAC key (default: KMS_HMAC_KEY_ID)")
    p.add_argument("--cmk-arn", metavar="ARN", help="ARN of the application CMK (default: KMS_APPLICATION_CMK_ID)")
    p.add_argument("--db-secret-arn", metavar="ARN",
                   help="also allow secretsmanager:GetSecretValue on this secret, for a role that reads it itself "
                        "(default: OWUI_CRYPTO_DB_SECRET_ARN; omitted if unset). Not needed on ECS, where the "
                        "execution role fetches the task definition's secrets")
    p = with_db(add("provision", cmd_provision, "give USER_ID a data key, once"))
    p.add_argument("user_id")
    p = with_db(add("forget", cmd_forget, "crypto-shred USER_ID: delete their wrapped keys"))
    p.add_argument("user_id")
    p.add_argument("--yes", action="store_true", help="really do it")
    p = with_db(add("rekey", cmd_rekey, "give USER_ID a new data key and reseal their rows (a key that may have "
                                        "leaked); one transaction"))
    p.add_argument("user_id")
    p.add_argument("--yes", action="store_true", help="really do it")
    with_db(add("remove-weak-copies", cmd_remove_weak_copies,
                "remove key copies that something in the database opens (earlier releases wrapped them "
                "under the user id), after checking each user's KMS copy is the same key"))
    p = with_db(add("doctor", cmd_doctor, "check a deployment end to end (KMS keys and permissions, the database "
                                          "role, drift, plaintext, logging, TLS, keys): PASS/WARN/FAIL with what to "
                                          "do; exit 1 on any FAIL"))
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p = with_db(add("rewrap", cmd_rewrap, "move every KMS-wrapped key (users' DEKs, deployment keys) to another CMK "
                                          "with KMS ReEncrypt (no key leaves KMS); resumable, never overwrites a "
                                          "concurrent change"))
    p.add_argument("--to", required=True, metavar="NEW_CMK", help="the target CMK (key id, ARN or alias)")
    p.add_argument("--from", dest="sources", action="append", metavar="CMK",
                   help="a CMK blobs may be moved from (repeatable; default: KMS_APPLICATION_CMK_ID and "
                        "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS); a blob under any other key is reported and left alone")
    p.add_argument("--batch", type=int, default=200, metavar="N", help="rows per transaction (default 200)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="concurrent ReEncrypt calls (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = with_db(add("seal-existing", cmd_seal_existing,
                    "seal chat content written before owui-crypto was installed (one transaction per user)"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = with_db(add("recover", cmd_recover,
                    "disaster recovery: write users' chats, decrypted in Python with KMS, as Open WebUI export files"))
    p.epilog = ("Reads Open WebUI's public tables with plain SELECTs: a live database, or a pg_dump of the public "
                "schema restored without owui-crypto. Writes OUT/<user id>.json (Open WebUI's chat export, "
                "importable with POST /api/v1/chats/import), OUT/shared/<user id>.json (shared-chat snapshots, if "
                "the share key is available), OUT/recover-report.json, and OUT/<user id>.INCOMPLETE beside an export "
                "with values that did not open. Exit 1 if any value did not open (tampered, moved, or its key is "
                "gone). KMS settings (AWS_REGION, KMS_APPLICATION_CMK_ID, KMS_HMAC_KEY_ID...) come from the "
                "environment.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the export files (made 0700)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="ID", help="a user id to recover (repeatable)")
    who.add_argument("--email", action="append", metavar="EMAIL",
                     help="a user's email, turned into their id with KMS as sign-up does (repeatable)")
    who.add_argument("--all", action="store_true", help="every user with a \"user\" row or a chat")
    p.add_argument("--share-key-file", metavar="FILE",
                   help="base64 of owui_crypto.deployment_key.kms_wrapped, for a database without that table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("serve", cmd_serve, "run Open WebUI with per-user encryption")
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except errors.OwuiCryptoError as exc:
        print(f"owui-crypto: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        refusal = errors.from_database(exc)
        diag = getattr(exc, "diag", None)
        hint = f"\nhint: {diag.message_hint}" if diag is not None and diag.message_hint else ""
        print(f"owui-crypto: {refusal or exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
