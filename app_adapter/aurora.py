"""Aurora access as AWS users set it up: a Secrets Manager secret, RDS IAM tokens, verify-full TLS.

Three optional settings, each read from the environment (README, "Connecting to Aurora"):

* ``OWUI_CRYPTO_DB_SECRET_ARN``: the database URL is built from a secret as
  RDS writes it (JSON ``username``, ``password``, ``host``, ``port``,
  ``dbname``); ``DATABASE_URL`` then names only what the secret lacks.
* ``OWUI_CRYPTO_DB_IAM_AUTH=true`` (or Open WebUI's own
  ``DATABASE_ENABLE_IAM_TOKEN_AUTH=true``): each new connection gets a fresh
  RDS IAM token (``generate_db_auth_token``: signed locally, valid 15 minutes)
  as its password.
* ``OWUI_CRYPTO_DB_CA_BUNDLE``: every connection uses ``sslmode=verify-full``
  with that bundle as ``sslrootcert``; a missing file refuses to start.

**Where the password goes.** Never into a URL, an environment variable, a
log line or an exception text: ``DATABASE_URL`` (which Open WebUI reads and
keeps in its config module) is rewritten *without* a password, and the
password is handed to each connection at connect time, in memory, by two
process-wide hooks installed before anything connects:

* a SQLAlchemy ``do_connect`` listener on the :class:`~sqlalchemy.engine.Engine`
  class. Class-level, because Open WebUI creates its sync and async engines at
  import (``open_webui/internal/db.py``) and its migrations make their own:
  every engine of the process gets it, whenever it was created;
* a wrapper around ``psycopg.connect``, for owui-crypto's own plain psycopg
  connections (key lookups, provisioning, the CLI). They all call
  ``psycopg.connect(dsn)`` with a password-free libpq URL; the wrapper adds
  the password as a keyword argument, which psycopg passes to libpq in memory.

Both only touch a connection to the configured host, port and user that
carries no password of its own, so any other database the process talks to
keeps its own credentials. libpq's ``PGPASSWORD`` is refused alongside: it
would put a password in the process environment for nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from app_adapter.config import _boolean, _raw
from app_adapter.errors import ConfigError
from app_adapter.iam import DB_SECRET_ENV, secret_arn
from app_adapter.secret import SecretBytes

__all__ = [
    "CA_BUNDLE_ENV",
    "DB_SECRET_ENV",
    "IAM_AUTH_ENV",
    "OWUI_IAM_AUTH_ENV",
    "DatabaseAccess",
    "DatabaseCredentialsError",
    "configure",
    "describe",
    "iam_auth_requested",
    "reset",
    "resolve",
    "forget_other_role",
    "owner_url_from_secret",
    "settle_other_role",
]

IAM_AUTH_ENV = "OWUI_CRYPTO_DB_IAM_AUTH"
CA_BUNDLE_ENV = "OWUI_CRYPTO_DB_CA_BUNDLE"
#: Open WebUI's own switch (open_webui/env.py). Its listener reuses one token for 14 minutes and covers only
#: Open WebUI's engines; owui-crypto takes the switch over and turns Open WebUI's listener off.
OWUI_IAM_AUTH_ENV = "DATABASE_ENABLE_IAM_TOKEN_AUTH"

RDS_CA_BUNDLE_URL = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
_LOOPBACK_NAMES = frozenset({"localhost"})
_WEAK_SSLMODES = frozenset({"disable", "allow", "prefer"})
_RDS_HOST_RE = re.compile(r"\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d{1,2})\.rds\.amazonaws\.com(?:\.cn)?$")


class DatabaseCredentialsError(ConfigError):
    """A database password or token could not be obtained; the message says what to check (never the value)."""


@dataclass(frozen=True)
class DatabaseAccess:
    """What the environment asks for. Identifiers only: nothing here is secret."""

    secret_arn: str | None = None
    iam_auth: bool = False
    ca_bundle: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.secret_arn or self.iam_auth or self.ca_bundle)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DatabaseAccess:
        arn = _raw(environ, DB_SECRET_ENV)
        access = cls(secret_arn=secret_arn(arn) if arn else None, iam_auth=iam_auth_requested(environ),
                     ca_bundle=_raw(environ, CA_BUNDLE_ENV))
        if access.secret_arn and access.iam_auth:
            raise ConfigError(f"{DB_SECRET_ENV} and IAM authentication ({IAM_AUTH_ENV} or {OWUI_IAM_AUTH_ENV}) are "
                              "both set: the first gives each connection the secret's password, the second an IAM "
                              "token for the same user. Choose one")
        return access


def iam_auth_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """``OWUI_CRYPTO_DB_IAM_AUTH``, or Open WebUI's ``DATABASE_ENABLE_IAM_TOKEN_AUTH`` read as Open WebUI reads it."""
    return _boolean(environ, IAM_AUTH_ENV) or environ.get(OWUI_IAM_AUTH_ENV, "").strip().lower() == "true"


