"""The two KMS keys of owui-crypto, and nothing else of KMS.

* The **HMAC key** (``KMS_HMAC_KEY_ID``) turns an email into a stable,
  UUID-shaped user id with GenerateMac.
* The **application CMK** (``KMS_APPLICATION_CMK_ID``) wraps each user's
  DEK (the disaster-recovery copy, ``kms_encrypted_dek``) and a few
  deployment-wide keys such as the share key. Every wrap is bound to an
  encryption context naming its owner, so a blob moved to another user's row
  does not open.
* **Accepted CMKs** (``OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS``) are only ever
  unwrapped with, never wrapped under: they let a fleet go through
  ``owui-crypto rewrap`` without a failed request. Every Decrypt still names
  its key (``KeyId``), the allowed keys one after another; KMS's ciphertext
  format is opaque (only moto's names its key in clear), so we do not read the
  key from the blob, and a blob of any other key opens under none of them.

KMS itself enforces key state, key usage and the HMAC algorithm; emulators
such as moto do not, so :meth:`KmsKeys.check_keys` checks them too, and the
MAC algorithm is derived from the key's KeySpec rather than assumed.

Every botocore failure is translated into an :mod:`app_adapter.errors`
class whose message says what to check; the original exception stays as
``__cause__`` except for parameter-validation errors, whose text can quote
the parameter values (our plaintext).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from app_adapter.config import ACCEPTED_CMKS_ENV, MAC_ALGORITHMS, Settings
from app_adapter.errors import (
    CannotUnwrap,
    InvalidInput,
    KeyUnavailable,
    KmsError,
    KmsThrottled,
    KmsUnreachable,
    MacAlgorithmMismatch,
)
from app_adapter.secret import SecretBytes

__all__ = [
    "APPLICATION",
    "DEK_BYTES",
    "HMAC_SPEC_TO_ALGORITHM",
    "LATENCY_BUCKETS",
    "MAX_MAC_MESSAGE_BYTES",
    "SERVICE_OPERATIONS",
    "KeyCheck",
    "KmsGrant",
    "KmsKeys",
    "Rewrapped",
    "botocore_config",
    "uuid_from_mac",
]

#: The one algorithm each KMS HMAC KeySpec supports.
HMAC_SPEC_TO_ALGORITHM: Mapping[str, str] = {
    "HMAC_224": "HMAC_SHA_224",
    "HMAC_256": "HMAC_SHA_256",
    "HMAC_384": "HMAC_SHA_384",
    "HMAC_512": "HMAC_SHA_512",
}

#: GenerateMac's Message limit in real KMS (moto does not enforce it).
MAX_MAC_MESSAGE_BYTES = 4096

#: Length of a user's data encryption key.
DEK_BYTES = 32

#: Encrypt's Plaintext limit in real KMS.
_MAX_PLAINTEXT_BYTES = 4096

#: Value of the "application" field of every encryption context we use.
APPLICATION = "open-webui"

_USER_DEK_PURPOSE = "user-dek-encryption"
_DEPLOYMENT_KEY_PURPOSE = "deployment-key"

_KEY_UNAVAILABLE_CODES = frozenset(
    {
        "DisabledException",
        "KMSInvalidStateException",
        "NotFoundException",
        "InvalidKeyUsageException",
        "KeyUnavailableException",
        # Credentials and permissions: the key exists but this process may
        # not use it. An operator fixes these, a retry does not.
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "IncompleteSignature",
    }
)
_CANNOT_UNWRAP_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_THROTTLED_CODES = frozenset({"ThrottlingException", "LimitExceededException"})
# Server-side trouble that, like a network failure, passes by itself.
_UNREACHABLE_CODES = frozenset({"DependencyTimeoutException", "KMSInternalException"})
_UNWRAP_OPERATIONS = frozenset({"Decrypt"})

#: Upper bounds, in seconds, of the buckets of each operation's latency histogram (``metrics()``): KMS answers
#: in milliseconds; the upper buckets hold timeouts and botocore's retries (2 s read timeout per attempt).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def botocore_config(settings: Settings) -> Config:
    """The botocore client configuration: bounded timeouts and retries.

    botocore's defaults (legacy retry mode, 60 s read timeout, 5 attempts)
    can block a request for minutes on an endpoint that accepts connections
    and never answers.
    """
    return Config(
        region_name=settings.aws_region,
        connect_timeout=settings.kms_connect_timeout,
        read_timeout=settings.kms_read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.kms_max_attempts},
    )


def uuid_from_mac(mac: bytes) -> str:
    """Shape the first 16 bytes of a MAC as an RFC 9562 version-8 UUID string.

    Version nibble 8 ("custom") and the RFC variant bits are forced; the
    other 122 bits come from the MAC. The SQL side and earlier releases rely
    on exactly this layout: do not change it.
    """
    if len(mac) < 16:
        raise InvalidInput(f"a MAC of at least 16 bytes is needed, got {len(mac)}")
    b = bytearray(mac[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """What :meth:`KmsKeys.check_keys` found: both keys, and every accepted CMK, are usable."""

    hmac_key_arn: str
    hmac_key_spec: str
    mac_algorithm: str
    cmk_arn: str
    accepted_arns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rewrapped:
    """What one ReEncrypt made of a wrapped key: the new blob and both key ARNs.

    ``source_key_arn`` is the key that had wrapped the blob (KMS reads it from
    the blob itself), so a caller can tell a blob that was already under the
    target without any other bookkeeping.
    """

    blob: bytes
    source_key_arn: str
    key_arn: str


@dataclass(frozen=True, slots=True)
class KmsGrant:
    """One grant on the application CMK, as ListGrants lists it (no token: KMS never lists those)."""

    grant_id: str
    name: str
    grantee: str
    retiring: str
    operations: tuple[str, ...]
    context_equals: Mapping[str, str] | None  # the EncryptionContextEquals constraint
    context_subset: Mapping[str, str] | None  # the EncryptionContextSubset constraint
    created: datetime | None  # moto leaves CreationDate out

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> KmsGrant:
        constraints = entry.get("Constraints") or {}
        created = entry.get("CreationDate")
        return cls(
            grant_id=str(entry["GrantId"]),
            name=str(entry.get("Name") or ""),
            grantee=str(entry.get("GranteePrincipal") or ""),
            retiring=str(entry.get("RetiringPrincipal") or ""),
            operations=tuple(entry.get("Operations") or ()),
            context_equals=constraints.get("EncryptionContextEquals"),
            context_subset=constraints.get("EncryptionContextSubset"),
            created=created if isinstance(created, datetime) else None,
        )


class _RedactKmsBodies(logging.Filter):
    """Blanks botocore DEBUG records that carry a KMS Plaintext.

    With botocore at DEBUG, ``botocore.endpoint`` logs each request body and
    ``botocore.parsers`` each response body, which for Encrypt, Decrypt and
    GenerateDataKey contain the DEK in base64.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG and '"Plaintext"' in record.getMessage():
            record.msg = "[owui-crypto: botocore record redacted, it carried a KMS Plaintext]"
            record.args = None
        return True


