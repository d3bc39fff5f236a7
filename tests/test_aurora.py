"""Aurora access as AWS users set it up: a Secrets Manager secret, RDS IAM tokens, verify-full TLS.

What is real and what is emulated here (no AWS account, no Aurora):

* Secrets Manager is moto over HTTP (the session's moto server, ``tests.kms_fixtures``), reached through
  boto3's own ``AWS_ENDPOINT_URL_SECRETS_MANAGER``.
* IAM tokens are real botocore SigV4 presigned tokens, signed locally with the test credentials. Real IAM
  checks them; here :class:`PasswordGate` does: it recomputes the SigV4 signature with the test secret key and
  checks the 15-minute expiry, the user and the host. Whether the role holds ``rds-db:connect`` is not
  emulated (``iam-policy`` is checked for that statement instead).
* The local PostgreSQL trusts every loopback client, so it never asks for a password. :class:`PasswordGate`
  stands in for Aurora's front door on loopback: it asks each client for its password as PostgreSQL does
  (AuthenticationCleartextPassword), records and checks it, and only then relays the session to the real
  server. So "what password did each new connection carry" is what a server received, not what a hook set.
* TLS: the gate can answer the SSLRequest with a certificate from a CA made by the test, so
  ``sslmode=verify-full`` is exercised by libpq for real, against that CA instead of the RDS bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import boto3
import botocore.auth
import psycopg
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app_adapter import aurora, cli, iam, migrate
from app_adapter.errors import ConfigError
from app_adapter.owui import compat, launcher
from tests.kms_fixtures import REGION, exception_text

CANARY = "canary-" + os.urandom(12).hex()  # the secret's password: must show up nowhere but on the wire
TEST_SECRET_KEY = "testing"  # tests.kms_fixtures' AWS_SECRET_ACCESS_KEY: what the gate verifies tokens with
ACCOUNT = "123456789012"  # moto's account

AURORA_VARS = (aurora.DB_SECRET_ENV, aurora.IAM_AUTH_ENV, aurora.CA_BUNDLE_ENV, aurora.OWUI_IAM_AUTH_ENV,
               iam.DB_USER_ARN_ENV, "PGPASSWORD", "DATABASE_URL", "DATABASE_PASSWORD", launcher.OWNER_SECRET_ENV,
               launcher.OWNER_URL_ENV)


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in AURORA_VARS:
        monkeypatch.delenv(name, raising=False)
    aurora.reset()
    yield
    aurora.reset()


# -- Secrets Manager (moto over HTTP) -------------------------------------------------------------------------


@dataclass
class Secrets:
    client: Any

    def create(self, fields: dict[str, Any] | str) -> str:
        body = fields if isinstance(fields, str) else json.dumps(fields)
        name = "owui/db-" + os.urandom(4).hex()
        return str(self.client.create_secret(Name=name, SecretString=body)["ARN"])


@pytest.fixture
def secrets(kms_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secrets]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", kms_server.endpoint_url)
    client = boto3.session.Session(region_name=REGION).client("secretsmanager")
    yield Secrets(client)
    client.close()


# -- a clock for botocore's signer and the gate ------------------------------------------------------------------


class Clock:
    """Now, plus an offset the test moves forward: botocore signs with it, the gate checks expiry with it."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: c.now().replace(tzinfo=None) if remove_tzinfo else c.now())
    return c


# -- SigV4: what IAM checks of a token --------------------------------------------------------------------------


