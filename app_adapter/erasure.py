"""Erasure that reaches backups: one KMS grant per user, retired when the user is forgotten.

Forgetting a user deletes their wrapped DEK from the database, but a backup taken before still holds it,
and by default (``OWUI_CRYPTO_ERASURE=off``) the task role may ``kms:Decrypt`` any blob with this
application's user context: restore the backup, and the deleted user's chats open again. With
``OWUI_CRYPTO_ERASURE=grants`` the task role has no Decrypt of user DEKs of its own (the key policy and its
IAM policy are what ``owui-crypto iam-policy`` prints with the variable set); each user's Decrypt comes from
a grant on the application CMK:

* grantee and retiring principal: the task role (``OWUI_CRYPTO_ERASURE_GRANTEE``);
* operations: ``Decrypt``, and ``RetireGrant`` so that the grantee itself may retire it;
* constraint: ``EncryptionContextEquals`` the user's context, so it opens that user's blobs and no other;
* name: ``owui-crypto-user-<user id>``: a retried CreateGrant returns the same grant, and a ListGrants sweep
  tells whose grant each one is.

:meth:`KeyService.provision <app_adapter.keys.KeyService.provision>` creates the grant,
:meth:`KeyService.forget <app_adapter.keys.KeyService.forget>` retires it. A backup restored afterwards holds
the user's ``kms_encrypted_dek``, which KMS then refuses to open for the application.

Grant ids are not kept in the database (a migration would be needed, and a restored backup would bring
back stale ones). Each process keeps an index, user id -> grant ids, built by one ListGrants sweep (100 grants a
call) and kept up to date with its own creations and retirements; forgetting a user the index does not know
sweeps again. :func:`main` (``python -m app_adapter.erasure check|sync``) compares every grant on the CMK with
the users in the database: it retires the grants of users who are gone (a deletion whose retirement failed),
reports grants it did not make that open user DEKs, and reports users who have a key but no grant. Only with
``--grant-missing`` does it create their grants: once, when switching an existing deployment on. A user with a
key and no grant may also be one deleted since the backup the database was restored from; granting them would
undo their erasure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.exceptions

from app_adapter import kms as _kms
from app_adapter.config import Settings
from app_adapter.errors import ConfigError, KmsError, KmsThrottled, OwuiCryptoError
from app_adapter.kms import KmsGrant, KmsKeys

__all__ = [
    "GRANTS_PER_KEY_QUOTA",
    "GRANT_NAME_PREFIX",
    "GRANT_OPERATIONS",
    "ErasureIncomplete",
    "GrantEraser",
    "GrantQuotaExceeded",
    "SyncReport",
    "from_settings",
    "grant_name",
    "main",
]

log = logging.getLogger("owui_crypto.erasure")

GRANT_NAME_PREFIX = "owui-crypto-user-"

#: What a user's grant allows. Decrypt is the point; RetireGrant lets the grantee retire it even where KMS
#: would not take the role as retiring principal for one of its sessions.
GRANT_OPERATIONS: tuple[str, ...] = ("Decrypt", "RetireGrant")

#: KMS's default quota of grants per KMS key (adjustable in Service Quotas). Beyond it CreateGrant fails with
#: LimitExceededException, and so does provisioning.
GRANTS_PER_KEY_QUOTA = 50_000
_QUOTA_WARNING = 0.8

#: How long a new grant's token is presented with the user's Decrypts. KMS says a grant reaches every
#: endpoint "usually in less than five minutes"; the token makes it usable at once.
TOKEN_SECONDS = 300.0

#: A grant of a user the database does not know is left alone this long: its user may be in the middle of
#: signing up (grant made, transaction not yet committed).
STRAY_GRACE = timedelta(minutes=15)

# The fixed fields of the user context (purpose, application), from the builder app_adapter.kms wraps DEKs with,
# so that a change there cannot leave this module recognising grants by a stale context.
_USER_FIXED = {k: v for k, v in _kms._user_context("-").items() if k != "user_id"}
# Operations that open a user's DEK, or make a grant that does.
_OPENING_OPERATIONS = frozenset({"Decrypt", "ReEncryptFrom", "CreateGrant"})


class ErasureIncomplete(KmsError):
    """A forgotten user's grant could not be retired: backups taken earlier still open their DEK."""


class GrantQuotaExceeded(KmsError):
    """The application CMK has as many grants as KMS allows; no new user can be provisioned."""


