"""``owui-crypto rewrap``: move every KMS-wrapped key to another CMK.

Why it exists: the wrapped keys name the CMK that made them, and the adapter
decrypts naming its keys explicitly (``KMS_APPLICATION_CMK_ID``, then any
``OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS``), so a blob under any other key does not
open. Moving to another CMK (another account, a multi-Region key, a key with
other administrators) therefore means re-wrapping each
``"user".kms_encrypted_dek`` and each ``owui_crypto.deployment_key.kms_wrapped``
under the new key.

KMS's *automatic rotation* of a CMK needs none of this: KMS keeps every
earlier key material of the key and picks the right one from the blob, so
old blobs keep opening under the same key id.

How it works, and why:

* KMS ``ReEncrypt``: KMS decrypts and re-encrypts inside itself; no DEK
  leaves KMS, and the encryption context stays exactly the one
  :mod:`app_adapter.kms` uses to unwrap (per user, per deployment key).
* Resumable without a progress table: ReEncrypt reports the key that had
  wrapped each blob (``SourceKeyId``), so a row already under the target is
  recognised from the blob itself and not written again. A blob under a key
  that is neither a source (``--from``, default ``KMS_APPLICATION_CMK_ID``)
  nor the target is left alone and reported: rewrap does not launder keys
  it was not told about into the new CMK.
* Safe beside a running Open WebUI, in two ways. For the requests: a run
  starts only if the target is ``KMS_APPLICATION_CMK_ID`` or one of
  ``OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS`` of its own settings, the settings the
  fleet is meant to run with; instances configured so open a blob on either
  side of the move (README, the rewrap sequence). For the data: rows are read in batches by id, KMS is
  called outside any transaction, and each row is written with
  ``UPDATE ... WHERE kms_encrypted_dek = <the blob that was re-encrypted>``,
  so a concurrent change (a user forgotten, re-provisioned) is never
  overwritten; one transaction per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from tqdm import tqdm

from app_adapter.errors import CannotUnwrap, KmsError, OwuiCryptoError
from app_adapter.kms import KmsKeys, Rewrapped

__all__ = ["DEFAULT_BATCH", "DEFAULT_WORKERS", "Rewrap", "RewrapError", "rewrap"]

#: Rows per transaction: small enough that a batch's row locks are short, big
#: enough that commits do not dominate.
DEFAULT_BATCH = 200
#: Concurrent ReEncrypt calls. KMS latency, not CPU, bounds the run; a few
#: calls in flight shorten the time during which some blobs are under the old
#: key and some under the new one, well below KMS's request quotas.
DEFAULT_WORKERS = 4

_USERS = ('SELECT id, kms_encrypted_dek FROM public."user" WHERE kms_encrypted_dek IS NOT NULL AND id > %s'
          " ORDER BY id LIMIT %s")
_UPDATE_USER = 'UPDATE public."user" SET kms_encrypted_dek = %s WHERE id = %s AND kms_encrypted_dek = %s'
_STILL_THERE = 'SELECT kms_encrypted_dek IS NOT NULL FROM public."user" WHERE id = %s'
_DEPLOYMENT = "SELECT name, kms_wrapped FROM owui_crypto.deployment_key ORDER BY name"
_UPDATE_DEPLOYMENT = ("UPDATE owui_crypto.deployment_key SET kms_wrapped = %s, kms_key_id = %s"
                      " WHERE name = %s AND kms_wrapped = %s")


class RewrapError(OwuiCryptoError):
    """The run stopped; batches committed before it stay moved (run again to resume)."""


@dataclass
class Rewrap:
    """What a run did. No key material; ids only."""

    target_arn: str
    moved: int = 0  # blobs now under the target that were under a source key
    already: int = 0  # blobs that were under the target already (an earlier, interrupted run)
    vanished: int = 0  # rows whose blob was removed meanwhile (a user forgotten): nothing to move
    changed: list[str] = field(default_factory=list)  # rows whose blob changed meanwhile: run again
    unopenable: list[tuple[str, str]] = field(default_factory=list)  # (row, why): KMS would not re-encrypt it
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (row, key ARN): neither --from nor --to
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Rows visited."""
        return self.moved + self.already + self.vanished + len(self.changed) + len(self.unopenable) + len(self.foreign)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """True when every blob rewrap saw is now under the target."""
        return not (self.changed or self.unopenable or self.foreign)

    def summary(self) -> str:
        return (f"owui-crypto: rewrap to {self.target_arn}: {self.moved} moved, {self.already} already there, "
                f"{len(self.changed) + len(self.unopenable) + len(self.foreign)} left as they were; "
                f"{self.rows} rows in {self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s)")

    def problem_lines(self) -> list[str]:
        lines = [f"{who}: changed while rewrap ran; run rewrap again to move it" for who in self.changed]
        lines += [f"{who}: KMS would not re-encrypt it, left as it was: {why}" for who, why in self.unopenable]
        lines += [f"{who}: wrapped under {key}, which is neither a --from key nor the target; left alone "
                  "(add --from KEY if it is yours)" for who, key in self.foreign]
        return lines


@dataclass(frozen=True)
class _Row:
    who: str  # "user <id>" or "deployment key <name>", for messages
    key: str  # the user id or the deployment key's name
    blob: bytes


