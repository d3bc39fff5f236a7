"""Settings of owui-crypto, read once from the environment.

Only *what* to use is configured here: the region and the two KMS keys, the
key cache, and how long to wait for KMS. *Where* KMS is and *who* we are come
solely from boto3's standard mechanisms (``AWS_ENDPOINT_URL_KMS``,
``AWS_ENDPOINT_URL``, the credentials chain, ``AWS_PROFILE``...), so the
same deployment tooling that configures any other AWS client configures
this one.

A missing or malformed value raises :class:`~app_adapter.errors.ConfigError`
naming the variable and showing a valid value; an empty value counts as
unset.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from app_adapter.errors import ConfigError

__all__ = ["ACCEPTED_CMKS_ENV", "ENV_VARS", "MAC_ALGORITHMS", "OWNER_SECRET_ENV", "OWNER_URL_ENV",
           "TRANSACTION_POOLER_ENV", "Settings", "accepted_cmk_ids", "settings_table_markdown"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: KMS MAC algorithms; each HMAC KeySpec supports exactly one of them.
MAC_ALGORITHMS = ("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512")

# Upper bound on total attempts: with standard-mode backoff and the default
# timeouts, 10 attempts already mean ~40 s of blocking in the worst case.
_MAX_ATTEMPTS_CEILING = 10

#: (name, default or None when required, description): the README table.
#: serve's switch for poolers in transaction mode without prepared statements (app_adapter.owui.launcher).
TRANSACTION_POOLER_ENV = "OWUI_CRYPTO_TRANSACTION_POOLER"

ENV_VARS: tuple[tuple[str, str | None, str], ...] = (
    ("AWS_REGION", None, "AWS region of the KMS keys, e.g. `us-east-1`."),
    (
        "KMS_HMAC_KEY_ID",
        None,
        "KMS HMAC key (KeySpec HMAC_224/256/384/512) that turns an email into a "
        "user id with GenerateMac. Key id, key ARN, alias name or alias ARN.",
    ),
    (
        "KMS_APPLICATION_CMK_ID",
        None,
        "KMS symmetric encryption key (SYMMETRIC_DEFAULT) that wraps each user's "
        "DEK and the deployment keys. Key id, key ARN, alias name or alias ARN.",
    ),
    (
        "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS",
        "",
        "Comma-separated CMKs (key id, key ARN, alias name or alias ARN) whose wrapped keys are also opened, each "
        "Decrypt still naming its key; nothing is wrapped under them. For moving to another CMK with "
        "`owui-crypto rewrap` while serving (README, \"Operating: doctor and rewrap\"): the new key before the "
        "rewrap, the old one after the switch. A blob under any other key is refused.",
    ),
    (
        "OWUI_CRYPTO_KMS_MAC_ALGORITHM",
        "",
        "Optional pin of the MAC algorithm (`HMAC_SHA_224`...`HMAC_SHA_512`). "
        "Empty: derived from the HMAC key's KeySpec. Set it to refuse to start "
        "if the HMAC key is ever swapped for one of another spec.",
    ),
    (
        "OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS",
        "300",
        "Seconds an unwrapped DEK stays in the per-process cache (> 0).",
    ),
    (
        "OWUI_CRYPTO_KEY_CACHE_SIZE",
        "10000",
        "Most DEKs kept in the per-process cache; least recently used go first (> 0).",
    ),
    (
        "OWUI_CRYPTO_KMS_CONNECT_TIMEOUT",
        "2",
        "Seconds to wait for a TCP/TLS connection to KMS (> 0).",
    ),
    (
        "OWUI_CRYPTO_KMS_READ_TIMEOUT",
        "2",
        "Seconds to wait for a KMS answer on an open connection (> 0).",
    ),
    (
        "OWUI_CRYPTO_KMS_MAX_ATTEMPTS",
        "2",
        "Total attempts per KMS call, first one included (botocore `standard` "
        f"retry mode, 1..{_MAX_ATTEMPTS_CEILING}).",
    ),
    (
        "OWUI_CRYPTO_USER_SECRET_PROVIDER",
        "",
        "Off by default. `module:function` called with a user id; it returns bytes the user holds "
        "(e.g. from a client certificate) or None. Only then is a user-held copy of the DEK "
        "(`user_encrypted_dek`, `salt`) written; nothing the database holds can open it.",
    ),
    (
        "OWUI_CRYPTO_METRICS_PORT",
        "",
        "Off by default. Port on which `owui-crypto serve` exports Prometheus metrics (`/metrics`), bound to "
        "127.0.0.1; `HOST:PORT` binds another address (an IP literal, e.g. `0.0.0.0:9464` for a scraper "
        "outside the container). Counts and latencies only: no user id, email or key.",
    ),
    (
        "OWUI_CRYPTO_ERASURE",
        "off",
        "`off` or `grants`. `grants`: each user's `kms:Decrypt` comes from a KMS grant on the application CMK "
        "that deleting the user retires, so a backup taken before the deletion no longer opens their key "
        "(README, \"Erasure that reaches backups\"). The task role and key policies must then be what "
        "`owui-crypto iam-policy` prints with this variable set.",
    ),
    (
        "OWUI_CRYPTO_ERASURE_GRANTEE",
        "",
        "With `OWUI_CRYPTO_ERASURE=grants`, required: the ARN of the role that runs owui-crypto (the ECS task "
        "role, `arn:aws:iam::ACCOUNT:role/NAME`); it receives each user's grant and retires it.",
    ),
    (
        "OWUI_CRYPTO_OWNER_DATABASE_URL",
        "",
        "Off by default (one role). The URL of the role that owns owui-crypto's objects and Open WebUI's tables "
        "(`postgresql+psycopg://OWNER:PASSWORD@HOST:5432/DBNAME`, or its password in `~/.pgpass`). Set: "
        "`owui-crypto serve` migrates, checks and grants with it at start, then serves Open WebUI as "
        "`DATABASE_URL`'s role, which it refuses if that role could act as the owner (README, \"Two roles\"). "
        "Taken out of the environment before Open WebUI is imported.",
    ),
    (
        "OWUI_CRYPTO_OWNER_DB_SECRET_ARN",
        "",
        "Off by default. The owner's password from Secrets Manager instead of its URL: ARN of a secret as RDS "
        "writes it (the master user's), read by `owui-crypto serve` with its own role at start; "
        "`OWUI_CRYPTO_OWNER_DATABASE_URL` then names only what the secret lacks (`postgresql+psycopg:///DBNAME`), "
        "or is unset. Set, two roles as with `OWUI_CRYPTO_OWNER_DATABASE_URL`; the password stays in the memory "
        "of serve's start-up, never in the environment or a log.",
    ),
    # Database access (app_adapter.aurora; README, "Connecting to Aurora").
    (
        "OWUI_CRYPTO_DB_SECRET_ARN",
        "",
        "Off by default. ARN of a Secrets Manager secret as RDS writes it (JSON `username`, `password`, `host`, "
        "`port`, `dbname`): owui-crypto reads it with its own role and builds the database URL from it; "
        "`DATABASE_URL` then names only what the secret lacks, or is unset. The password goes to each new "
        "connection in memory: never into `DATABASE_URL`, the environment or a log.",
    ),
    (
        "OWUI_CRYPTO_DB_IAM_AUTH",
        "false",
        "`true`: RDS IAM authentication. Each new connection gets a fresh token (signed locally with the role's "
        "credentials, valid 15 minutes) as its password, for the user and host of `DATABASE_URL`. Open WebUI's "
        "`DATABASE_ENABLE_IAM_TOKEN_AUTH=true` means the same.",
    ),
    (
        "OWUI_CRYPTO_DB_USER_ARN",
        "",
        "For `owui-crypto iam-policy`: the database user's ARN (`arn:aws:rds-db:REGION:ACCOUNT:dbuser:"
        "RESOURCE_ID/USER`); adds `rds-db:connect` on it. Required with IAM authentication.",
    ),
    (
        "OWUI_CRYPTO_DB_CA_BUNDLE",
        "",
        "Path of the RDS CA bundle (`global-bundle.pem`). Set: every connection uses `sslmode=verify-full` with it "
        "as `sslrootcert`; a missing file refuses to start.",
    ),
    (
        TRANSACTION_POOLER_ENV,
        "false",
        "`true`: `DATABASE_URL` reaches PostgreSQL through a pooler in transaction mode that keeps no prepared "
        "statements (PgBouncer before 1.21, or with `max_prepared_statements = 0`). `owui-crypto serve` then turns "
        "off psycopg's server-side prepared statements on Open WebUI's engines (`prepare_threshold = None`, as "
        "psycopg asks for such poolers); otherwise a statement prepared on one backend is executed on another: "
        "\"prepared statement ... does not exist\" (a 500), or a serve that cannot start after a restart.",
    ),
)

#: The owner's URL for ``owui-crypto serve`` with two roles (app_adapter.owui.launcher); doctor and check read it.
OWNER_URL_ENV = "OWUI_CRYPTO_OWNER_DATABASE_URL"
#: The owner's secret (an RDS secret's ARN), read by serve itself: the deployment kit's way to the master user.
OWNER_SECRET_ENV = "OWUI_CRYPTO_OWNER_DB_SECRET_ARN"


def two_roles(environ: Mapping[str, str]) -> bool:
    """Whether owui-crypto serve gets the owner's connection apart from DATABASE_URL (README, "Two roles")."""
    return any((environ.get(name) or "").strip() for name in (OWNER_URL_ENV, OWNER_SECRET_ENV))

