"""A real KMS HTTP endpoint for the tests: moto's server on 127.0.0.1.

Import the fixtures with ``from tests.kms_fixtures import *`` (or list this
module in ``pytest_plugins``). ``kms_server`` is session-scoped: one server,
one HMAC_512 key and one SYMMETRIC_DEFAULT key, and the process environment
pointed at them through boto3's standard variables only
(``AWS_ENDPOINT_URL_KMS``, ``AWS_ACCESS_KEY_ID``...). The environment is
restored when the session ends.

Tests that change key state (disable, schedule deletion) should make their
own keys with :meth:`KmsServer.create_key`, or use ``fresh_kms``, which wipes
the server (``POST /moto-api/reset``) and recreates the two default keys.
"""

from __future__ import annotations

import base64
import os
import tempfile
import traceback
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from app_adapter.config import Settings

__all__ = [
    "KmsServer",
    "assert_no_secret",
    "exception_text",
    "fresh_kms",
    "kms_server",
    "kms_settings",
    "secret_forms",
]

REGION = "us-east-1"


@dataclass
class KmsServer:
    """Handle on the running moto server and its two default keys."""

    endpoint_url: str
    monkeypatch: pytest.MonkeyPatch
    hmac_key_id: str = ""
    cmk_id: str = ""
    admin: Any = field(default=None, repr=False)

    def create_key(self, key_spec: str = "SYMMETRIC_DEFAULT", key_usage: str | None = None) -> str:
        """Create a key; usage defaults from the spec. Returns its KeyId."""
        if key_usage is None:
            key_usage = "GENERATE_VERIFY_MAC" if key_spec.startswith("HMAC_") else "ENCRYPT_DECRYPT"
        meta = self.admin.create_key(KeySpec=key_spec, KeyUsage=key_usage)["KeyMetadata"]
        return meta["KeyId"]

    def reset(self) -> None:
        """Wipe moto's state and recreate the two default keys (new ids)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
        self.hmac_key_id = self.create_key("HMAC_512")
        self.cmk_id = self.create_key("SYMMETRIC_DEFAULT")
        self.monkeypatch.setenv("KMS_HMAC_KEY_ID", self.hmac_key_id)
        self.monkeypatch.setenv("KMS_APPLICATION_CMK_ID", self.cmk_id)

    def settings(self, **overrides: Any) -> Settings:
        """Settings for the default keys, with short timeouts for tests."""
        values: dict[str, Any] = {
            "aws_region": REGION,
            "hmac_key_id": self.hmac_key_id,
            "application_cmk_id": self.cmk_id,
            "kms_connect_timeout": 1.0,
            "kms_read_timeout": 1.0,
        }
        values.update(overrides)
        return Settings(**values)


@pytest.fixture(scope="session")
def kms_server() -> Iterator[KmsServer]:
    """moto's KMS as a real HTTP server on 127.0.0.1, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp = pytest.MonkeyPatch()
    try:
        with tempfile.TemporaryDirectory(prefix="owui-kms-") as home:
            _point_boto3_at(mp, endpoint, os.path.join(home, "absent"))
            handle = KmsServer(endpoint_url=endpoint, monkeypatch=mp)
            handle.admin = boto3.session.Session(region_name=REGION).client("kms")
            handle.hmac_key_id = handle.create_key("HMAC_512")
            handle.cmk_id = handle.create_key("SYMMETRIC_DEFAULT")
            mp.setenv("KMS_HMAC_KEY_ID", handle.hmac_key_id)
            mp.setenv("KMS_APPLICATION_CMK_ID", handle.cmk_id)
            yield handle
            handle.admin.close()
    finally:
        mp.undo()
        server.stop()


def _point_boto3_at(mp: pytest.MonkeyPatch, endpoint: str, no_file: str) -> None:
    # Only boto3's own variables: the code under test reads no endpoint
    # setting of ours. Config files, profiles, roles and IMDS are shut out so
    # a developer's ~/.aws cannot change what the tests see.
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", no_file)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", no_file)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_SESSION_TOKEN", "testing")
    mp.setenv("AWS_REGION", REGION)
    mp.setenv("AWS_DEFAULT_REGION", REGION)
    mp.setenv("AWS_ENDPOINT_URL_KMS", endpoint)


@pytest.fixture
def kms_settings(kms_server: KmsServer) -> Settings:
    """Settings for the session's default keys."""
    return kms_server.settings()


@pytest.fixture
def fresh_kms(kms_server: KmsServer) -> Iterator[KmsServer]:
    """The server wiped and given two new default keys, for state-changing tests.

    Wiped again afterwards, so a disabled default key never leaks into the
    next test.
    """
    kms_server.reset()
    yield kms_server
    kms_server.reset()


def secret_forms(secret: bytes) -> list[str]:
    """The ways a secret could show up in text: hex, base64 flavours, bytes repr."""
    b64 = base64.b64encode(secret).decode()
    urlsafe = base64.urlsafe_b64encode(secret).decode()
    return [
        secret.hex(),
        secret.hex().upper(),
        b64,
        b64.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
        repr(secret)[2:-1],
    ]


def assert_no_secret(text: str, secret: bytes) -> None:
    """Fail if ``text`` contains ``secret`` in any of :func:`secret_forms`."""
    for form in secret_forms(secret):
        assert form not in text, "a secret leaked into text"


def exception_text(exc: BaseException) -> str:
    """str, repr and the full formatted traceback (with causes) of ``exc``."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])