_REDACTOR = _RedactKmsBodies()

# One boto3 session for the process: making one reloads the service models
# (~0.2 s). Sessions are not thread-safe, hence the lock around client
# creation; the clients themselves are.
_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _new_client(settings: Settings) -> Any:
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client(
            "kms", region_name=settings.aws_region, config=botocore_config(settings)
        )


def _install_redactor() -> None:
    # Filters only see records logged on their own logger, so attach to the
    # two loggers that print bodies; addFilter ignores a repeat.
    for name in ("botocore.endpoint", "botocore.parsers"):
        logging.getLogger(name).addFilter(_REDACTOR)


class KmsKeys:
    """The HMAC key and the application CMK, through one boto3 client.

    Thread-safe: boto3 clients are, and the counters are behind a lock.
    Build one per process and share it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: Any | None = None,
        mac_algorithm: str | None = None,
    ) -> None:
        """Create the KMS client from boto3's standard configuration.

        ``client`` replaces the client (tests use a botocore ``Stubber``).
        ``mac_algorithm`` pins the MAC algorithm (default: the setting
        ``OWUI_CRYPTO_KMS_MAC_ALGORITHM``); when it is None the algorithm is
        derived from the HMAC key's KeySpec.
        """
        pinned = mac_algorithm if mac_algorithm is not None else settings.kms_mac_algorithm
        if pinned is not None:
            _validate_algorithm_name(pinned)
        self._settings = settings
        self._pinned_algorithm = pinned
        _install_redactor()
        if client is None:
            client = _new_client(settings)
        self._client = client
        self._hmac_spec: str | None = None
        # The keys Decrypt may name, primary first, each with the variable that named it (for messages).
        self._unwrap_keys: tuple[tuple[str, str], ...] = (
            (settings.application_cmk_id, "KMS_APPLICATION_CMK_ID"),
            *((key, ACCEPTED_CMKS_ENV) for key in settings.accepted_cmk_ids if key != settings.application_cmk_id),
        )
        # Index of the key that opened the last blob, tried first next time: during a rewrap most blobs are
        # under one key, so a cache miss costs one Decrypt, not one per allowed key.
        self._preferred = 0
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._latency_total = 0.0
        self._latency_last = 0.0
        # Per operation, for app_adapter.metrics: errors by class, a latency histogram (one count per bucket of
        # LATENCY_BUCKETS, then +Inf; sum), and throttled answers, which botocore may retry into a success.
        self._errors_by_operation: Counter[tuple[str, str]] = Counter()
        self._latency_buckets: dict[str, list[int]] = {}
        self._latency_sums: dict[str, float] = {}
        self._throttled: Counter[str] = Counter()
        events = getattr(getattr(client, "meta", None), "events", None)
        if events is not None:
            events.register("needs-retry.kms", self._note_attempt)

    def __repr__(self) -> str:
        return (
            f"KmsKeys(region={self._settings.aws_region!r}, "
            f"hmac_key_id={self._settings.hmac_key_id!r}, "
            f"cmk_id={self._settings.application_cmk_id!r}, "
            f"accepted_cmk_ids={self._settings.accepted_cmk_ids!r})"
        )

    @property
    def unwrap_key_ids(self) -> tuple[str, ...]:
        """The CMKs a Decrypt may name, as configured: ``KMS_APPLICATION_CMK_ID`` first, then the accepted ones."""
        return tuple(key for key, _ in self._unwrap_keys)

    @property
    def client(self) -> Any:
        """The botocore KMS client (for event hooks and stubbing in tests)."""
        return self._client

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    def __enter__(self) -> KmsKeys:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- key checks ---------------------------------------------------------

    def check_keys(self) -> KeyCheck:
        """DescribeKey both keys and each accepted CMK, and refuse any that real KMS would refuse.

        Raises :class:`KeyUnavailable` when a key is not Enabled (disabled,
        pending deletion...), or has the wrong usage or spec, and
        :class:`MacAlgorithmMismatch` when a pinned MAC algorithm does not
        match the HMAC key. Call it at startup: emulators accept calls on
        keys in any state, so tests would otherwise miss these failures.
        """
        hmac_meta = self._describe_hmac_key()
        algorithm = HMAC_SPEC_TO_ALGORITHM[hmac_meta["KeySpec"]]
        if self._pinned_algorithm is not None:
            self._check_pin(self._pinned_algorithm, algorithm, hmac_meta["KeySpec"])

        cmk_meta = self._describe(self._settings.application_cmk_id, "KMS_APPLICATION_CMK_ID")
        self._require(
            cmk_meta,
            "KMS_APPLICATION_CMK_ID",
            self._settings.application_cmk_id,
            usage="ENCRYPT_DECRYPT",
            specs=("SYMMETRIC_DEFAULT",),
        )
        # An accepted key that could not decrypt is refused like the primary: it would fail only later, on the
        # first cache miss of a user whose blob it wraps, and emulators would never say so.
        accepted = tuple(self.check_cmk(key, ACCEPTED_CMKS_ENV) for key, _ in self._unwrap_keys[1:])
        return KeyCheck(
            hmac_key_arn=hmac_meta["Arn"],
            hmac_key_spec=hmac_meta["KeySpec"],
            mac_algorithm=algorithm,
            cmk_arn=cmk_meta["Arn"],
            accepted_arns=accepted,
        )

    def mac_algorithm(self) -> str:
        """The HMAC key's one MAC algorithm, from its KeySpec.

        The first call runs DescribeKey (unless :meth:`check_keys` already
        did); the answer is kept for the life of this object.
        """
        spec = self._hmac_spec
        if spec is None:
            spec = self._describe_hmac_key()["KeySpec"]
        return HMAC_SPEC_TO_ALGORITHM[spec]

    # -- user ids -----------------------------------------------------------

    def user_id(self, email: str, *, mac_algorithm: str | None = None) -> str:
        """The UUID-shaped user id of ``email``: GenerateMac, then :func:`uuid_from_mac`.

        The email is stripped and lowercased first, so case and surrounding
        blanks do not make a second identity. An explicit ``mac_algorithm``
        (or the pinned one) must match the key; it is checked before
        GenerateMac is called.
        """
        if not isinstance(email, str):
            raise InvalidInput(f"email must be a str, got {type(email).__name__}")
        message = email.strip().lower().encode("utf-8")
        if not message:
            raise InvalidInput("email is empty")
        if len(message) > MAX_MAC_MESSAGE_BYTES:
            # Length only: the email is personal data.
            raise InvalidInput(
                f"email is {len(message)} bytes in UTF-8; KMS GenerateMac takes at most "
                f"{MAX_MAC_MESSAGE_BYTES}"
            )
        wanted = mac_algorithm if mac_algorithm is not None else self._pinned_algorithm
        if wanted is not None:
            _validate_algorithm_name(wanted)
        algorithm = self.mac_algorithm()
        if wanted is not None:
            self._check_pin(wanted, algorithm, self._hmac_spec or "?")
        response = self._call(
            "GenerateMac",
            "KMS_HMAC_KEY_ID",
            self._settings.hmac_key_id,
            KeyId=self._settings.hmac_key_id,
            Message=message,
            MacAlgorithm=algorithm,
        )
        return uuid_from_mac(response["Mac"])

    # -- user DEKs ------------------------------------------------------------

    def new_dek(self, user_id: str) -> tuple[SecretBytes, bytes]:
        """A fresh 32-byte DEK for ``user_id`` and its KMS-wrapped copy.

        One GenerateDataKey call; the DEK comes from KMS's random generator.
        """
        context = _user_context(user_id)
        response = self._call(
            "GenerateDataKey",
            "KMS_APPLICATION_CMK_ID",
            self._settings.application_cmk_id,
            KeyId=self._settings.application_cmk_id,
            NumberOfBytes=DEK_BYTES,
            EncryptionContext=context,
        )
        dek = SecretBytes(response["Plaintext"])
        if len(dek) != DEK_BYTES:
            raise KmsError(f"KMS GenerateDataKey returned {len(dek)} bytes, asked for {DEK_BYTES}")
        return dek, bytes(response["CiphertextBlob"])

    def wrap_dek(self, user_id: str, dek: SecretBytes | bytes) -> bytes:
        """Encrypt ``dek`` under the CMK, bound to ``user_id``."""
        plaintext = _reveal(dek)
        if len(plaintext) != DEK_BYTES:
            raise InvalidInput(f"a DEK is {DEK_BYTES} bytes, got {len(plaintext)}")
        return self._encrypt(plaintext, _user_context(user_id))

    def unwrap_dek(self, user_id: str, blob: bytes) -> SecretBytes:
        """Decrypt a blob from :meth:`wrap_dek`/:meth:`new_dek` for ``user_id``.

        A blob of another user, another key or another purpose raises
        :class:`CannotUnwrap`.
        """
        return self.unwrap_dek_with_key(user_id, blob)[0]

    def unwrap_dek_with_key(self, user_id: str, blob: bytes) -> tuple[SecretBytes, str]:
        """:meth:`unwrap_dek`, and the ARN of the key (primary or accepted) that opened it, as KMS names it."""
        dek, key_arn = self._open(blob, _user_context(user_id), f"the wrapped DEK of user {user_id!r}")
        if len(dek) != DEK_BYTES:
            raise CannotUnwrap(
                f"the wrapped DEK of user {user_id!r} opened to {len(dek)} bytes, "
                f"not {DEK_BYTES}: it is not a DEK"
            )
        return dek, key_arn

    # -- deployment keys ---------------------------------------------------

    def wrap_deployment_key(self, name: str, key: SecretBytes | bytes) -> bytes:
        """Encrypt a deployment-wide key (e.g. the share key) bound to ``name``."""
        plaintext = _reveal(key)
        if not 1 <= len(plaintext) <= _MAX_PLAINTEXT_BYTES:
            raise InvalidInput(
                f"a deployment key is 1 to {_MAX_PLAINTEXT_BYTES} bytes, got {len(plaintext)}"
            )
        return self._encrypt(plaintext, _deployment_context(name))

    def unwrap_deployment_key(self, name: str, blob: bytes) -> SecretBytes:
        """Decrypt a blob from :meth:`wrap_deployment_key` with the same ``name``."""
        return self._open(blob, _deployment_context(name), f"the wrapped deployment key {name!r}")[0]

    # -- moving wrapped keys to another CMK ---------------------------------

    def key_arn(self, key_id: str, variable: str) -> str:
        """The ARN of ``key_id`` (a key id, ARN or alias), by DescribeKey.

        ReEncrypt reports keys by ARN; comparing against what the operator
        typed (an alias, a bare id) needs this. ``variable`` names where the
        id came from, for the error message.
        """
        return str(self._describe(key_id, variable)["Arn"])

    def check_cmk(self, key_id: str, variable: str) -> str:
        """The ARN of ``key_id`` after checking it could be the application CMK.

        Enabled, ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT, as :meth:`check_keys`
        demands of ``KMS_APPLICATION_CMK_ID``: a rewrap onto a key the adapter
        would then refuse to start with must stop before it writes anything.
        """
        meta = self._describe(key_id, variable)
        self._require(meta, variable, key_id, usage="ENCRYPT_DECRYPT", specs=("SYMMETRIC_DEFAULT",))
        return str(meta["Arn"])

    def reencrypt_dek(self, user_id: str, blob: bytes, target_key_id: str) -> Rewrapped:
        """ReEncrypt a blob of :meth:`wrap_dek`/:meth:`new_dek` under ``target_key_id``.

        The DEK never leaves KMS. The encryption context is the one
        :meth:`unwrap_dek` uses, on both sides, so the new blob opens exactly
        where the old one did once ``KMS_APPLICATION_CMK_ID`` names the
        target. No SourceKeyId is sent: KMS takes the source key from the
        blob, and the caller checks :attr:`Rewrapped.source_key_arn`.
        """
        return self._reencrypt(blob, _user_context(user_id), target_key_id, f"the wrapped DEK of user {user_id!r}")

    def reencrypt_deployment_key(self, name: str, blob: bytes, target_key_id: str) -> Rewrapped:
        """As :meth:`reencrypt_dek`, for a blob of :meth:`wrap_deployment_key` named ``name``."""
        return self._reencrypt(blob, _deployment_context(name), target_key_id,
                               f"the wrapped deployment key {name!r}")

    def _reencrypt(self, blob: bytes, context: dict[str, str], target_key_id: str, what: str) -> Rewrapped:
        if not isinstance(blob, (bytes, bytearray, memoryview)) or not blob:
            raise CannotUnwrap(f"{what} is empty or not bytes")
        response = self._call(
            "ReEncrypt",
            "the target CMK",
            target_key_id,
            what=what,
            CiphertextBlob=bytes(blob),
            SourceEncryptionContext=context,
            DestinationKeyId=target_key_id,
            DestinationEncryptionContext=context,
        )
        return Rewrapped(
            blob=bytes(response["CiphertextBlob"]),
            source_key_arn=str(response["SourceKeyId"]),
            key_arn=str(response["KeyId"]),
        )

    def cmk_arn(self) -> str:
        """The application CMK's ARN, by DescribeKey once per object.

        CreateGrant, ListGrants and RetireGrant take a key id or ARN, not an alias, and a grant listed by
        ListGrants names its key by ARN.
        """
        # Kept on first use rather than set up in __init__: grants are opt-in, and only they need the ARN.
        arn: str | None = getattr(self, "_grant_cmk_arn", None)
        if arn is None:
            arn = self.key_arn(self._settings.application_cmk_id, "KMS_APPLICATION_CMK_ID")
            self._grant_cmk_arn = arn
        return arn

    def create_user_grant(self, user_id: str, grantee_arn: str, name: str,
                          operations: tuple[str, ...]) -> tuple[str, str]:
        """CreateGrant on the CMK: ``operations`` for ``grantee_arn``, only with ``user_id``'s exact context.

        ``grantee_arn`` is also the retiring principal. Returns ``(grant id, grant token)``. KMS returns the
        existing grant's id for a retry with the same ``name`` and parameters, so a retried call makes no
        second grant.
        """
        response = self._call(
            "CreateGrant", "KMS_APPLICATION_CMK_ID", self._settings.application_cmk_id,
            what=f"the grant of user {user_id!r}",
            KeyId=self.cmk_arn(),
            GranteePrincipal=grantee_arn,
            RetiringPrincipal=grantee_arn,
            Operations=list(operations),
            Constraints={"EncryptionContextEquals": _user_context(user_id)},
            Name=name,
        )
        return str(response["GrantId"]), str(response["GrantToken"])

    def list_grants(self) -> list[KmsGrant]:
        """Every grant on the CMK (ListGrants, all pages of 100)."""
        grants: list[KmsGrant] = []
        params: dict[str, Any] = {"KeyId": self.cmk_arn(), "Limit": 100}
        while True:
            response = self._call("ListGrants", "KMS_APPLICATION_CMK_ID", self._settings.application_cmk_id,
                                  what="the CMK's grants", **params)
            grants.extend(KmsGrant.from_entry(entry) for entry in response.get("Grants", []))
            marker = response.get("NextMarker")
            if not response.get("Truncated") or not marker:
                return grants
            params["Marker"] = marker

    def retire_grant(self, grant_id: str) -> bool:
        """RetireGrant (by key ARN and grant id, as the retiring principal). False: KMS knows no such grant."""
        try:
            self._call("RetireGrant", "KMS_APPLICATION_CMK_ID", self._settings.application_cmk_id,
                       what=f"grant {grant_id}", KeyId=self.cmk_arn(), GrantId=grant_id)
        except KeyUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and \
                    cause.response.get("Error", {}).get("Code") == "NotFoundException":
                return False  # retired already (by another process, or an administrator's RevokeGrant)
            raise
        return True

    def unwrap_dek_with_grant_tokens(self, user_id: str, blob: bytes, grant_tokens: tuple[str, ...]) -> SecretBytes:
        """:meth:`unwrap_dek`, presenting grant tokens.

        A grant takes effect everywhere in KMS within about five minutes; its token makes it usable at once,
        so a user's first Decrypt right after sign-up does not depend on how fast the grant spreads.
        """
        dek, _ = self._open(blob, _user_context(user_id), f"the wrapped DEK of user {user_id!r}", grant_tokens)
        if len(dek) != DEK_BYTES:
            raise CannotUnwrap(f"the wrapped DEK of user {user_id!r} opened to {len(dek)} bytes, not {DEK_BYTES}")
        return dek

    def metrics(self) -> dict[str, Any]:
        """Counters since creation, as plain data.

        ``calls`` by KMS operation (one per API call; botocore's retries
        inside a call are not counted apart), ``errors`` by exception class, and KMS latency in seconds:
        ``latency_seconds_total`` over all calls and ``latency_seconds_last``.

        Per operation, for :mod:`app_adapter.metrics`: ``errors_by_operation`` (operation -> class -> count),
        ``throttled_answers`` (throttling answers of KMS, each attempt counted, retried ones included), and
        ``latency`` (operation -> ``buckets``: cumulative ``(upper bound, count)`` pairs over
        :data:`LATENCY_BUCKETS` then ``inf``, ``sum`` in seconds, ``count``).
        """
        with self._lock:
            errors_by_operation: dict[str, dict[str, int]] = {}
            for (operation, error), count in self._errors_by_operation.items():
                errors_by_operation.setdefault(operation, {})[error] = count
            latency: dict[str, dict[str, Any]] = {}
            for operation, counts in self._latency_buckets.items():
                cumulative = list(itertools.accumulate(counts))
                latency[operation] = {
                    "buckets": list(zip((*LATENCY_BUCKETS, math.inf), cumulative, strict=True)),
                    "sum": self._latency_sums[operation],
                    "count": cumulative[-1],
                }
            return {
                "calls": dict(self._calls),
                "errors": dict(self._errors),
                "latency_seconds_total": self._latency_total,
                "latency_seconds_last": self._latency_last,
                "errors_by_operation": errors_by_operation,
                "throttled_answers": dict(self._throttled),
                "latency": latency,
            }

    # -- internals ----------------------------------------------------------

    def _describe_hmac_key(self) -> dict[str, Any]:
        meta = self._describe(self._settings.hmac_key_id, "KMS_HMAC_KEY_ID")
        self._require(
            meta,
            "KMS_HMAC_KEY_ID",
            self._settings.hmac_key_id,
            usage="GENERATE_VERIFY_MAC",
            specs=tuple(HMAC_SPEC_TO_ALGORITHM),
        )
        algorithm = HMAC_SPEC_TO_ALGORITHM[meta["KeySpec"]]
        # Real KMS lists the key's algorithms (moto omits the field); a
        # disagreement means our table is out of date, so stop.
        listed = meta.get("MacAlgorithms")
        if listed is not None and algorithm not in listed:
            raise KeyUnavailable(
                f"KMS_HMAC_KEY_ID={self._settings.hmac_key_id}: KeySpec {meta['KeySpec']} "
                f"should support {algorithm} but KMS lists {', '.join(listed) or 'none'}"
            )
        self._hmac_spec = meta["KeySpec"]
        return meta

    def _describe(self, key_id: str, variable: str) -> dict[str, Any]:
        response = self._call("DescribeKey", variable, key_id, KeyId=key_id)
        meta: dict[str, Any] = response["KeyMetadata"]
        return meta

    @staticmethod
    def _require(
        meta: Mapping[str, Any], variable: str, key_id: str, *, usage: str, specs: tuple[str, ...]
    ) -> None:
        state = meta.get("KeyState")
        if state != "Enabled" or not meta.get("Enabled", False):
            raise KeyUnavailable(
                f"{variable}={key_id} is in state {state}; it must be Enabled "
                "(enable it, or cancel its scheduled deletion, or point "
                f"{variable} at another key)"
            )
        if meta.get("KeyUsage") != usage or meta.get("KeySpec") not in specs:
            raise KeyUnavailable(
                f"{variable}={key_id} has KeyUsage {meta.get('KeyUsage')} and KeySpec "
                f"{meta.get('KeySpec')}; expected KeyUsage {usage} with KeySpec "
                f"{' or '.join(specs)}"
            )

    def _check_pin(self, wanted: str, algorithm: str, spec: str) -> None:
        if wanted != algorithm:
            raise MacAlgorithmMismatch(
                f"MAC algorithm {wanted} was asked for, but KMS_HMAC_KEY_ID="
                f"{self._settings.hmac_key_id} has KeySpec {spec}, which supports only "
                f"{algorithm}; fix OWUI_CRYPTO_KMS_MAC_ALGORITHM or the key id"
            )

    def _encrypt(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        response = self._call(
            "Encrypt",
            "KMS_APPLICATION_CMK_ID",
            self._settings.application_cmk_id,
            KeyId=self._settings.application_cmk_id,
            Plaintext=plaintext,
            EncryptionContext=context,
        )
        return bytes(response["CiphertextBlob"])

    def _open(self, blob: bytes, context: dict[str, str], what: str,
              grant_tokens: tuple[str, ...] = ()) -> tuple[SecretBytes, str]:
        """Decrypt ``blob`` naming each allowed key in turn; the plaintext and the ARN of the key that opened it.

        An explicit KeyId makes KMS refuse a blob made under any other key instead of quietly using whichever
        key made it, so a blob of a key that is neither the primary nor accepted opens under none. A key that
        does not fit (IncorrectKeyException; moto: AccessDeniedException) or is unavailable sends us to the
        next one; throttling or an unreachable KMS stops at once (another key would not help). Only the error
        finally raised counts as an error in :meth:`metrics`: a miss on the way is not a failure.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)) or not blob:
            raise CannotUnwrap(f"{what} is empty or not bytes")
        keys = self._unwrap_keys
        first = self._preferred
        extra = {"GrantTokens": list(grant_tokens)} if grant_tokens else {}
        missed: list[CannotUnwrap | KeyUnavailable] = []
        for index in (*range(first, len(keys)), *range(first)):
            key_id, variable = keys[index]
            try:
                response = self._call("Decrypt", variable, key_id, what=what, count_errors=False, KeyId=key_id,
                                      CiphertextBlob=bytes(blob), EncryptionContext=context, **extra)
            except (CannotUnwrap, KeyUnavailable) as exc:
                missed.append(exc)
                continue
            except (KmsError, InvalidInput) as exc:
                self._count_error("Decrypt", exc)
                raise
            self._preferred = index
            return SecretBytes(response["Plaintext"]), str(response.get("KeyId") or key_id)
        error = _unwrap_failure(missed, what)
        self._count_error("Decrypt", error)
        if error is missed[0]:
            raise error
        raise error from missed[0]

    def _call(self, operation: str, variable: str, key_id: str, *, what: str = "", count_errors: bool = True,
              **params: Any) -> Any:
        """One KMS request: counted, timed, and its errors translated into ours (never quoting parameters).
        The operation is the service's (``_SNAKE_CASE``), an operator command's or erasure's. With
        ``count_errors=False`` the caller decides whether a failure counts as an error."""
        method = getattr(self._client, _ALL_SNAKE_CASE[operation])
        with self._lock:
            self._calls[operation] += 1
        started = time.perf_counter()
        try:
            return method(**params)
        except botocore.exceptions.ParamValidationError:
            error: KmsError | InvalidInput | CannotUnwrap = InvalidInput(
                f"KMS {operation} refused its parameters before sending (a bug in the caller)"
            )
            if count_errors:
                self._count_error(operation, error)
            # Its text quotes parameter values, which include our plaintext.
            raise error from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            error = self._translate(exc, operation, variable, key_id, what)
            if count_errors:
                self._count_error(operation, error)
            raise error from exc
        finally:
            self._record_latency(operation, time.perf_counter() - started)

    def _count_error(self, operation: str, error: Exception) -> None:
        with self._lock:
            self._errors[type(error).__name__] += 1
            self._errors_by_operation[operation, type(error).__name__] += 1

    def _record_latency(self, operation: str, elapsed: float) -> None:
        with self._lock:
            self._latency_total += elapsed
            self._latency_last = elapsed
            buckets = self._latency_buckets.setdefault(operation, [0] * (len(LATENCY_BUCKETS) + 1))
            buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1  # le: a value on a bound counts in it
            self._latency_sums[operation] = self._latency_sums.get(operation, 0.0) + elapsed

    def _note_attempt(self, response: Any = None, operation: Any = None, **_: Any) -> None:
        """botocore's ``needs-retry`` event: every answer of every attempt passes here, so a throttled answer
        that botocore retried into a success is counted too (the call's errors never show it). Returns None:
        the retry decision stays botocore's."""
        if not response:
            return  # no answer: a connection error, counted by the call if it fails
        code = response[1].get("Error", {}).get("Code") if isinstance(response[1], dict) else None
        if code in _THROTTLED_CODES:
            with self._lock:
                self._throttled[str(getattr(operation, "name", "unknown"))] += 1

    def _translate(
        self, exc: Exception, operation: str, variable: str, key_id: str, what: str
    ) -> KmsError | CannotUnwrap:
        where = f"KMS {operation} on {variable}={key_id}"
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            if code in _CANNOT_UNWRAP_CODES or (
                code == "AccessDeniedException" and operation in _UNWRAP_OPERATIONS
            ):
                # moto answers AccessDeniedException when an explicit KeyId
                # does not match the blob; real KMS says IncorrectKeyException.
                return CannotUnwrap(
                    f"{where} failed ({code}): {what or 'the blob'} was not made by this key "
                    "for this owner, or is corrupt"
                )
            if code in _KEY_UNAVAILABLE_CODES:
                return KeyUnavailable(
                    f"{where} failed ({code}): check that the key exists in "
                    f"{self._settings.aws_region}, is Enabled, has the right usage, and "
                    "that this process's AWS credentials may use it"
                )
            if code in _THROTTLED_CODES:
                return KmsThrottled(
                    f"{where} was throttled ({code}): the account's KMS request quota is "
                    "exhausted; retry later, raise OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS to "
                    "call KMS less, or ask AWS for a higher quota"
                )
            if code in _UNREACHABLE_CODES:
                return KmsUnreachable(f"{where} failed on the KMS side ({code}); retry later")
            return KmsError(f"{where} failed ({code})")
        # ConnectionError covers EndpointConnectionError and
        # ConnectTimeoutError; HTTPClientError covers ReadTimeoutError and
        # ConnectionClosedError. botocore has retried them already.
        if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return KmsUnreachable(
                f"{where}: no answer from {self._client.meta.endpoint_url} "
                f"({type(exc).__name__}) after {self._settings.kms_max_attempts} attempt(s); "
                "check AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL, the network path, and "
                "OWUI_CRYPTO_KMS_CONNECT_TIMEOUT / OWUI_CRYPTO_KMS_READ_TIMEOUT"
            )
        if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
            return KeyUnavailable(
                f"{where}: no usable AWS credentials ({type(exc).__name__}); configure "
                "the standard chain (AWS_ACCESS_KEY_ID..., AWS_PROFILE, a task/instance role)"
            )
        return KmsError(f"{where} failed ({type(exc).__name__})")


