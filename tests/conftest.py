"""Test harness: real PostgreSQL, one throw-away database per test.

A run makes one template database (Open WebUI 0.12.4's real schema, then
``alembic upgrade head``) and clones it for every test that asks for ``db``.
Everything it creates is named ``owui_crypto_t_*`` and dropped at the end.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from app_adapter import devdb, migrate
from tests.keyring import Keyring

FIXTURES = Path(__file__).parent / "fixtures"
OWUI_SCHEMA = FIXTURES / "owui_0_12_4_schema.sql"

pytest_plugins = ["tests.kms_fixtures", "tests.pgbouncer", "tests.roles"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[devdb.Server]:
    server = devdb.find_server()  # raises NoServer: every test errors, none is skipped
    yield server
    if server.keepalive is not None:
        server.keepalive.stop()


def load_owui_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(OWUI_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def template_db(pg_server: devdb.Server) -> Iterator[str]:
    name = pg_server.create_database("owui_crypto_t_tmpl")
    try:
        load_owui_schema(pg_server.url(name))
        migrate.upgrade(pg_server.url(name))
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def db(pg_server: devdb.Server, template_db: str) -> Iterator[str]:
    name = pg_server.create_database("owui_crypto_t", template=template_db)
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def db_url(pg_server: devdb.Server, db: str) -> str:
    return pg_server.url(db)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url) as connection:
        yield connection


@pytest.fixture
def keyring(db_url: str) -> Keyring:
    return Keyring(db_url)


@pytest.fixture
def service(kms_server, db_url: str) -> Iterator:
    """The adapter's KeyService on this test's database, with moto as KMS."""
    from app_adapter.keys import KeyService

    svc = KeyService(kms_server.settings(), db_url)
    yield svc
    svc.kms.close()


@pytest.fixture
def run_id() -> str:
    return secrets.token_hex(4)


APP_SEARCH_PATH = "owui_crypto_view,public,pg_temp"


@pytest.fixture
def app(db_url: str) -> Iterator[psycopg.Connection]:
    """A connection as Open WebUI gets it: the decrypting views first on its search_path."""
    with psycopg.connect(db_url, options=f"-c search_path={APP_SEARCH_PATH}") as connection:
        yield connection


@pytest.fixture
def app2(db_url: str) -> Iterator[psycopg.Connection]:
    """A second, independent application connection."""
    with psycopg.connect(db_url, options=f"-c search_path={APP_SEARCH_PATH}") as connection:
        yield connection