def grant_name(user_id: str) -> str:
    """The name of ``user_id``'s grant (KMS: ``[a-zA-Z0-9:/_-]``, up to 256 characters; user ids are UUIDs)."""
    return GRANT_NAME_PREFIX + user_id


@dataclass
class SyncReport:
    """What :meth:`GrantEraser.sync` found (and did, unless ``apply`` was False). User ids, no key material."""

    grants: int = 0  # grants on the CMK, all kinds
    users: int = 0  # users with a wrapped DEK in the database
    missing: list[str] = field(default_factory=list)  # users with a key and no grant (granted with grant_missing)
    stray: list[str] = field(default_factory=list)  # grants (ids) of users who are gone
    young: list[str] = field(default_factory=list)  # grants of unknown users, within STRAY_GRACE: left alone
    foreign: list[str] = field(default_factory=list)  # grants not made here that open user DEKs
    failed: list[str] = field(default_factory=list)  # "what: why", for each change that failed
    applied: bool = False
    granted_missing: bool = False

    @property
    def near_quota(self) -> bool:
        return self.grants >= _QUOTA_WARNING * GRANTS_PER_KEY_QUOTA

    @property
    def clean(self) -> bool:
        """Nothing to do and nothing to report."""
        missing = self.missing and not self.granted_missing
        stray = self.stray and not self.applied
        return not (missing or stray or self.failed or self.foreign or self.near_quota)