@dataclass(frozen=True)
class Endpoint:
    """The host, port and user a password is for."""

    host: str
    port: int
    user: str

    def matches(self, params: Mapping[str, Any]) -> bool:
        """True for connection parameters (libpq keywords) aimed at this endpoint as this user."""
        host = str(params.get("host") or "").lower()
        port = str(params.get("port") or 5432)
        return (host, port, str(params.get("user") or "")) == (self.host.lower(), str(self.port), self.user)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class Credentials(Protocol):
    """Hands a password to one new connection."""

    issued: int

    def password(self) -> str: ...

    def describe(self) -> str: ...


class SecretPassword:
    """The password of a Secrets Manager secret, read once at start, shown nowhere."""

    def __init__(self, arn: str, password: SecretBytes) -> None:
        self.arn = arn
        self._password = password
        self.issued = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SecretPassword(arn={self.arn!r})"

    def password(self) -> str:
        with self._lock:
            self.issued += 1
        return self._password.reveal().decode("utf-8")

    def describe(self) -> str:
        return f"password from Secrets Manager secret {self.arn}"


class IamTokens:
    """A fresh RDS IAM token per call: botocore signs it locally (no network), valid 15 minutes."""

    def __init__(self, endpoint: Endpoint, region: str, client: Any | None = None) -> None:
        self.endpoint = endpoint
        self.region = region
        self._client = client if client is not None else _aws_client("rds", region)
        self.issued = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IamTokens(endpoint={str(self.endpoint)!r}, region={self.region!r})"

    def password(self) -> str:
        try:
            with _redacting():
                token: str = self._client.generate_db_auth_token(
                    DBHostname=self.endpoint.host, Port=self.endpoint.port, DBUsername=self.endpoint.user,
                    Region=self.region)
        except Exception as exc:  # botocore: no credentials, expired ones, a broken profile...
            raise DatabaseCredentialsError(
                f"cannot sign an RDS IAM token for {self.endpoint}: {type(exc).__name__}: {exc}. The role needs "
                "AWS credentials from boto3's chain (the ECS task role) and rds-db:connect on this database user "
                "(owui-crypto iam-policy with OWUI_CRYPTO_DB_USER_ARN)") from None
        with self._lock:
            self.issued += 1
        return token

    def describe(self) -> str:
        return f"a fresh RDS IAM token per connection (region {self.region})"


# -- botocore's DEBUG log -----------------------------------------------------------------------------------
#
# With botocore at DEBUG, botocore.parsers logs GetSecretValue's response body (the password) and
# botocore.auth logs the canonical request and signature of an IAM token (the token, rebuilt). While owui-crypto
# makes either call those records are blanked; a SecretString from anyone's call is blanked too.

_sensitive_call: ContextVar[bool] = ContextVar("owui_crypto_db_credential_call", default=False)
_BOTOCORE_LOGGERS = ("botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.hooks",
                     "botocore.regions", "urllib3.connectionpool")