_SNAKE_CASE = {
    "DescribeKey": "describe_key",
    "GenerateMac": "generate_mac",
    "GenerateDataKey": "generate_data_key",
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
}

#: The KMS operations the service calls (app_adapter.metrics exports a zero series for each from the start).
SERVICE_OPERATIONS: tuple[str, ...] = tuple(_SNAKE_CASE)

#: Operations of erasure that reaches backups (``OWUI_CRYPTO_ERASURE=grants``, :mod:`app_adapter.erasure`). Kept
#: out of ``_SNAKE_CASE`` as well: the default policy allows none of them, ``iam.task_role_policy`` with
#: ``erasure="grants"`` allows CreateGrant and ListGrants; RetireGrant is authorized by the grant itself.
_GRANT_SNAKE_CASE = {
    "CreateGrant": "create_grant",
    "ListGrants": "list_grants",
    "RetireGrant": "retire_grant",
}

#: Operations of operator commands (``owui-crypto rewrap``), never of the service. Kept out of
#: ``_SNAKE_CASE``, which is exactly what the task role's IAM policy allows (tests/test_deploy.py).
_OPERATOR_SNAKE_CASE = {
    "ReEncrypt": "re_encrypt",
}


_ALL_SNAKE_CASE = {**_SNAKE_CASE, **_GRANT_SNAKE_CASE, **_OPERATOR_SNAKE_CASE}