class GrantEraser:
    """Per-process: creates, finds and retires users' grants on the application CMK. Thread-safe."""

    def __init__(self, kms: KmsKeys, grantee_arn: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.kms = kms
        self.grantee = grantee_arn
        self._clock = clock
        self._lock = threading.Lock()
        self._index: dict[str, set[str]] | None = None  # None until the first sweep
        self._tokens: dict[str, tuple[str, float]] = {}  # user id -> (grant token, monotonic expiry)

    def __repr__(self) -> str:
        return f"GrantEraser(grantee={self.grantee!r}, kms={self.kms!r})"

    # -- provisioning -------------------------------------------------------------

    def grant(self, user_id: str) -> str:
        """Create ``user_id``'s grant (or get it back, for a retry); returns its id."""
        try:
            grant_id, token = self.kms.create_user_grant(user_id, self.grantee, grant_name(user_id),
                                                         GRANT_OPERATIONS)
        except KmsThrottled as exc:
            if _code(exc) == "LimitExceededException":
                # For CreateGrant this is the grants-per-key quota, not a request rate: retrying does not help.
                raise GrantQuotaExceeded(
                    f"the application CMK has reached its quota of grants ({GRANTS_PER_KEY_QUOTA:,} by default): "
                    "no new user can be provisioned. Raise 'Grants per KMS key' in Service Quotas, or retire "
                    "stray grants (python -m app_adapter.erasure sync); README, \"Erasure that reaches backups\""
                ) from exc
            raise
        now = self._clock()
        with self._lock:
            if self._index is not None:
                self._index.setdefault(user_id, set()).add(grant_id)
            # Expired tokens go on each insert, so the table stays as small as five minutes of sign-ups.
            self._tokens = {u: t for u, t in self._tokens.items() if t[1] > now}
            self._tokens[user_id] = (token, now + TOKEN_SECONDS)
        return grant_id

    def grant_tokens(self, user_id: str) -> tuple[str, ...]:
        """The token of a grant this process made for ``user_id`` in the last :data:`TOKEN_SECONDS`."""
        with self._lock:
            found = self._tokens.get(user_id)
        if found is None or found[1] <= self._clock():
            return ()
        return (found[0],)

    # -- forgetting ---------------------------------------------------------------

    def retire(self, user_id: str) -> int:
        """Retire every grant of ``user_id``; returns how many there were.

        Raises :class:`ErasureIncomplete` (after logging it) when one could not be retired: the caller's
        transaction must then roll back, so that the user stays registered and the next start-up
        reconcile (or the next ``owui-crypto forget``) tries again.
        """
        with self._lock:
            self._tokens.pop(user_id, None)
            known = set(self._index.get(user_id, ())) if self._index is not None else None  # a copy
        retired = 0
        try:
            if known:
                try:
                    retired = self._retire_each(user_id, known)
                    if retired == len(known):
                        return retired
                except OwuiCryptoError:
                    pass
                # An indexed grant was gone or would not retire: another process may have retired it, so the
                # index is stale and the user may even have a newer grant (forgotten, then signed up again
                # elsewhere). A fresh sweep decides.
            return retired + self._retire_each(user_id, self._sweep().get(user_id, set()))
        except OwuiCryptoError as exc:
            log.error("user %s: a KMS grant could not be retired (%s): until it is, a backup taken before the "
                      "deletion still opens the user's key; the forget is rolled back and tried again",
                      user_id, exc)
            if isinstance(exc, ErasureIncomplete):
                raise
            raise ErasureIncomplete(f"user {user_id}: the KMS grants could not be listed ({exc}); nothing was "
                                    "forgotten. Run the forget again") from exc

    def _retire_each(self, user_id: str, grant_ids: Iterable[str]) -> int:
        retired = 0
        for grant_id in sorted(grant_ids):
            try:
                existed = self.kms.retire_grant(grant_id)
            except OwuiCryptoError as exc:
                raise ErasureIncomplete(
                    f"user {user_id}: KMS grant {grant_id} could not be retired ({exc}); nothing was forgotten. "
                    "Run the forget again (the start-up reconcile does for users Open WebUI deleted), or check "
                    "with python -m app_adapter.erasure check") from exc
            with self._lock:
                if self._index is not None:
                    self._index.get(user_id, set()).discard(grant_id)
            retired += existed
        return retired

    # -- listing ------------------------------------------------------------------

    def _sweep(self) -> dict[str, set[str]]:
        """Every grant on the CMK, once; rebuilds the index from this process's grants of users."""
        index: dict[str, set[str]] = {}
        for grant in self.kms.list_grants():
            user_id = self.user_of(grant)
            if user_id is not None:
                index.setdefault(user_id, set()).add(grant.grant_id)
        with self._lock:
            self._index = index
        return index

    def user_of(self, grant: KmsGrant) -> str | None:
        """The user whose grant this is, if it is one this module makes (name, grantee and constraint)."""
        context = grant.context_equals or {}
        user_id = context.get("user_id")
        if (user_id is None or grant.name != grant_name(user_id) or grant.grantee != self.grantee
                or dict(context) != _kms._user_context(user_id)):
            return None
        return user_id

    # -- reconciliation -----------------------------------------------------------

    def sync(self, conn: Any, *, apply: bool = True, grant_missing: bool = False,
             now: datetime | None = None) -> SyncReport:
        """Compare every grant on the CMK with the users that have a key in ``conn``'s database.

        With ``apply``: retire the grants of users who are gone (older than :data:`STRAY_GRACE`), and with
        ``grant_missing`` also create the grants of users who have a key and none. That is for switching an
        existing deployment on, never for a database restored from a backup: there, such users include the ones
        deleted since, and granting them would open their keys again. Grants this module did not make are
        reported, never touched. ``conn`` is only read (``"user".kms_encrypted_dek``).
        """
        now = now or datetime.now(UTC)
        users = {row[0] for row in conn.execute(
            'SELECT id FROM public."user" WHERE kms_encrypted_dek IS NOT NULL')}
        grants = self.kms.list_grants()
        report = SyncReport(grants=len(grants), users=len(users), applied=apply,
                            granted_missing=apply and grant_missing)
        granted: set[str] = set()
        stray: list[tuple[str, str]] = []
        for grant in grants:
            user_id = self.user_of(grant)
            if user_id is None:
                if _opens_user_deks(grant):
                    report.foreign.append(grant.grant_id)
            elif user_id in users:
                granted.add(user_id)
            elif grant.created is not None and now - grant.created < STRAY_GRACE:
                report.young.append(grant.grant_id)
            else:
                stray.append((user_id, grant.grant_id))
        report.missing = sorted(users - granted)
        report.stray = sorted(grant_id for _, grant_id in stray)
        if report.foreign:
            log.warning("%d grant(s) on the application CMK that owui-crypto did not make can open user DEKs: %s",
                        len(report.foreign), ", ".join(report.foreign))
        if report.near_quota:
            log.warning("the application CMK has %d grants of %d allowed: raise the quota before sign-ups fail",
                        report.grants, GRANTS_PER_KEY_QUOTA)
        if not apply:
            return report
        for user_id in report.missing if grant_missing else ():
            try:
                self.grant(user_id)
            except OwuiCryptoError as exc:
                report.failed.append(f"grant for user {user_id}: {exc}")
        for user_id, grant_id in sorted(stray):
            try:
                self.kms.retire_grant(grant_id)
            except OwuiCryptoError as exc:
                report.failed.append(f"retire grant {grant_id} of user {user_id}: {exc}")
        with self._lock:
            self._index = None  # rebuilt by the next forget that needs it
        return report


def from_settings(settings: Settings, kms: KmsKeys) -> GrantEraser | None:
    """The eraser of ``OWUI_CRYPTO_ERASURE=grants``, or None when erasure is off."""
    if settings.erasure == "off":
        return None
    if not settings.erasure_grantee:
        raise ConfigError("OWUI_CRYPTO_ERASURE=grants needs OWUI_CRYPTO_ERASURE_GRANTEE (the task role's ARN)")
    return GrantEraser(kms, settings.erasure_grantee)


def _opens_user_deks(grant: KmsGrant) -> bool:
    """Whether a grant could open some user's DEK: an opening operation, under no constraint that rules
    the user context out."""
    if not _OPENING_OPERATIONS & set(grant.operations):
        return False
    for constraint in (grant.context_equals, grant.context_subset):
        if constraint and any(constraint.get(k, v) != v for k, v in _USER_FIXED.items()):
            return False
    return True


def _code(exc: BaseException) -> str | None:
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        return str(cause.response.get("Error", {}).get("Code"))
    return None


# -- python -m app_adapter.erasure ------------------------------------------------------------


def _print_report(report: SyncReport, out: Any) -> None:
    verb = "created" if report.granted_missing else "missing"
    done = "retired" if report.applied else "to retire"
    print(f"owui-crypto erasure: {report.grants} grants on the application CMK "
          f"(quota {GRANTS_PER_KEY_QUOTA:,}), {report.users} users with a key", file=out)
    print(f"owui-crypto erasure: {len(report.missing)} grants {verb}, {len(report.stray)} stray grants {done}, "
          f"{len(report.young)} left for now (users signing up?)", file=out)
    if report.missing and not report.granted_missing:
        print("owui-crypto erasure: users with a key and no grant cannot open their key; grant them with "
              "sync --grant-missing only if they were never deleted (not after restoring a backup: forget those)",
              file=out)
    for grant_id in report.foreign:
        print(f"owui-crypto erasure: grant {grant_id} was not made by owui-crypto and can open user DEKs: "
              "find who made it (CloudTrail CreateGrant), then revoke it", file=out)
    for line in report.failed:
        print(f"owui-crypto erasure: failed: {line}", file=out)
    if report.near_quota:
        print(f"owui-crypto erasure: {report.grants} grants are near the quota of {GRANTS_PER_KEY_QUOTA:,}",
              file=out)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    """``python -m app_adapter.erasure check|sync [--grant-missing] [--database-url URL]``: 0 clean, 1 something
    to see to."""
    import psycopg

    from app_adapter.keys import KeyService

    parser = argparse.ArgumentParser(prog="python -m app_adapter.erasure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "sync"),
                        help="check: report only; sync: also retire the grants of users who are gone")
    parser.add_argument("--grant-missing", action="store_true",
                        help="sync: also grant users who have a key and no grant (once, when switching erasure on; "
                             "never on a database restored from a backup)")
    parser.add_argument("--database-url", default=environ.get("DATABASE_URL"),
                        help="Open WebUI's database (default: DATABASE_URL)")
    args = parser.parse_args(argv)
    if args.grant_missing and args.command != "sync":
        parser.error("--grant-missing goes with sync")
    if not args.database_url:
        parser.error("no database: pass --database-url or set DATABASE_URL")
    try:
        service = KeyService(Settings.from_env(environ), args.database_url)
        if service.erasure is None:
            print("owui-crypto erasure: OWUI_CRYPTO_ERASURE is off; nothing to check", file=sys.stderr)
            return 1
        try:
            with psycopg.connect(service.dsn, autocommit=True) as conn:
                report = service.erasure.sync(conn, apply=args.command == "sync",
                                              grant_missing=args.grant_missing)
        finally:
            service.kms.close()
    except OwuiCryptoError as exc:
        print(f"owui-crypto erasure: {exc}", file=sys.stderr)
        return 1
    _print_report(report, sys.stdout)
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