class _RedactCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG and (_sensitive_call.get() or "SecretString" in _message(record)):
            record.msg = "[owui-crypto: botocore record redacted, it may carry a database credential]"
            record.args = None
        return True


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: logging reports that itself
        return str(record.msg)


_REDACTOR = _RedactCredentials()


@contextlib.contextmanager
def _redacting() -> Iterator[None]:
    # Filters only see records logged on their own logger; addFilter ignores a repeat.
    for name in _BOTOCORE_LOGGERS:
        logging.getLogger(name).addFilter(_REDACTOR)
    token = _sensitive_call.set(True)
    try:
        yield
    finally:
        _sensitive_call.reset(token)


def _aws_client(service: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    # Endpoints and credentials from boto3's standard chain (AWS_ENDPOINT_URL_SECRETS_MANAGER...), as for KMS.
    config = Config(connect_timeout=5, read_timeout=5, retries={"mode": "standard", "max_attempts": 3})
    session: Any = boto3.session.Session()  # Any: boto3's stubs type client() per literal service name
    return session.client(service, region_name=region, config=config)


# -- the secret ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RdsSecret:
    """The fields of an RDS secret owui-crypto uses; the password never shows."""

    arn: str
    username: str
    password: SecretBytes = field(repr=False)
    host: str | None = None
    port: int | None = None
    dbname: str | None = None


def read_secret(arn: str, client: Any | None = None, variable: str = DB_SECRET_ENV) -> RdsSecret:
    """GetSecretValue on ``arn`` (given in ``variable``) and its JSON as RDS writes it. Errors name the secret,
    never its content."""
    region = arn.split(":")[3]
    try:
        with _redacting():
            client = client if client is not None else _aws_client("secretsmanager", region)
            answer = client.get_secret_value(SecretId=arn)
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        raise DatabaseCredentialsError(
            f"cannot read the database secret {arn} ({variable}): {code}. The role needs "
            "secretsmanager:GetSecretValue on it (owui-crypto iam-policy), and kms:Decrypt on its KMS key when that "
            "is not aws/secretsmanager; Secrets Manager must be reachable (NAT or a secretsmanager VPC endpoint)"
        ) from None
    return parse_secret(arn, answer.get("SecretString"))


def parse_secret(arn: str, text: str | None) -> RdsSecret:
    what = f"the database secret {arn}"
    if text is None:
        raise DatabaseCredentialsError(f"{what} holds no SecretString (binary?); RDS writes JSON with username "
                                       "and password")
    try:
        fields = json.loads(text)
    except ValueError:
        # The decoder's exception keeps the whole document: dropped, not chained.
        raise DatabaseCredentialsError(f"{what} is not JSON; RDS writes "
                                       '{"username": ..., "password": ..., "host": ..., "port": ..., '
                                       '"dbname": ...}') from None
    if not isinstance(fields, dict):
        raise DatabaseCredentialsError(f"{what} is JSON but not an object with username and password")
    missing = [k for k in ("username", "password") if not isinstance(fields.get(k), str) or not fields[k]]
    if missing:
        raise DatabaseCredentialsError(f"{what} has no {' and no '.join(missing)} (as text)")
    engine = fields.get("engine")
    if isinstance(engine, str) and "postgres" not in engine.lower():
        raise DatabaseCredentialsError(f"{what} is for engine {engine!r}, not PostgreSQL")
    port = fields.get("port")
    if port is not None and not (isinstance(port, int) or (isinstance(port, str) and port.isdigit())):
        raise DatabaseCredentialsError(f"{what} has a port that is not a number")
    for name in ("host", "dbname"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise DatabaseCredentialsError(f"{what} has a {name} that is not text")
    return RdsSecret(arn=arn, username=fields["username"], password=SecretBytes(fields["password"].encode("utf-8")),
                     host=fields.get("host") or None, port=int(port) if port is not None else None,
                     dbname=fields.get("dbname") or None)


# -- the URL ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: str  # DATABASE_URL's scheme; a password only if DATABASE_URL carried one and nothing else gives it
    endpoint: Endpoint | None
    sslmode: str | None


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _render(scheme: str, user: str | None, host: str | None, port: int | None, dbname: str | None,
            query: Mapping[str, str], password: str | None = None) -> str:
    # Percent-encoding (not SQLAlchemy's rendering, which writes spaces raw and '+' in the query): both libpq and
    # SQLAlchemy read this form back to the same values.
    netloc = quote(user, safe="") if user else ""
    if password is not None:  # only one DATABASE_URL carried itself (a CA bundle alone changes no credential)
        netloc += f":{quote(password, safe='')}"
    netloc += "@" if netloc else ""
    if host:
        netloc += f"[{host}]" if ":" in host else quote(host, safe="")
    if port:
        netloc += f":{port}"
    path = f"/{quote(dbname, safe='')}" if dbname else "/"
    params = "&".join(f"{quote(k, safe='')}={quote(v, safe='/')}" for k, v in query.items())
    return f"{scheme}://{netloc}{path}" + (f"?{params}" if params else "")


def _ca_bundle(value: str) -> str:
    path = Path(value)
    advice = (f"owui-crypto connects with sslmode=verify-full and checks the server's certificate and name against "
              f"this bundle. Put the RDS CA bundle ({RDS_CA_BUNDLE_URL}) in the image and point {CA_BUNDLE_ENV} "
              "at it, or unset it")
    if not path.exists():
        raise ConfigError(f"{CA_BUNDLE_ENV}={value}: no such file. {advice}")
    if not path.is_file():
        raise ConfigError(f"{CA_BUNDLE_ENV}={value} is not a file. {advice}")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{CA_BUNDLE_ENV}={value} cannot be read ({exc.strerror}). {advice}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"{CA_BUNDLE_ENV}={value} holds no PEM certificate. {advice}")
    return str(path.resolve())


def _tls(query: dict[str, str], host: str | None, access: DatabaseAccess, sends_password: bool,
         name: str = "DATABASE_URL") -> dict[str, str]:
    sslmode = query.get("sslmode")
    if access.ca_bundle:
        bundle = _ca_bundle(access.ca_bundle)
        # A weaker sslmode (require, as the template's DATABASE_URL has it) is raised to what the bundle is for;
        # only "no TLS at all" contradicts it.
        if sslmode == "disable":
            raise ConfigError(f"{name} says sslmode=disable but {CA_BUNDLE_ENV} asks for verify-full: "
                              f"drop sslmode from {name}")
        root = query.get("sslrootcert")
        if root is not None and str(Path(root).resolve()) != bundle:
            raise ConfigError(f"{name} says sslrootcert={root} but {CA_BUNDLE_ENV}={access.ca_bundle}: "
                              f"drop sslrootcert from {name}")
        return {**query, "sslmode": "verify-full", "sslrootcert": bundle}
    if sends_password:
        if sslmode is None:
            # RDS refuses IAM tokens without TLS; and libpq's default, prefer, falls back to clear text if the
            # TLS handshake is refused, which anyone on the path can arrange to read the password.
            return {**query, "sslmode": "require"}
        if sslmode in _WEAK_SSLMODES and not (host and _is_loopback(host)):
            raise ConfigError(f"{name} says sslmode={sslmode}: the database password would cross the network "
                              f"in clear, or could be made to. Use sslmode=verify-full with {CA_BUNDLE_ENV} "
                              "(or at least sslmode=require)")
    return query


@dataclass(frozen=True)
class _Parts:
    user: str | None
    host: str | None
    port: int | None
    dbname: str | None
    query: dict[str, str]
    password: str | None = field(default=None, repr=False)
    scheme: str = "postgresql+psycopg"  # DATABASE_URL's, kept: serve refuses the drivers it cannot protect


def _merge(url_text: str | None, secret: RdsSecret | None, sends_password: bool, name: str = "DATABASE_URL",
           secret_env: str = DB_SECRET_ENV) -> _Parts:
    if url_text:
        try:
            url = make_url(url_text)
        except ArgumentError:
            # The text may hold a password: it is not repeated.
            raise ConfigError(f"{name} is not a URL (postgresql+psycopg://USER@HOST:5432/DBNAME)") from None
        if not url.drivername.startswith("postgres"):
            raise ConfigError(f"{name} is {url.drivername}:...: the database settings of Connecting to "
                              "Aurora are for PostgreSQL (postgresql+psycopg://...)")
        if url.password is not None and sends_password:
            source = f"{secret_env} gives it" if secret else "the connection gets it from AWS"
            raise ConfigError(f"{name} carries a password, but {source}: remove the password from {name}")
        query: dict[str, str] = {}
        for key, value in url.query.items():
            if not isinstance(value, str):
                raise ConfigError(f"{name} names {key} more than once")
            query[key] = value
        # Empty parts ("postgresql:///?sslmode=...") are absent ones, to be filled from the secret.
        user, host, dbname = url.username or None, url.host or None, url.database or None
        port, password, scheme = url.port, url.password, url.drivername
    else:
        user = host = dbname = password = None
        port = None
        query = {}
        scheme = "postgresql+psycopg"
    if secret is not None:
        pairs = (("user", "username", user, secret.username), ("host", "host", host, secret.host),
                 ("port", "port", port, secret.port), ("database", "dbname", dbname, secret.dbname))
        for what, key, mine, theirs in pairs:
            if mine is not None and theirs is not None and str(mine) != str(theirs):
                raise ConfigError(f"{name} names {what} {mine!s} but the secret {secret.arn} names {key} "
                                  f"{theirs!s}: {name} may only add what the secret lacks. Remove it "
                                  f"from {name}")
        user, host = user or secret.username, host or secret.host
        port, dbname = port or secret.port, dbname or secret.dbname
    return _Parts(user, host, port, dbname, query, password, scheme)


def _region(host: str, environ: Mapping[str, str]) -> str:
    # The token is signed for the database's region: an RDS endpoint names it; otherwise (a CNAME, a tunnel)
    # the process's region.
    match = _RDS_HOST_RE.search(host.lower())
    region = match.group("region") if match else (_raw(environ, "AWS_REGION") or _raw(environ, "AWS_DEFAULT_REGION"))
    if not region:
        raise ConfigError(f"{IAM_AUTH_ENV}: the database host {host} names no region, and AWS_REGION is not set: "
                          "set AWS_REGION to the database's region")
    return region


# -- installing ---------------------------------------------------------------------------------------------


@dataclass
class _State:
    access: DatabaseAccess
    target: _Target
    credentials: Credentials | None


_LOCK = threading.RLock()
_state: _State | None = None
_secrets: dict[str, RdsSecret] = {}
_original_connect: Any = None
#: URLs :func:`settle_other_role` returned: another role's (the owner's), which :func:`resolve` hands back as they are.
_other_roles: set[str] = set()


def resolve(url: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The database URL to use: ``url`` unchanged when nothing of this module is configured; otherwise the
    password-free URL (``url``'s scheme) built from the secret and ``url``, with TLS settled, and the connect
    hooks installed. Safe to call again (the secret is read once per process)."""
    access = DatabaseAccess.from_env(environ)
    if not access.active or (url is not None and url in _other_roles):
        return url
    global _state
    with _LOCK:
        secret = None
        if access.secret_arn:
            secret = _secrets.get(access.secret_arn) or read_secret(access.secret_arn)
            _secrets[access.secret_arn] = secret
        sends_password = secret is not None or access.iam_auth
        parts = _merge(url, secret, sends_password)
        user, host, port, dbname = parts.user, parts.host, parts.port, parts.dbname
        if sends_password:
            if not host or not user:
                raise ConfigError("no database host or user: " + (
                    f"the secret {access.secret_arn} lacks them and DATABASE_URL names none (the secret gets host and "
                    "port once attached to the cluster; or give postgresql+psycopg://USER@HOST:5432/DBNAME)"
                    if secret else "IAM authentication signs a token for a user at a host: give them in "
                    "DATABASE_URL=postgresql+psycopg://USER@HOST:5432/DBNAME"))
            if _raw(environ, "PGPASSWORD"):
                raise ConfigError("PGPASSWORD is set, but " + (f"{DB_SECRET_ENV} gives the password" if secret else
                                                               "IAM authentication gives each connection a token")
                                  + ": unset PGPASSWORD (it keeps a password in the process environment for nothing)")
        if secret is not None and not dbname:
            # libpq would try a database named after the user, which on RDS is the master user's: say it now.
            raise ConfigError(f"no database name: the secret {access.secret_arn} has no dbname; name it in "
                              "DATABASE_URL (postgresql+psycopg:///openwebui)")
        query = _tls(parts.query, host, access, sends_password)
        endpoint = Endpoint(host, port or 5432, user) if host and user else None
        target = _Target(_render(parts.scheme, user, host, port, dbname, query, parts.password), endpoint,
                         query.get("sslmode"))
        credentials: Credentials | None = None
        if sends_password:
            assert endpoint is not None
            previous = _state.credentials if _state is not None and _state.target.endpoint == endpoint else None
            if secret is not None:
                same = isinstance(previous, SecretPassword) and previous.arn == secret.arn
                credentials = previous if same else SecretPassword(secret.arn, secret.password)
            else:
                same = isinstance(previous, IamTokens)
                credentials = previous if same else _iam_tokens(endpoint, environ)
        _state = _State(access, target, credentials)
        _install()
        return target.url


def settle_other_role(url: str, name: str, environ: Mapping[str, str] = os.environ) -> str:
    """``url`` of a role other than ``DATABASE_URL``'s (the owner's, which ``owui-crypto serve`` migrates with):
    TLS settled as for ``DATABASE_URL`` (``OWUI_CRYPTO_DB_CA_BUNDLE`` applies, a password it carries may not cross
    the network in clear), and its own credentials: the secret's password and IAM tokens are ``DATABASE_URL``'s
    user's, and the connect hooks never touch a connection as another user. :func:`resolve` hands it back
    unchanged, so a command given it (``migrate.upgrade``) connects as that role."""
    access = DatabaseAccess.from_env(environ)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{name} is not a URL (postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME)") from None
    query: dict[str, str] = {}
    for key, value in parsed.query.items():
        if not isinstance(value, str):
            raise ConfigError(f"{name} names {key} more than once")
        query[key] = value
    # As for DATABASE_URL, a password to a remote host goes over TLS; on this machine libpq's default stands.
    remote = not (parsed.host is None or _is_loopback(parsed.host))
    query = _tls(query, parsed.host, access, parsed.password is not None and remote, name)
    settled = _render(parsed.drivername, parsed.username, parsed.host, parsed.port, parsed.database, query,
                      parsed.password)
    with _LOCK:
        _other_roles.add(settled)
    return settled


def owner_url_from_secret(url: str | None, arn: str, name: str, secret_env: str) -> str:
    """The owner's URL (``name``, may be None) completed from the RDS secret ``arn`` (given in ``secret_env``),
    password included: :func:`settle_other_role` then takes it as an owner's URL that carries its password.

    The password goes into that URL, not into the connect hooks: they hand ``DATABASE_URL``'s user its credentials,
    and the owner's URL lives only in serve's memory until Open WebUI is imported. Read with the process's role
    (the ECS task role), so it never passes through the environment as an ECS-injected variable would."""
    with _LOCK:
        secret = _secrets.get(arn) or read_secret(arn, variable=secret_env)
        _secrets[arn] = secret
    parts = _merge(url, secret, True, name, secret_env)
    if not parts.host or not parts.user or not parts.dbname:
        raise ConfigError(f"no database host, user or name for {name}: the secret {arn} ({secret_env}) lacks some "
                          f"and {name} does not give them (the secret gets host and port once attached to the "
                          f"cluster, not the database name: {name}=postgresql+psycopg:///DBNAME)")
    return _render(parts.scheme, parts.user, parts.host, parts.port, parts.dbname, parts.query,
                   secret.password.reveal().decode("utf-8"))


def forget_other_role(url: str) -> None:
    """Drop ``url`` from what :func:`settle_other_role` remembers: serve is done with the owner's URL."""
    with _LOCK:
        _other_roles.discard(url)


def _iam_tokens(endpoint: Endpoint, environ: Mapping[str, str]) -> IamTokens:
    tokens = IamTokens(endpoint, _region(endpoint.host, environ))
    tokens.password()  # one token now: missing AWS credentials show at start, not at the first connection
    return tokens


def configure(environ: MutableMapping[str, str]) -> str | None:
    """:func:`resolve` for ``owui-crypto serve``, on ``DATABASE_URL`` of ``environ``, before Open WebUI is
    imported. Also turns Open WebUI's own IAM listener off: owui-crypto's gives its engines a token per
    connection already, and owui-crypto's own connections too."""
    url = resolve(environ.get("DATABASE_URL"), environ)
    if _state is not None and _state.access.iam_auth:
        # Said in owui-crypto's own variable, so every later resolve() of this process still sees IAM on.
        environ[IAM_AUTH_ENV] = "true"
        if OWUI_IAM_AUTH_ENV in environ:
            environ[OWUI_IAM_AUTH_ENV] = "false"
    return url


def describe() -> str | None:
    """One line on how connections authenticate, for the start-up log; None when nothing is configured."""
    state = _state
    if state is None:
        return None
    target = state.target
    who = str(target.endpoint) if target.endpoint else "the database"
    how = state.credentials.describe() if state.credentials else "password as libpq finds it"
    tls = f"sslmode={target.sslmode}" if target.sslmode else "sslmode as libpq defaults"
    if target.sslmode == "verify-full" and state.access.ca_bundle:
        tls += f" against {CA_BUNDLE_ENV}"
    return f"database {who}: {how}; {tls}"


def credentials() -> Credentials | None:
    """The installed credentials (tests and metrics: ``issued`` counts passwords handed out)."""
    return _state.credentials if _state is not None else None


def _install() -> None:
    global _original_connect
    with _LOCK:
        if not event.contains(Engine, "do_connect", _on_do_connect):
            event.listen(Engine, "do_connect", _on_do_connect)
        if _original_connect is None:
            _original_connect = psycopg.connect
            psycopg.connect = _connect  # type: ignore[assignment]


def reset() -> None:
    """Remove the hooks and forget the secret (tests; a process that serves keeps them)."""
    global _state, _original_connect
    with _LOCK:
        if event.contains(Engine, "do_connect", _on_do_connect):
            event.remove(Engine, "do_connect", _on_do_connect)
        if _original_connect is not None:
            psycopg.connect = _original_connect
            _original_connect = None
        _state = None
        _secrets.clear()
        _other_roles.clear()


def _password_for(params: Mapping[str, Any]) -> str | None:
    state = _state
    if state is None or state.credentials is None or state.target.endpoint is None:
        return None
    if params.get("password") is not None or not state.target.endpoint.matches(params):
        return None
    return state.credentials.password()


def _on_do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """SQLAlchemy, every engine: the password goes into this one connection's keyword arguments."""
    password = _password_for(cparams)
    if password is not None:
        cparams["password"] = password


def _connect(conninfo: str = "", **kwargs: Any) -> Any:
    """``psycopg.connect`` with the password added as a keyword (libpq gets it in memory, not in a URL)."""
    try:
        params = conninfo_to_dict(conninfo, **kwargs)
    except psycopg.ProgrammingError:
        params = {}  # a malformed conninfo: psycopg itself says what is wrong, below
    password = _password_for(params)
    if password is not None:
        kwargs["password"] = password
    return _original_connect(conninfo, **kwargs)