def rewrap(dsn: str, kms: KmsKeys, target: str, sources: Sequence[str], *, batch: int = DEFAULT_BATCH,
           workers: int = DEFAULT_WORKERS, progress: bool = True) -> Rewrap:
    """Move every wrapped key from a key of ``sources`` to ``target`` (ids, ARNs or aliases).

    ``dsn`` is a libpq URL as owui-crypto's owner (it writes
    ``owui_crypto.deployment_key``). Deployment keys go first: a role that
    may not write them stops the run before any user row is touched.
    Raises :class:`RewrapError` when KMS or the database stops the run.
    """
    if batch < 1 or workers < 1:
        raise RewrapError(f"--batch and --workers must be at least 1, got {batch} and {workers}")
    target_arn = kms.check_cmk(target, "--to")  # an alias could be repointed mid-run; the ARN cannot
    _require_accepted(kms, target, target_arn)
    allowed = {kms.key_arn(key, "--from") for key in sources} | {target_arn}
    done = Rewrap(target_arn)
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, ThreadPoolExecutor(max_workers=workers) as pool:
        total = _count(conn)
        with tqdm(total=total, desc="rewrap", unit="row", disable=not progress) as bar:
            deployment = [_Row(f"deployment key {name}", name, bytes(blob)) for name, blob in _read(conn, _DEPLOYMENT)]
            _apply(conn, deployment, _rewrapped(pool, deployment, kms.reencrypt_deployment_key, target_arn),
                   allowed, done, _write_deployment_key)
            bar.update(len(deployment))
            last = ""
            while rows := [_Row(f"user {uid}", uid, bytes(blob)) for uid, blob in _read(conn, _USERS, (last, batch))]:
                _apply(conn, rows, _rewrapped(pool, rows, kms.reencrypt_dek, target_arn), allowed, done, _write_user)
                bar.update(len(rows))
                last = rows[-1].key
    done.seconds = time.perf_counter() - started
    return done


def _require_accepted(kms: KmsKeys, target: str, target_arn: str) -> None:
    """Refuse a target that instances configured as this process could not unwrap with: each blob moved would be
    a failed request (a 500) for its user on every such instance until they restart."""
    if target_arn in {kms.key_arn(key, "KMS_APPLICATION_CMK_ID or OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS")
                      for key in kms.unwrap_key_ids}:
        return
    raise RewrapError(
        f"--to {target} is neither KMS_APPLICATION_CMK_ID nor in OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS: instances "
        "configured like this command could not open the keys it moves. First add it to "
        "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS on every instance and restart them (and in this command's environment), "
        "then run rewrap again")


def _count(conn: psycopg.Connection[Any]) -> int:
    try:
        row = conn.execute('SELECT (SELECT count(*) FROM public."user" WHERE kms_encrypted_dek IS NOT NULL)'
                           " + (SELECT count(*) FROM owui_crypto.deployment_key)").fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise RewrapError("rewrap reads and writes the wrapped keys (owui_crypto.deployment_key and "
                          '"user".kms_encrypted_dek): run it as owui-crypto\'s owner, the role that ran '
                          "owui-crypto upgrade") from exc
    finally:
        conn.rollback()
    return int(row[0]) if row else 0


def _read(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One read, committed at once: no snapshot or lock is held while KMS is called."""
    rows = conn.execute(query, params).fetchall()
    conn.commit()
    return rows


_Outcome = Rewrapped | CannotUnwrap


def _rewrapped(pool: ThreadPoolExecutor, rows: Sequence[_Row], call: Callable[[str, bytes, str], Rewrapped],
               target: str) -> list[_Outcome]:
    """ReEncrypt each row; a blob KMS will not open is an outcome, anything else stops the run."""

    def one(row: _Row) -> _Outcome:
        try:
            return call(row.key, row.blob, target)
        except CannotUnwrap as exc:
            return exc
        except KmsError as exc:
            raise RewrapError(f"{row.who}: {exc}. Batches committed before this one are under the new key; "
                              "fix the cause and run rewrap again to go on") from exc

    return list(pool.map(one, rows))


def _apply(conn: psycopg.Connection[Any], rows: Sequence[_Row], outcomes: Iterable[_Outcome], allowed: set[str],
           done: Rewrap, write: Callable[[psycopg.Connection[Any], _Row, Rewrapped], bool]) -> None:
    """Write one batch in one transaction, each row only if its blob is still the one re-encrypted."""
    with conn.transaction():
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, CannotUnwrap):
                done.unopenable.append((row.who, str(outcome)))
            elif outcome.source_key_arn == done.target_arn:
                done.already += 1
            elif outcome.source_key_arn not in allowed:
                done.foreign.append((row.who, outcome.source_key_arn))
            elif write(conn, row, outcome):
                done.moved += 1
            elif _user_blob_gone(conn, row):
                done.vanished += 1
            else:
                done.changed.append(row.who)


def _write_user(conn: psycopg.Connection[Any], row: _Row, new: Rewrapped) -> bool:
    return conn.execute(_UPDATE_USER, (new.blob, row.key, row.blob)).rowcount == 1


def _write_deployment_key(conn: psycopg.Connection[Any], row: _Row, new: Rewrapped) -> bool:
    return conn.execute(_UPDATE_DEPLOYMENT, (new.blob, new.key_arn, row.key, row.blob)).rowcount == 1


def _user_blob_gone(conn: psycopg.Connection[Any], row: _Row) -> bool:
    if not row.who.startswith("user "):
        return False  # a deployment key is never removed while the deployment runs
    found = conn.execute(_STILL_THERE, (row.key,)).fetchone()
    return found is None or not found[0]