def token_problem(token: str, *, host: str, port: int, user: str, now: dt.datetime,
                  secret_key: str = TEST_SECRET_KEY, region: str = REGION) -> str | None:
    """None if ``token`` is a valid RDS IAM token for user@host:port at ``now``, else what is wrong with it."""
    endpoint, _, query = token.partition("/?")
    if endpoint != f"{host}:{port}":
        return f"signed for {endpoint}"
    params = dict(parse_qsl(query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature", "")
    expected = {"Action": "connect", "DBUser": user, "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Expires": "900", "X-Amz-SignedHeaders": "host"}
    for key, value in expected.items():
        if params.get(key) != value:
            return f"{key}={params.get(key)!r}"
    signed_at = dt.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    if not signed_at - dt.timedelta(minutes=5) <= now <= signed_at + dt.timedelta(seconds=900):
        return "expired"
    _, day, scope_region, service, _ = params["X-Amz-Credential"].split("/")
    if (scope_region, service) != (region, "rds-db"):
        return f"scope {scope_region}/{service}"
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    canonical = "\n".join(["GET", "/", canonical_query, f"host:{host}:{port}", "", "host",
                           hashlib.sha256(b"").hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", params["X-Amz-Date"], f"{day}/{region}/rds-db/aws4_request",
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "rds-db", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    good = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(good, signature) else "bad signature"


# -- the gate: Aurora's front door on loopback -----------------------------------------------------------------

_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST = 80877103, 80877104, 80877102


@dataclass
class Attempt:
    user: str
    database: str
    password: str
    tls: bool
    accepted: bool


@dataclass
class PasswordGate:
    """Asks every client for its password in clear text (as PostgreSQL does for RDS IAM tokens), records it,
    checks it, then relays the session to the real PostgreSQL (which trusts loopback)."""

    upstream: tuple[str, int]
    check: Callable[[str, str], bool]
    tls: ssl.SSLContext | None = None
    attempts: list[Attempt] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def passwords(self) -> list[str]:
        with self._lock:
            return [a.password for a in self.attempts]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            self._session(client)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _session(self, client: socket.socket) -> None:
        tls = False
        while True:
            head = _recv(client, 8)
            length, code = struct.unpack("!ii", head)
            body = _recv(client, length - 8)
            if code == _SSL_REQUEST and self.tls is not None and not tls:
                client.sendall(b"S")
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.handshake_errors.append(str(exc))
                    return
                with self._lock:
                    self._sockets.append(client)
                tls = True
            elif code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
            elif code == _CANCEL_REQUEST:
                return
            else:
                break
        words = body.split(b"\0")
        params = {words[i].decode(): words[i + 1].decode() for i in range(0, len(words) - 1, 2) if words[i]}
        client.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = _recv(client, 1)
        (length,) = struct.unpack("!i", _recv(client, 4))
        payload = _recv(client, length - 4)
        if kind != b"p":
            return
        password = payload.rstrip(b"\0").decode()
        user = params.get("user", "")
        accepted = self.check(user, password)
        with self._lock:
            self.attempts.append(Attempt(user, params.get("database", ""), password, tls, accepted))
        if not accepted:
            fields = (b"SFATAL\0VFATAL\0C28P01\0M" + f'password authentication failed for user "{user}"'.encode()
                      + b"\0\0")
            client.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
            return
        upstream = socket.create_connection(self.upstream)
        with self._lock:
            self._sockets.append(upstream)
        upstream.sendall(head + body)
        _relay(client, upstream)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data


def _relay(client: socket.socket, upstream: socket.socket) -> None:
    with upstream:
        while True:
            if isinstance(client, ssl.SSLSocket) and client.pending():
                ready = [client]
            else:
                ready, _, _ = select.select([client, upstream], [], [], 5)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (upstream if sock is client else client).sendall(data)


@pytest.fixture
def upstream(pg_server: Any, db: str) -> tuple[tuple[str, int], str, str]:
    """The real server's address, this test's database and the user the tests connect as."""
    url = make_url(pg_server.url(db))
    return (url.host or "127.0.0.1", url.port or 5432), db, url.username or "postgres"


@pytest.fixture
def gates() -> Iterator[list[PasswordGate]]:
    made: list[PasswordGate] = []
    yield made
    for gate in made:
        gate.close()


def gate_for_password(gates: list[PasswordGate], upstream: tuple[str, int], password: str,
                      tls: ssl.SSLContext | None = None) -> PasswordGate:
    gate = PasswordGate(upstream, lambda user, given: hmac.compare_digest(given, password), tls)
    gates.append(gate)
    return gate


def gate_for_tokens(gates: list[PasswordGate], upstream: tuple[str, int], clock: Clock) -> PasswordGate:
    holder: dict[str, PasswordGate] = {}

    def check(user: str, token: str) -> bool:
        return token_problem(token, host="127.0.0.1", port=holder["gate"].port, user=user, now=clock.now()) is None

    gate = PasswordGate(upstream, check)
    holder["gate"] = gate
    gates.append(gate)
    return gate


# -- nothing configured ------------------------------------------------------------------------------------------


def test_nothing_configured_leaves_everything_as_it_was(db_url: str) -> None:
    original = psycopg.connect
    assert aurora.resolve(db_url, {}) == db_url
    assert aurora.resolve(None, {}) is None
    assert migrate.database_url(db_url) == db_url.replace("postgresql://", "postgresql+psycopg://", 1)
    assert psycopg.connect is original and aurora.describe() is None
    assert aurora.DatabaseAccess.from_env({}).active is False


# -- the URL from the secret -------------------------------------------------------------------------------------


def test_the_url_is_built_from_the_secret_and_never_holds_the_password(secrets: Secrets,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    arn = secrets.create({"username": "owui_admin", "password": CANARY, "engine": "postgres",
                          "host": "owui.cluster-abc.eu-central-1.rds.amazonaws.com", "port": 5432,
                          "dbname": "openwebui", "dbClusterIdentifier": "owui"})
    env = {aurora.DB_SECRET_ENV: arn}
    url = aurora.resolve(None, env)
    # Nothing in DATABASE_URL: all from the secret, and TLS required because a password travels.
    assert url == ("postgresql+psycopg://owui_admin@owui.cluster-abc.eu-central-1.rds.amazonaws.com:5432/openwebui"
                   "?sslmode=require")
    assert CANARY not in url and CANARY not in repr(aurora.credentials())
    # DATABASE_URL names what the secret lacks, or repeats it; it may not contradict it.
    assert aurora.resolve("postgresql://?application_name=owui&sslmode=verify-ca", env) == (
        "postgresql://owui_admin@owui.cluster-abc.eu-central-1.rds.amazonaws.com:5432/openwebui"
        "?application_name=owui&sslmode=verify-ca")
    assert aurora.resolve(url, env) == url
    # The scheme is DATABASE_URL's, so serve still refuses a driver that inlines parameters.
    psycopg2_url = aurora.resolve("postgresql+psycopg2://", env)
    assert psycopg2_url is not None and psycopg2_url.startswith("postgresql+psycopg2://owui_admin@")
    with pytest.raises(launcher.ServeRefused, match="inlines parameters"):
        launcher.normalise_database_url(psycopg2_url)
    url_password = "pw-" + os.urandom(6).hex()  # made here: a literal would show in the traceback's source lines
    for change, says in [
        ("postgresql://someone_else@/", "names user someone_else but the secret"),
        ("postgresql://owui_admin@other.host/", "names host other.host"),
        ("postgresql:///otherdb", "names database otherdb"),
        (f"postgresql://owui_admin:{url_password}@/", "carries a password"),
        ("postgresql:///?sslmode=disable", "sslmode=disable"),
        ("sqlite:///webui.db", "for PostgreSQL"),
    ]:
        with pytest.raises(ConfigError, match=says) as refused:
            aurora.resolve(change, env)
        assert url_password not in exception_text(refused.value)
    monkeypatch.setenv("PGPASSWORD", "x")
    with pytest.raises(ConfigError, match="unset PGPASSWORD"):
        aurora.resolve(None, {**env, "PGPASSWORD": "x"})
    with pytest.raises(ConfigError, match="Choose one"):
        aurora.DatabaseAccess.from_env({**env, aurora.IAM_AUTH_ENV: "true"})
    with pytest.raises(ConfigError, match="not a Secrets Manager secret ARN"):
        aurora.DatabaseAccess.from_env({aurora.DB_SECRET_ENV: "owui/db"})


def test_a_secret_without_host_or_dbname_takes_them_from_database_url(secrets: Secrets) -> None:
    # RDS-managed master user secrets hold only username and password.
    arn = secrets.create({"username": "owui_admin", "password": CANARY})
    env = {aurora.DB_SECRET_ENV: arn}
    with pytest.raises(ConfigError, match="no database host or user"):
        aurora.resolve(None, env)
    assert aurora.resolve("postgresql+psycopg://db.internal:6432/openwebui", env) == (
        "postgresql+psycopg://owui_admin@db.internal:6432/openwebui?sslmode=require")
    with pytest.raises(ConfigError, match="no database name"):
        aurora.resolve("postgresql+psycopg://db.internal:6432", env)


@pytest.mark.parametrize(("content", "says"), [
    (f"username=owui password={CANARY}", "is not JSON"),
    (json.dumps([CANARY]), "not an object"),
    (json.dumps({"username": "owui", "pass": CANARY}), "has no password"),
    (json.dumps({"username": "owui", "password": CANARY, "engine": "mysql"}), "not PostgreSQL"),
    (json.dumps({"username": "owui", "password": CANARY, "port": f"{CANARY}"}), "port that is not a number"),
])
def test_a_bad_secret_is_refused_without_showing_its_content(secrets: Secrets, content: str, says: str) -> None:
    arn = secrets.create(content)
    with pytest.raises(aurora.DatabaseCredentialsError, match=says) as refused:
        aurora.resolve("postgresql://h/d", {aurora.DB_SECRET_ENV: arn})
    text_ = exception_text(refused.value)
    assert arn in text_ and CANARY not in text_


def test_an_unreadable_secret_names_the_secret_and_the_permission(secrets: Secrets) -> None:
    missing = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:owui/absent-AbCdEf"
    with pytest.raises(aurora.DatabaseCredentialsError, match="ResourceNotFoundException") as refused:
        aurora.resolve(None, {aurora.DB_SECRET_ENV: missing})
    assert "secretsmanager:GetSecretValue" in str(refused.value) and missing in str(refused.value)


# -- the owner's secret (two roles; deploy/owui-crypto.yaml) -----------------------------------------------------


def test_the_owners_password_comes_from_its_secret_into_the_owners_connection_only(
        secrets: Secrets, upstream: Any, gates: list[PasswordGate], kms_server: Any) -> None:
    """serve reads the owner's secret itself: the password reaches the owner's connection and no variable."""
    address, database, user = upstream
    gate = gate_for_password(gates, address, CANARY)
    # As SecretTargetAttachment leaves the master secret: host and port, no dbname.
    arn = secrets.create({"username": user, "password": CANARY, "engine": "aurora-postgresql", "host": "127.0.0.1",
                          "port": gate.port})
    environ = {launcher.OWNER_SECRET_ENV: f" {arn} ", launcher.OWNER_URL_ENV: f"postgresql:///{database}?sslmode=disable",
               "DATABASE_URL": f"postgresql+psycopg://owui_app@127.0.0.1:{gate.port}/{database}"}
    owner = launcher.owner_database_url(environ)
    assert owner == f"postgresql+psycopg://{user}:{CANARY}@127.0.0.1:{gate.port}/{database}?sslmode=disable"
    assert set(environ) == {"DATABASE_URL"} and CANARY not in environ["DATABASE_URL"]
    assert aurora.resolve(owner, environ) == owner  # handed back as it is, as for an owner's URL given whole
    assert aurora._password_for({"host": "127.0.0.1", "port": str(gate.port), "user": user}) is None
    with psycopg.connect(owner.replace("+psycopg", "", 1)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    assert gate.passwords() == [CANARY]
    # Without its own URL, a secret that names everything is enough; TLS is required for a password on the way.
    whole = secrets.create({"username": "owui_admin", "password": CANARY, "host": "db.example", "port": 5432,
                            "dbname": "openwebui"})
    assert launcher.owner_database_url({launcher.OWNER_SECRET_ENV: whole}) == (
        f"postgresql+psycopg://owui_admin:{CANARY}@db.example:5432/openwebui?sslmode=require")


def test_a_bad_owner_secret_or_url_beside_it_is_refused_without_the_password(secrets: Secrets) -> None:
    arn = secrets.create({"username": "owui_admin", "password": CANARY, "host": "db.example", "port": 5432})
    url_password = "pw-" + os.urandom(6).hex()
    missing = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:owui/absent-AbCdEf"
    for url, secret, extra, says in [
        (None, arn, {}, "no database host, user or name"),
        (f"postgresql://owui_admin:{url_password}@/openwebui", arn, {}, "carries a password"),
        ("postgresql://someone_else@/openwebui", arn, {}, "names user someone_else but the secret"),
        ("postgresql:///openwebui?sslmode=disable", arn, {}, "says sslmode=disable"),
        ("sqlite:///webui.db", arn, {}, "is sqlite"),
        (None, arn, {"PGPASSWORD": url_password}, f"PGPASSWORD is set beside {launcher.OWNER_SECRET_ENV}"),
        (None, "owui/db", {}, f"{launcher.OWNER_SECRET_ENV}='owui/db' is not a Secrets Manager secret ARN"),
        (None, missing, {}, f"{launcher.OWNER_SECRET_ENV}\\): ResourceNotFoundException.*GetSecretValue"),
    ]:
        environ = {launcher.OWNER_SECRET_ENV: secret, **extra, **({launcher.OWNER_URL_ENV: url} if url else {})}
        with pytest.raises(ConfigError, match=says) as refused:
            launcher.owner_database_url(environ)
        assert launcher.OWNER_SECRET_ENV not in environ and launcher.OWNER_URL_ENV not in environ
        assert CANARY not in exception_text(refused.value) and url_password not in exception_text(refused.value)


# -- the password on every connection ----------------------------------------------------------------------------


def test_every_connection_carries_the_secrets_password(secrets: Secrets, upstream: Any, gates: list[PasswordGate],
                                                       kms_server: Any, db_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    address, database, user = upstream
    gate = gate_for_password(gates, address, CANARY)
    arn = secrets.create({"username": user, "password": CANARY, "host": "127.0.0.1", "port": gate.port,
                          "dbname": database})
    monkeypatch.setenv(aurora.DB_SECRET_ENV, arn)  # as the process would have it
    url = migrate.database_url("postgresql+psycopg://?sslmode=disable")  # what every CLI command does
    assert url == f"postgresql+psycopg://{user}@127.0.0.1:{gate.port}/{database}?sslmode=disable"
    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)

    # owui-crypto's own psycopg connections (KeyService.dsn), the share key through KMS among them.
    from app_adapter.keys import KeyService

    keys = KeyService(kms_server.settings(), url)
    assert keys.dsn == dsn
    keys.share_key()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (database,)
    # SQLAlchemy engines, sync and async, as Open WebUI creates them (pooled; created before any connection).
    engine = create_engine(url, pool_size=2)
    async_engine = create_async_engine(url, poolclass=pool.NullPool)
    with engine.connect() as c1, engine.connect() as c2:
        assert c1.execute(text("SELECT 1")).scalar() == c2.execute(text("SELECT 1")).scalar() == 1

    async def use_async() -> None:
        for _ in range(2):
            async with async_engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1

    asyncio.run(use_async())
    engine.dispose()
    asyncio.run(async_engine.dispose())
    # owui-crypto's migrations (at head already: alembic's own engine, then the refresh).
    migrate.upgrade(url)

    attempts = list(gate.attempts)
    assert len(attempts) >= 7 and all(a.accepted and a.password == CANARY for a in attempts)
    assert {a.database for a in attempts} == {database}
    assert aurora.credentials() is not None and aurora.credentials().issued == len(attempts)  # type: ignore[union-attr]
    # Another server, or another user, gets no password from owui-crypto.
    with psycopg.connect(db_url) as conn:
        assert not conn.info.password


def test_a_wrong_password_is_refused_and_no_error_shows_the_password(secrets: Secrets, upstream: Any,
                                                                   gates: list[PasswordGate]) -> None:
    address, database, user = upstream
    gate = gate_for_password(gates, address, "the-right-one")
    arn = secrets.create({"username": user, "password": CANARY, "host": "127.0.0.1", "port": gate.port,
                          "dbname": database})
    url = aurora.resolve("postgresql+psycopg://?sslmode=disable", {aurora.DB_SECRET_ENV: arn})
    assert url is not None
    with pytest.raises(psycopg.OperationalError, match="password authentication failed") as direct:
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
    engine = create_engine(url)
    with pytest.raises(Exception, match="password authentication failed") as pooled:
        engine.connect()
    engine.dispose()
    assert [a.password for a in gate.attempts] == [CANARY, CANARY]  # it was sent: the server refused it
    for exc in (direct.value, pooled.value):
        assert CANARY not in exception_text(exc)


# -- IAM tokens --------------------------------------------------------------------------------------------------


def test_each_connection_gets_a_fresh_token_and_an_old_one_is_refused(kms_server: Any, upstream: Any,
                                                                      gates: list[PasswordGate],
                                                                      clock: Clock) -> None:
    address, database, user = upstream
    gate = gate_for_tokens(gates, address, clock)
    url = aurora.resolve(f"postgresql://{user}@127.0.0.1:{gate.port}/{database}?sslmode=disable",
                         {aurora.IAM_AUTH_ENV: "true", "AWS_REGION": REGION})
    assert url is not None and url.startswith("postgresql://")  # DATABASE_URL's scheme is kept
    dsn = url
    with psycopg.connect(dsn) as first:
        first_token = first.info.password
    clock.offset = dt.timedelta(minutes=16)  # the first token has expired
    assert token_problem(first_token, host="127.0.0.1", port=gate.port, user=user, now=clock.now()) == "expired"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, password=first_token)  # a replayed token is refused: it is no static password
    with psycopg.connect(dsn) as second:
        second_token = second.info.password
    assert second_token != first_token
    assert [(a.password, a.accepted) for a in gate.attempts] == [
        (first_token, True), (first_token, False), (second_token, True)]
    # The tokens are IAM's form, signed for this user at this endpoint, 15 minutes.
    assert first_token.startswith(f"127.0.0.1:{gate.port}/?Action=connect&DBUser={user}&")
    assert "X-Amz-Expires=900" in first_token and f"%2F{REGION}%2Frds-db%2Faws4_request" in first_token


def test_open_webuis_engines_and_the_migrations_get_a_token_per_connection(kms_server: Any, upstream: Any,
                                                                           gates: list[PasswordGate],
                                                                           clock: Clock) -> None:
    address, database, user = upstream
    gate = gate_for_tokens(gates, address, clock)
    environ = {"DATABASE_URL": f"postgresql+psycopg://{user}@127.0.0.1:{gate.port}/{database}?sslmode=disable",
               aurora.OWUI_IAM_AUTH_ENV: "true", "AWS_REGION": REGION}  # Open WebUI's own switch
    url = aurora.configure(environ)
    assert environ[aurora.OWUI_IAM_AUTH_ENV] == "false" and environ[aurora.IAM_AUTH_ENV] == "true"
    assert url is not None
    engine = create_engine(url, pool_size=3, pool_pre_ping=True)  # as open_webui/internal/db.py builds them
    async_engine = create_async_engine(url, pool_size=3, pool_pre_ping=True)
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("SELECT 1"))
        b.execute(text("SELECT 1"))
        tokens = {a.connection.dbapi_connection.info.password,  # type: ignore[union-attr]
                  b.connection.dbapi_connection.info.password}  # type: ignore[union-attr]
        clock.offset += dt.timedelta(seconds=2)

    async def use_async() -> set[str]:
        seen = set()
        async with async_engine.connect() as c, async_engine.connect() as d:
            for conn in (c, d):
                raw = await conn.get_raw_connection()
                seen.add(raw.driver_connection.info.password)  # type: ignore[union-attr]
        return seen

    tokens |= asyncio.run(use_async())
    engine.dispose()
    asyncio.run(async_engine.dispose())
    migrate.upgrade(url)
    attempts = list(gate.attempts)
    assert all(a.accepted for a in attempts) and len(attempts) >= 5
    assert tokens <= {a.password for a in attempts}
    credentials = aurora.credentials()
    assert isinstance(credentials, aurora.IamTokens)
    assert credentials.issued == len(attempts) + 1  # + the one signed at start to check the credentials


def test_iam_without_aws_credentials_refuses_at_start(kms_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(aurora.DatabaseCredentialsError, match="cannot sign an RDS IAM token for app@db.example:5432"):
        aurora.resolve("postgresql://app@db.example/d", {aurora.IAM_AUTH_ENV: "true", "AWS_REGION": REGION})
    with pytest.raises(ConfigError, match="give them in DATABASE_URL"):
        aurora.resolve("postgresql:///d", {aurora.IAM_AUTH_ENV: "true", "AWS_REGION": REGION})


def test_the_token_is_signed_for_the_region_the_endpoint_names(kms_server: Any) -> None:
    aurora.resolve("postgresql://app@owui.cluster-abc.eu-west-3.rds.amazonaws.com/d",
                   {aurora.IAM_AUTH_ENV: "true", "AWS_REGION": REGION})
    token = aurora.credentials().password()  # type: ignore[union-attr]
    assert "%2Feu-west-3%2Frds-db%2Faws4_request" in token
    assert aurora.describe() == ("database app@owui.cluster-abc.eu-west-3.rds.amazonaws.com:5432: a fresh RDS IAM "
                                 "token per connection (region eu-west-3); sslmode=require")


# -- TLS: verify-full with the CA bundle --------------------------------------------------------------------------


def test_a_missing_ca_bundle_refuses_to_start_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "global-bundle.pem"
    env = {aurora.CA_BUNDLE_ENV: str(missing), "DATABASE_URL": "postgresql://owui@db.example/openwebui"}
    with pytest.raises(ConfigError) as refused:
        aurora.resolve(env["DATABASE_URL"], env)
    message = str(refused.value)
    assert message.startswith(f"{aurora.CA_BUNDLE_ENV}={missing}: no such file.")
    assert "sslmode=verify-full" in message and aurora.RDS_CA_BUNDLE_URL in message
    # owui-crypto serve stops there, before connecting anywhere; so does every CLI command.
    monkeypatch.setattr(compat, "installed_version", lambda: "0.12.4")
    monkeypatch.setattr(compat, "installed_from_wheel", lambda: True)
    with pytest.raises(ConfigError, match="no such file"):
        launcher.plan({**env, "WEBUI_SECRET_KEY": "x"})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WEBUI_SECRET_KEY", "x")
    assert cli.main(["serve"]) == 1
    assert cli.main(["check"]) == 1
    err = capsys.readouterr().err
    assert err.count(f"owui-crypto: {aurora.CA_BUNDLE_ENV}={missing}: no such file.") == 2
    # Not a file, or not a certificate: refused as well.
    for path, says in ((tmp_path, "is not a file"), (tmp_path / "empty.pem", "holds no PEM certificate")):
        (tmp_path / "empty.pem").write_text("")
        with pytest.raises(ConfigError, match=says):
            aurora.resolve(env["DATABASE_URL"], {**env, aurora.CA_BUNDLE_ENV: str(path)})


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server: ssl.SSLContext
    wrong_name: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA standing in for the RDS CA, a server certificate for 127.0.0.1, one for another name, another CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    home = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def server(ca_key: Any, ca_cert: Any, names: list[x509.GeneralName], stem: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (home / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (home / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(home / f"{stem}.pem", home / f"{stem}.key")
        return context

    ca_key, ca_cert = ca("owui-crypto test RDS CA")
    _, other_cert = ca("someone else's CA")
    (home / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (home / "other-ca.pem").write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    return Pki(home / "ca.pem", home / "other-ca.pem", server(ca_key, ca_cert, loopback, "server"),
               server(ca_key, ca_cert, [x509.DNSName("db.example")], "wrong-name"))


def test_verify_full_checks_the_servers_certificate_and_name(pki: Pki, secrets: Secrets, upstream: Any,
                                                             gates: list[PasswordGate]) -> None:
    address, database, user = upstream
    good = gate_for_password(gates, address, CANARY, tls=pki.server)
    arn = secrets.create({"username": user, "password": CANARY, "host": "127.0.0.1", "port": good.port,
                          "dbname": database})
    env = {aurora.DB_SECRET_ENV: arn, aurora.CA_BUNDLE_ENV: str(pki.ca)}
    url = aurora.resolve(None, env)
    assert url == (f"postgresql+psycopg://{user}@127.0.0.1:{good.port}/{database}?sslmode=verify-full"
                   f"&sslrootcert={pki.ca}")
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        options = {o.keyword: o.val for o in conn.pgconn.info}
        assert (options[b"sslmode"], options[b"sslrootcert"]) == (b"verify-full", str(pki.ca).encode())
        assert conn.execute("SELECT 1").fetchone() == (1,)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()
    assert [(a.tls, a.accepted, a.password == CANARY) for a in good.attempts] == [(True, True, True)] * 2

    # The bundle of another CA, or a certificate for another name: nothing is sent.
    wrong_name = gate_for_password(gates, address, CANARY, tls=pki.wrong_name)
    for port, bundle, says in ((good.port, pki.other_ca, "certificate verify failed"),
                               (wrong_name.port, pki.ca, "does not match host name")):
        aurora.reset()
        target = aurora.resolve(f"postgresql://{user}@127.0.0.1:{port}/{database}",
                                {aurora.CA_BUNDLE_ENV: str(bundle)})
        assert target is not None
        with pytest.raises(psycopg.OperationalError, match=says):
            psycopg.connect(target.replace("postgresql+psycopg", "postgresql"), connect_timeout=5)
    assert len(good.attempts) == 2 and wrong_name.attempts == []
    # A weaker sslmode in DATABASE_URL is raised to verify-full; no TLS at all, or another root, contradicts it.
    raised = aurora.resolve("postgresql+psycopg://127.0.0.1/d?sslmode=require", {aurora.CA_BUNDLE_ENV: str(pki.ca)})
    assert raised == f"postgresql+psycopg://127.0.0.1/d?sslmode=verify-full&sslrootcert={pki.ca}"
    with pytest.raises(ConfigError, match="drop sslmode from DATABASE_URL"):
        aurora.resolve("postgresql:///?sslmode=disable", env)
    with pytest.raises(ConfigError, match="drop sslrootcert from DATABASE_URL"):
        aurora.resolve(f"postgresql:///?sslrootcert={pki.other_ca}", env)


# -- the password shows nowhere ----------------------------------------------------------------------------------


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {self.format(record)}")


@contextlib.contextmanager
def every_log_line() -> Iterator[_Everything]:
    """Every record of every logger at DEBUG (botocore's bodies and signatures, psycopg, SQLAlchemy...).
    Entered after the test made its secrets: its own CreateSecret calls log the canary at DEBUG."""
    handler = _Everything()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("botocore", "boto3", "urllib3", "psycopg", "sqlalchemy", "alembic"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name in ("botocore", "boto3", "urllib3", "psycopg", "sqlalchemy", "alembic"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_the_secrets_password_is_in_no_log_line_no_error_and_no_output(
        secrets: Secrets, upstream: Any, gates: list[PasswordGate], capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, database, user = upstream
    gate = gate_for_password(gates, address, CANARY)
    arn = secrets.create({"username": user, "password": CANARY, "host": "127.0.0.1", "port": gate.port,
                          "dbname": database})
    malformed = secrets.create(f"not json {CANARY}")
    monkeypatch.setattr(compat, "installed_version", lambda: "0.12.4")
    monkeypatch.setattr(compat, "installed_from_wheel", lambda: True)
    with every_log_line() as logged:
        errors = _use_and_misuse_the_secret(arn, malformed, gate)
        print(aurora.describe(), repr(aurora.credentials()))
    out = capfd.readouterr()
    assert len(errors) == 5 and [a.accepted for a in gate.attempts][-2:] == [False, False]
    assert all(a.password == CANARY for a in gate.attempts)
    assert sum(line.startswith("botocore") for line in logged.lines) > 20  # botocore did log at DEBUG
    for line in logged.lines:
        assert CANARY not in line, line
    for exc in errors:
        assert CANARY not in exception_text(exc)
    assert CANARY not in out.out + out.err
    assert not [v for v in os.environ.values() if CANARY in v]


def _use_and_misuse_the_secret(arn: str, malformed: str, gate: PasswordGate) -> list[BaseException]:
    """What owui-crypto serve does with the secret, then what fails: the errors raised."""
    environ = {aurora.DB_SECRET_ENV: arn, "DATABASE_URL": "postgresql://?sslmode=disable", "WEBUI_SECRET_KEY": "x"}
    steps = launcher.plan(environ)  # as owui-crypto serve starts
    assert CANARY not in json.dumps(environ) and CANARY not in steps.database_url
    engine = create_engine(steps.database_url, echo=True, echo_pool="debug")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()
    migrate.upgrade(steps.database_url)
    # Failures: a refused password (the server changed its mind), contradicting settings, a malformed secret,
    # PGPASSWORD beside the secret.
    gate.check = lambda user, password: False
    errors: list[BaseException] = []
    for attempt in (
        lambda: psycopg.connect(steps.database_url.replace("postgresql+psycopg", "postgresql")),
        lambda: create_engine(steps.database_url).connect(),
        lambda: aurora.resolve("postgresql://intruder@/", {aurora.DB_SECRET_ENV: arn}),
        lambda: aurora.resolve(None, {aurora.DB_SECRET_ENV: malformed}),
        lambda: launcher.plan({**environ, "PGPASSWORD": "x"}),
    ):
        try:
            attempt()
        except Exception as exc:
            errors.append(exc)
    return errors


def test_iam_tokens_are_in_no_log_line(kms_server: Any, upstream: Any, gates: list[PasswordGate],
                                       clock: Clock) -> None:
    address, database, user = upstream
    gate = gate_for_tokens(gates, address, clock)
    with every_log_line() as logged:
        url = aurora.resolve(f"postgresql://{user}@127.0.0.1:{gate.port}/{database}?sslmode=disable",
                             {aurora.IAM_AUTH_ENV: "true", "AWS_REGION": REGION})
        assert url is not None
        for _ in range(2):
            with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")):
                pass
    tokens = gate.passwords()
    assert len(tokens) == 2 and all(gate.attempts[i].accepted for i in range(2))
    log = "\n".join(logged.lines)
    assert "botocore.auth" in log  # botocore did log at DEBUG...
    for token in tokens:  # ...but neither the token nor its signature
        assert token not in log and token.rsplit("X-Amz-Signature=", 1)[1] not in log


_HOLDER = """
import os, sys, time
import psycopg
from app_adapter import migrate
dsn = migrate.database_url().replace("postgresql+psycopg://", "postgresql://", 1)
with psycopg.connect(dsn) as conn:
    conn.execute("SELECT 1")
    print("connected", flush=True)
    sys.stdin.readline()
"""


def test_the_password_is_in_no_process_list(secrets: Secrets, upstream: Any, gates: list[PasswordGate],
                                            kms_server: Any) -> None:
    address, database, user = upstream
    gate = gate_for_password(gates, address, CANARY)
    arn = secrets.create({"username": user, "password": CANARY, "host": "127.0.0.1", "port": gate.port,
                          "dbname": database})
    env = {**os.environ, aurora.DB_SECRET_ENV: arn, "DATABASE_URL": "postgresql://?sslmode=disable"}
    child = subprocess.Popen([sys.executable, "-c", _HOLDER], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        proc = Path(f"/proc/{child.pid}")
        seen = [(proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()]
        seen.append(subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, check=True).stdout)
        seen.append(subprocess.run(["ps", "eww", "-p", str(child.pid)], capture_output=True, check=True).stdout)
        for blob in seen:
            assert CANARY.encode() not in blob
    finally:
        out, err = child.communicate("\n", timeout=30)
    assert child.returncode == 0, err
    assert gate.passwords() == [CANARY] and CANARY not in out + err


# -- owui-crypto iam-policy ----------------------------------------------------------------------------------------

HMAC_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-1111-4111-8111-111111111111"
CMK_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/22222222-2222-4222-8222-222222222222"
DB_USER_ARN = f"arn:aws:rds-db:{REGION}:{ACCOUNT}:dbuser:cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ/owui_app"


def test_iam_policy_gains_rds_db_connect_on_the_database_user() -> None:
    base = {"KMS_HMAC_KEY_ID": HMAC_ARN, "KMS_APPLICATION_CMK_ID": CMK_ARN}
    without = iam.policy_from_environment(environ=base)
    assert not [s for s in without["Statement"] if s["Sid"] in ("DatabaseIamAuth", "DatabaseSecret")]
    iam_env = {**base, aurora.IAM_AUTH_ENV: "true", "DATABASE_URL": "postgresql://owui_app@db.example/openwebui"}
    with pytest.raises(ConfigError, match=f"Set {iam.DB_USER_ARN_ENV}=arn:aws:rds-db:"):
        iam.policy_from_environment(environ=iam_env)
    with pytest.raises(ConfigError, match=iam.DB_USER_ARN_ENV):
        iam.policy_from_environment(environ={**base, aurora.OWUI_IAM_AUTH_ENV: "True"})
    policy = iam.policy_from_environment(environ={**iam_env, iam.DB_USER_ARN_ENV: DB_USER_ARN})
    assert policy["Statement"][:-1] == without["Statement"]
    assert policy["Statement"][-1] == {"Sid": "DatabaseIamAuth", "Effect": "Allow", "Action": "rds-db:connect",
                                       "Resource": DB_USER_ARN}
    for arn, says in ((DB_USER_ARN.replace("/owui_app", "/*"), "has a wildcard"),
                      (DB_USER_ARN.replace("cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ", "*"), "has a wildcard"),
                      (DB_USER_ARN.replace("rds-db", "rds"), "not the rds-db ARN")):
        with pytest.raises(ConfigError, match=says):
            iam.policy_from_environment(environ={**iam_env, iam.DB_USER_ARN_ENV: arn})
    with pytest.raises(ConfigError, match="connects as 'someone'"):
        iam.policy_from_environment(environ={**iam_env, iam.DB_USER_ARN_ENV: DB_USER_ARN,
                                             "DATABASE_URL": "postgresql://someone@db.example/openwebui"})


def test_iam_policy_with_the_secret_owui_crypto_reads(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:owui/db-AbCdEf"
    monkeypatch.setenv("KMS_HMAC_KEY_ID", HMAC_ARN)
    monkeypatch.setenv("KMS_APPLICATION_CMK_ID", CMK_ARN)
    monkeypatch.setenv(aurora.DB_SECRET_ENV, secret)
    assert cli.main(["iam-policy"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["Statement"][-1] == {"Sid": "DatabaseSecret", "Effect": "Allow",
                                        "Action": "secretsmanager:GetSecretValue", "Resource": secret}
    assert not [s for s in printed["Statement"] if "rds-db:connect" in str(s["Action"])]
    owner = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:owui/master-GhIjKl"
    monkeypatch.setenv(launcher.OWNER_SECRET_ENV, owner)
    assert cli.main(["iam-policy"]) == 0
    with_owner = json.loads(capsys.readouterr().out)["Statement"]
    assert with_owner[:-1] == printed["Statement"]
    assert with_owner[-1] == {"Sid": "OwnerDatabaseSecret", "Effect": "Allow",
                              "Action": "secretsmanager:GetSecretValue", "Resource": owner}
    monkeypatch.setenv(launcher.OWNER_SECRET_ENV, "owui/master")
    assert cli.main(["iam-policy"]) == 1
    assert f"{launcher.OWNER_SECRET_ENV}='owui/master' is not a Secrets Manager secret ARN" in capsys.readouterr().err


# -- the real Open WebUI (runs where it is installed: .venv-owui, `make e2e`'s interpreter) ------------------------


@pytest.mark.owui
@pytest.mark.parametrize("mode", ["secret", "iam"])
def test_owui_crypto_serve_authenticates_every_connection_of_open_webui_and_its_own(
        mode: str, secrets: Secrets, pg_server: Any, gates: list[PasswordGate], kms_server: Any,
        tmp_path: Path) -> None:
    import httpx

    from e2e.conftest import OFFLINE_ENV, free_port
    from e2e.owui_api import new_chat, ok, signup

    database = pg_server.create_database("owui_crypto_t_aurora")
    try:
        url = make_url(pg_server.url(database))
        address = (url.host or "127.0.0.1", url.port or 5432)
        if mode == "secret":
            gate = gate_for_password(gates, address, CANARY)
            arn = secrets.create({"username": url.username, "password": CANARY, "host": "127.0.0.1",
                                  "port": gate.port, "dbname": database, "engine": "postgres"})
            settings = {aurora.DB_SECRET_ENV: arn, "DATABASE_URL": "postgresql://?sslmode=disable"}
            said = "password from Secrets Manager secret"
        else:
            gate = gate_for_tokens(gates, address, Clock())
            settings = {aurora.IAM_AUTH_ENV: "true",
                        "DATABASE_URL": f"postgresql://{url.username}@127.0.0.1:{gate.port}/{database}?sslmode=disable"}
            said = f"a fresh RDS IAM token per connection (region {REGION})"
        port = free_port()
        env = {**os.environ, **OFFLINE_ENV, **settings, "WEBUI_SECRET_KEY": "e2e-" + os.urandom(16).hex(),
               "DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1", "GLOBAL_LOG_LEVEL": "DEBUG"}
        for name in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE", "PGPASSWORD"):
            env.pop(name, None)
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen([str(Path(sys.executable).with_name("owui-crypto")), "serve", "--host",
                                        "127.0.0.1", "--port", str(port)], env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
                try:
                    if httpx.get(f"{base}/health/db", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise AssertionError(log_path.read_text(errors="replace")[-4000:])
            started = len(gate.attempts)
            # A sign-up (KMS, provisioning on its own connection) and a chat (Open WebUI's async engine).
            with httpx.Client(base_url=base, timeout=60) as anonymous:
                alice = signup(anonymous, "Alice", "alice@example.com", "alice-password-1")
            with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {alice.token}"}) as c:
                chat = new_chat(c, alice, "aurora")
                assert ok(c.get(f"/api/v1/chats/{chat.id}")).json()["title"] == chat.title
            proc = Path(f"/proc/{process.pid}")
            assert CANARY.encode() not in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        finally:
            process.terminate()
            process.wait(timeout=30)
        log = log_path.read_text(errors="replace")
        assert f"owui-crypto: database {url.username}@127.0.0.1:{gate.port}: {said}" in log
        attempts = list(gate.attempts)
        print(f"{mode}: {len(attempts)} connections through the gate, {started} of them before /health/db answered")
        # Open WebUI's migrations and engines, owui-crypto's migrations and key lookups: all through the gate,
        # every one with the secret's password or a valid token of its own.
        assert started >= 4 and all(a.accepted for a in attempts), [(a.user, a.accepted) for a in attempts]
        if mode == "secret":
            assert {a.password for a in attempts} == {CANARY} and CANARY not in log
        else:
            assert len({a.password for a in attempts}) > 1
            assert not [a.password for a in attempts if a.password in log]
        with pg_server.connect(database) as conn:  # sealed at rest, as without Aurora access
            (title,) = conn.execute("SELECT title FROM public.chat WHERE id = %s", (chat.id,)).fetchone()
        assert title.startswith("oc1:") and chat.title not in title
    finally:
        pg_server.drop_database(database)