#: Removed: storing the user key next to the DEK it wraps gave the DEK to
#: anyone who reads the table. Set to a true value, it now refuses to start.
REMOVED_STORE_USER_KEY = "OWUI_CRYPTO_STORE_USER_KEY"

_DEFAULTS = {name: default for name, default, _ in ENV_VARS}

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_KEY_ID = rf"(?:{_UUID}|mrk-[0-9a-f]{{32}})"
_ALIAS = r"alias/[A-Za-z0-9/_-]{1,250}"
_KEY_REF_RE = re.compile(
    rf"^(?:{_KEY_ID}|{_ALIAS}"
    rf"|arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):\d{{12}}:(?:key/{_KEY_ID}|{_ALIAS}))$"
)
_KEY_REF_EXAMPLE = (
    "a key id (1234abcd-12ab-34cd-56ef-1234567890ab), a key ARN "
    "(arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab), "
    "an alias name (alias/owui-users) or an alias ARN"
)

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated settings; build them with :meth:`from_env`.

    Holds identifiers and tuning only -- nothing here is secret.
    """

    aws_region: str
    hmac_key_id: str
    application_cmk_id: str
    #: CMKs only unwrapped with (a rewrap in progress), never wrapped under; the primary is never among them.
    accepted_cmk_ids: tuple[str, ...] = ()
    kms_mac_algorithm: str | None = None
    key_cache_ttl_seconds: float = 300.0
    key_cache_size: int = 10_000
    kms_connect_timeout: float = 2.0
    kms_read_timeout: float = 2.0
    kms_max_attempts: int = 2
    user_secret_provider: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    erasure: str = "off"
    erasure_grantee: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read and validate every variable of :data:`ENV_VARS`.

        Raises :class:`ConfigError` on the first missing or malformed one.
        """
        region = _required(environ, "AWS_REGION")
        if not _REGION_RE.match(region):
            raise ConfigError(
                f"AWS_REGION={region!r} is not an AWS region name; "
                "expected something like 'us-east-1' or 'eu-central-1'"
            )
        erasure, erasure_grantee = erasure_settings(environ)
        hmac_key = _key_ref(environ, "KMS_HMAC_KEY_ID", region)  # first: the error names the first variable missing
        cmk = _key_ref(environ, "KMS_APPLICATION_CMK_ID", region)
        settings = cls(
            aws_region=region,
            hmac_key_id=hmac_key,
            application_cmk_id=cmk,
            accepted_cmk_ids=accepted_cmk_ids(environ, region, cmk),
            kms_mac_algorithm=_mac_algorithm(environ, "OWUI_CRYPTO_KMS_MAC_ALGORITHM"),
            key_cache_ttl_seconds=_number(
                environ, "OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", float, "a number of seconds > 0, e.g. 300"
            ),
            key_cache_size=_number(
                environ, "OWUI_CRYPTO_KEY_CACHE_SIZE", int, "a whole number > 0, e.g. 10000"
            ),
            kms_connect_timeout=_number(
                environ, "OWUI_CRYPTO_KMS_CONNECT_TIMEOUT", float, "a number of seconds > 0, e.g. 2"
            ),
            kms_read_timeout=_number(
                environ, "OWUI_CRYPTO_KMS_READ_TIMEOUT", float, "a number of seconds > 0, e.g. 2"
            ),
            kms_max_attempts=_number(
                environ,
                "OWUI_CRYPTO_KMS_MAX_ATTEMPTS",
                int,
                f"a whole number from 1 to {_MAX_ATTEMPTS_CEILING}, e.g. 2",
                ceiling=_MAX_ATTEMPTS_CEILING,
            ),
            user_secret_provider=_provider(environ, "OWUI_CRYPTO_USER_SECRET_PROVIDER"),
            **_metrics_address(environ, "OWUI_CRYPTO_METRICS_PORT"),
            erasure=erasure,
            erasure_grantee=erasure_grantee,
        )
        if environ.get(REMOVED_STORE_USER_KEY, "").strip().lower() in _TRUE:
            raise ConfigError(
                f"{REMOVED_STORE_USER_KEY} was removed: a user_key stored next to user_encrypted_dek opens "
                "the DEK for anyone who can read the table (a dump, a read-only role). Unset it; the KMS copy "
                "is the way back to every key, and OWUI_CRYPTO_USER_SECRET_PROVIDER adds a user-held copy."
            )
        return settings


