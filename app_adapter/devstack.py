"""A throw-away local stack for the demo and the benchmarks.

PostgreSQL (see :mod:`app_adapter.devdb`) with Open WebUI 0.12.4's real schema
and owui-crypto installed, and AWS KMS emulated by moto as a real HTTP server
on 127.0.0.1 with an HMAC_512 key and a symmetric CMK. Needs the ``test``
extra (moto). Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg

from app_adapter import devdb, migrate
from app_adapter.config import Settings
from app_adapter.migrate import project_file

OWUI_SCHEMA = ("tests", "fixtures", "owui_0_12_4_schema.sql")
REGION = "us-east-1"


@dataclass(frozen=True)
class Stack:
    server: devdb.Server
    database: str
    kms_endpoint: str
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url(self.database)


@contextlib.contextmanager
def kms_emulator() -> Iterator[tuple[str, str, str]]:
    """moto's KMS on a free loopback port; yields (endpoint, hmac key id, cmk id).

    Points boto3 at it through its standard variables for the duration.
    """
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_KMS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_REGION", "AWS_DEFAULT_REGION", "KMS_HMAC_KEY_ID",
                                           "KMS_APPLICATION_CMK_ID")}
    os.environ.update(AWS_ENDPOINT_URL_KMS=endpoint, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
                      AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION)
    try:
        kms = boto3.client("kms", region_name=REGION, endpoint_url=endpoint)
        hmac_key = kms.create_key(KeySpec="HMAC_512", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
        cmk = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
        os.environ.update(KMS_HMAC_KEY_ID=hmac_key, KMS_APPLICATION_CMK_ID=cmk)
        yield endpoint, hmac_key, cmk
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def install_owui_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(project_file(*OWUI_SCHEMA).read_text(encoding="utf-8"))


@contextlib.contextmanager
def local_stack(prefix: str = "owui_crypto_demo") -> Iterator[Stack]:
    server = devdb.find_server()
    with kms_emulator() as (endpoint, _, _), server.scratch_database(prefix) as name:
        install_owui_schema(server.url(name))
        migrate.upgrade(server.url(name))
        yield Stack(server, name, endpoint, Settings.from_env())


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 58) -> None:
    """Print two texts in two wrapped columns (the demos' "as read" beside "as stored")."""
    lw = textwrap.wrap(left, width, break_on_hyphens=False) or [""]
    rw = textwrap.wrap(right, width, break_on_hyphens=False) or [""]
    print(f"  {left_title:<{width}} | {right_title}")
    print(f"  {'-' * width} | {'-' * width}")
    for i in range(max(len(lw), len(rw))):
        print(f"  {lw[i] if i < len(lw) else '':<{width}} | {rw[i] if i < len(rw) else ''}")
    print()
