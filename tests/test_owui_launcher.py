"""What ``owui-crypto serve`` refuses before it touches anything, the version range, the shape checks,
the refusal answers, and where a wheel finds its SQL. No Open WebUI needed (e2e/ runs the real one)."""

from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest

from app_adapter import errors, migrate
from app_adapter.owui import compat, launcher, responses

GOOD = {"DATABASE_URL": "postgresql://u:p@db:5432/owui", "WEBUI_SECRET_KEY": "s" * 32}


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "0.12.4")
    monkeypatch.setattr(compat, "installed_from_wheel", lambda: True)


def test_plan_normalises_the_url_and_switches_open_webuis_own_migrations_off(supported):
    env = dict(GOOD)
    plan = launcher.plan(env)
    assert plan.database_url == "postgresql+psycopg://u:p@db:5432/owui" == env["DATABASE_URL"]
    assert plan.run_owui_migrations is True and env["ENABLE_DB_MIGRATIONS"] == "false"
    assert env["FROM_INIT_PY"] == "true"
    assert launcher.plan({**GOOD, "ENABLE_DB_MIGRATIONS": "false"}).run_owui_migrations is False
    assert launcher.plan({**GOOD, "DATABASE_URL": "postgres://u@h/d"}).database_url == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize(("change", "says"), [
    ({"DATABASE_URL": ""}, "SQLite"),
    ({"DATABASE_URL": "sqlite:///data/webui.db"}, "cannot protect SQLite"),
    ({"DATABASE_URL": "sqlite+sqlcipher:///data/webui.db"}, "cannot protect SQLite"),
    ({"DATABASE_URL": "postgresql+psycopg2://u@h/d"}, r"Use postgresql\+psycopg://"),
    ({"DATABASE_URL": "mysql://u@h/d"}, "needs PostgreSQL"),
    ({"DATABASE_SCHEMA": "owui"}, "Unset it"),
    ({"UVICORN_WORKERS": "4"}, "UVICORN_WORKERS=1"),
    ({"WEBUI_SECRET_KEY": ""}, "WEBUI_SECRET_KEY"),
    ({"DATABASE_TYPE": "postgresql", "DATABASE_USER": "u", "DATABASE_HOST": "h", "DATABASE_PORT": "5432",
      "DATABASE_NAME": "d"}, "DATABASE_URL="),
])
def test_plan_refuses_what_it_cannot_protect_and_says_what_to_change(supported, change, says):
    with pytest.raises(launcher.ServeRefused, match=says):
        launcher.plan({**GOOD, **change})


def test_unsupported_or_missing_open_webui_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "0.13.1")
    with pytest.raises(compat.IncompatibleOpenWebUI, match=r"0\.13\.1 is not supported.*>=0\.12\.4,<0\.13"):
        launcher.plan(dict(GOOD))
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    with pytest.raises(compat.IncompatibleOpenWebUI, match="not installed"):
        launcher.plan(dict(GOOD))


@pytest.mark.parametrize(("version", "ok"), [("0.12.4", True), ("0.12.9", True), ("0.12.3", False),
                                              ("0.13.0", False), ("0.12.5rc1", False), ("unknown", False)])
def test_version_range(version, ok):
    assert compat.version_supported(version) is ok


def test_shape_checks_list_every_problem(monkeypatch):
    fake = types.ModuleType("fake_owui")

    async def get_current_user(request, response, background_tasks, auth_token):
        return None

    def sync_thing(a, b):
        return None

    fake.get_current_user = get_current_user
    fake.sync_thing = sync_thing
    monkeypatch.setitem(sys.modules, "fake_owui", fake)
    expected = (
        compat.Expect("fake_owui:get_current_user", "ok", is_async=True, params=compat.CURRENT_USER_PARAMS),
        compat.Expect("fake_owui:sync_thing", "it is awaited", is_async=True, params=("a", "b", "c")),
        compat.Expect("fake_owui:gone", "it is wrapped"),
    )
    assert expected[0].problems() == []
    with pytest.raises(compat.IncompatibleOpenWebUI) as refused:
        compat.check_shapes(expected)
    text = str(refused.value)
    assert "sync_thing: expected a coroutine function" in text and "('a', 'b', 'c')" in text
    assert "fake_owui:gone: missing" in text and "needed because it is wrapped" in text


def run_asgi(app, scope=None):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def main():
        await app(scope or {"type": "http", "method": "POST", "path": "/x"}, receive, send)

    asyncio.run(main())
    return sent


def refusing_app(status, raise_after=False):
    async def app(scope, receive, send):
        seen = responses._seen.get()
        seen.append(errors.NotOwner("user a is not the owner (b) of the row"))
        await send({"type": "http.response.start", "status": status, "headers": [(b"x-owui", b"1")]})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        if raise_after:
            raise AttributeError("'NoneType' object has no attribute 'user_id'")
    return app


def test_an_error_answer_after_a_refusal_becomes_that_refusal():
    sent = run_asgi(responses.RefusalResponses(refusing_app(500, raise_after=True)))
    assert sent[0]["status"] == 403 and (b"x-owui", b"1") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["owui_crypto"] == "OC002" and "another user" in body["detail"]
    assert len(sent) == 2


def test_a_success_answer_is_left_alone():
    sent = run_asgi(responses.RefusalResponses(refusing_app(200)))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"Internal Server Error"


def test_describe_maps_refusals_and_key_service_errors():
    assert responses.describe(errors.NotOwner("x"))[0] == 403
    assert responses.describe(errors.NoKeyActive("x"))[0] == 409
    assert responses.describe(errors.KmsUnreachable("x"))[0] == 503
    assert responses.describe(ValueError("x")) is None


def test_a_wheel_finds_its_files_under_share_not_the_alembic_library(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "app_adapter").mkdir(parents=True)
    (site / "alembic").mkdir()  # the Alembic library
    share = tmp_path / "prefix" / "share" / "owui-crypto"
    (share / "alembic").mkdir(parents=True)
    (share / "alembic.ini").write_text("[alembic]\n")
    monkeypatch.setattr(migrate, "__file__", str(site / "app_adapter" / "migrate.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert migrate.project_file("alembic") == share / "alembic"
    assert migrate.project_file("alembic.ini") == share / "alembic.ini"
    with pytest.raises(FileNotFoundError):
        migrate.project_file("sql", "00_foundation.sql")