def _unwrap_failure(missed: list[CannotUnwrap | KeyUnavailable], what: str) -> CannotUnwrap | KeyUnavailable:
    """The one error of a blob no allowed key opened: with one key, its own; else an unavailable key's (the blob
    may be under it: the operator must act), or a CannotUnwrap naming every key tried."""
    if len(missed) == 1:
        return missed[0]
    unavailable = [m for m in missed if isinstance(m, KeyUnavailable)]
    if unavailable:
        return unavailable[0]
    tried = "; ".join(str(m).split(" failed ", 1)[0].removeprefix("KMS Decrypt on ") + f" ({_code(m)})"
                      for m in missed)
    return CannotUnwrap(f"KMS Decrypt: {what or 'the blob'} opens under none of the allowed CMKs ({tried}): it was "
                        "made by another key or for another owner, or is corrupt")


def _code(error: Exception) -> str:
    cause = error.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        return str(cause.response.get("Error", {}).get("Code", "Unknown"))
    return type(error).__name__


def _validate_algorithm_name(name: str) -> None:
    if name not in MAC_ALGORITHMS:
        raise InvalidInput(f"{name!r} is not a KMS MAC algorithm; expected one of {', '.join(MAC_ALGORITHMS)}")


def _user_context(user_id: str) -> dict[str, str]:
    if not isinstance(user_id, str) or not user_id:
        raise InvalidInput("user_id must be a non-empty str")
    return {"purpose": _USER_DEK_PURPOSE, "application": APPLICATION, "user_id": user_id}


def _deployment_context(name: str) -> dict[str, str]:
    if not isinstance(name, str) or not name:
        raise InvalidInput("a deployment key name must be a non-empty str")
    return {"purpose": _DEPLOYMENT_KEY_PURPOSE, "application": APPLICATION, "name": name}


def _reveal(key: SecretBytes | bytes) -> bytes:
    if isinstance(key, SecretBytes):
        return key.reveal()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidInput(f"key material must be SecretBytes or bytes, got {type(key).__name__}")