def _provider(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        raise ConfigError(f"{name}={value!r} is not module:function, e.g. mycompany.certs:user_secret")
    return value


def _metrics_address(environ: Mapping[str, str], name: str) -> dict[str, Any]:
    """``metrics_port`` and ``metrics_host`` from ``PORT`` or ``HOST:PORT`` (``[v6]:PORT``); nothing when unset.

    Loopback unless an address is named: the endpoint answers anyone who reaches it. IP literals only, so
    no DNS answer decides where it listens.
    """
    value = _raw(environ, name)
    if value is None:
        return {}
    host, _, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    valid = "a port from 1 to 65535 (e.g. 9464), or HOST:PORT with an IP address (e.g. 0.0.0.0:9464)"
    try:
        port = int(port_text)
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not valid; expected {valid}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={value!r} is out of range; expected {valid}")
    return {"metrics_port": port, "metrics_host": host}


#: The values of OWUI_CRYPTO_ERASURE (app_adapter.erasure).
ERASURE_MODES = ("off", "grants")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")


def erasure_settings(environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """``(OWUI_CRYPTO_ERASURE, OWUI_CRYPTO_ERASURE_GRANTEE)``, validated; also read by ``owui-crypto iam-policy``.

    The grantee is required with ``grants`` and refused without it: a grantee that nothing uses would
    suggest a protection that is not on.
    """
    mode = (_raw(environ, "OWUI_CRYPTO_ERASURE") or "off").lower()
    if mode not in ERASURE_MODES:
        raise ConfigError(f"OWUI_CRYPTO_ERASURE={mode!r} is not valid; expected one of {', '.join(ERASURE_MODES)}")
    grantee = _raw(environ, "OWUI_CRYPTO_ERASURE_GRANTEE")
    if mode == "off":
        if grantee is not None:
            raise ConfigError("OWUI_CRYPTO_ERASURE_GRANTEE is set but OWUI_CRYPTO_ERASURE is off: set "
                              "OWUI_CRYPTO_ERASURE=grants, or unset the grantee")
        return mode, None
    if grantee is None:
        raise ConfigError("OWUI_CRYPTO_ERASURE=grants needs OWUI_CRYPTO_ERASURE_GRANTEE: the ARN of the role that "
                          "runs owui-crypto, e.g. arn:aws:iam::111122223333:role/owui-TaskRole-ABC")
    if not _ROLE_ARN_RE.match(grantee):
        # A grant to an assumed-role session would end with that session; KMS grants go to the role itself.
        raise ConfigError(f"OWUI_CRYPTO_ERASURE_GRANTEE={grantee!r} is not an IAM role ARN; expected "
                          "arn:aws:iam::ACCOUNT:role/NAME (the role, not an assumed-role session)")
    return mode, grantee


def settings_table_markdown() -> str:
    """Return :data:`ENV_VARS` as a Markdown table for the README."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, default, description in ENV_VARS:
        shown = "*(required)*" if default is None else (f"`{default}`" if default else "*(empty)*")
        cell = description.replace("|", r"\|")  # a bare | would split the cell
        lines.append(f"| `{name}` | {shown} | {cell} |")
    return "\n".join(lines) + "\n"


def _raw(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _required(environ: Mapping[str, str], name: str) -> str:
    value = _raw(environ, name)
    if value is None:
        raise ConfigError(f"{name} is not set; {_describe(name)}")
    return value


def _describe(name: str) -> str:
    for var, _, description in ENV_VARS:
        if var == name:
            return f"expected: {description}"
    raise KeyError(name)  # a programming error: every variable is listed


def _key_ref(environ: Mapping[str, str], name: str, region: str) -> str:
    return _check_key_ref(_required(environ, name), name, region)


#: The variable of :attr:`Settings.accepted_cmk_ids`.
ACCEPTED_CMKS_ENV = "OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS"


def accepted_cmk_ids(environ: Mapping[str, str], region: str, primary: str) -> tuple[str, ...]:
    """:data:`ACCEPTED_CMKS_ENV`, split on commas, each a valid key reference; also read by ``iam-policy``.

    Repeats and the primary itself are dropped rather than refused: the rewrap sequence has the operator move a
    key from one variable to the other, and listing it in both for a while is harmless. Empty items (a trailing
    comma) are ignored.
    """
    value = _raw(environ, ACCEPTED_CMKS_ENV)
    if value is None:
        return ()
    found: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if item and item != primary and item not in found:
            found.append(_check_key_ref(item, ACCEPTED_CMKS_ENV, region))
    return tuple(found)


def _check_key_ref(value: str, name: str, region: str) -> str:
    match = _KEY_REF_RE.match(value)
    if match is None:
        raise ConfigError(f"{name}={value!r} is not a KMS key reference; expected {_KEY_REF_EXAMPLE}")
    # KMS keys are regional: an ARN of another region fails later with a
    # confusing NotFoundException, so say it now.
    arn_region = match.group("region")
    if arn_region is not None and arn_region != region:
        raise ConfigError(
            f"{name} is an ARN in region {arn_region!r} but AWS_REGION={region!r}; "
            "use a key of the configured region or change AWS_REGION"
        )
    return value


def _mac_algorithm(environ: Mapping[str, str], name: str) -> str | None:
    value = _raw(environ, name)
    if value is None:
        return None
    if value not in MAC_ALGORITHMS:
        raise ConfigError(
            f"{name}={value!r} is not a KMS MAC algorithm; expected one of "
            f"{', '.join(MAC_ALGORITHMS)} or empty to derive it from the key"
        )
    return value


def _number(
    environ: Mapping[str, str],
    name: str,
    kind: Callable[[str], T],
    valid: str,
    *,
    ceiling: float | None = None,
) -> T:
    text = _raw(environ, name)
    if text is None:
        text = _DEFAULTS[name]
        assert text is not None
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not valid; expected {valid}") from None
    # float() accepts 'nan' and 'inf', which compare false/true in ways that
    # would silently disable the cache or the timeout.
    if not (0 < value < float("inf")) or (ceiling is not None and value > ceiling):  # type: ignore[operator]
        raise ConfigError(f"{name}={text!r} is out of range; expected {valid}")
    return value


def _boolean(environ: Mapping[str, str], name: str) -> bool:
    text = _raw(environ, name)
    if text is None:
        text = _DEFAULTS[name]
        assert text is not None
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean; expected 1/true/yes or 0/false/no")
