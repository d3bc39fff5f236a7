"""Who is acting, where FastAPI and socket.io run Open WebUI's code (app_adapter.owui.binding).

Open WebUI's own code paths are exercised by test_owui.py; here a tiny
FastAPI app shaped like Open WebUI's (an async ``get_current_user``, a sync
``get_verified_user`` depending on it) shows that the user bound by the
overridden dependency is the one every kind of endpoint work sees: async and
sync endpoints, tasks the request spawns, streamed bodies, background tasks.
No database: the key service is a stand-in.
"""

from __future__ import annotations

import asyncio
import os
import types

import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from app_adapter import errors
from app_adapter.hook import Adapter, acting_user
from app_adapter.owui import binding
from app_adapter.secret import SecretBytes


class FakeKeys:
    """KeyService's resolution side, without KMS or a database."""

    def __init__(self) -> None:
        self.resolved: list[str] = []

    def share_key(self) -> SecretBytes:
        return SecretBytes(b"s" * 32)

    def dek(self, user_id: str) -> SecretBytes:
        return SecretBytes(os.urandom(32))

    async def adek(self, user_id: str) -> SecretBytes:
        if user_id == "ghost":
            raise errors.NotProvisioned("user ghost has no wrapped key")
        self.resolved.append(user_id)
        return SecretBytes(os.urandom(32))


@pytest.fixture
def adapter() -> Adapter:
    return Adapter(FakeKeys())  # type: ignore[arg-type]


def owui_like_app(adapter: Adapter) -> tuple[FastAPI, list]:
    async def get_current_user(request: Request, background_tasks: BackgroundTasks):
        user_id = request.headers.get("x-user")
        return types.SimpleNamespace(id=user_id, role="user") if user_id else None

    def get_verified_user(user=Depends(get_current_user)):  # sync, like utils/auth.py:576
        return user

    seen: list = []
    app = FastAPI()

    @app.get("/async")
    async def async_endpoint(user=Depends(get_verified_user)):
        return {"acting": acting_user()}

    @app.get("/sync")
    def sync_endpoint(user=Depends(get_verified_user)):  # runs in Starlette's threadpool
        return {"acting": acting_user()}

    @app.get("/task")
    async def spawning_endpoint(user=Depends(get_verified_user)):
        async def child() -> str | None:
            await asyncio.sleep(0)
            return acting_user()
        return {"acting": await asyncio.create_task(child())}

    @app.get("/stream")
    async def streaming_endpoint(user=Depends(get_verified_user)):
        async def body():
            yield f"{acting_user()}\n"
        return StreamingResponse(body())

    @app.get("/background")
    async def background_endpoint(tasks: BackgroundTasks, user=Depends(get_verified_user)):
        tasks.add_task(lambda: seen.append(acting_user()))
        return {}

    wrapper = binding.acting_dependency(adapter, get_current_user)
    assert binding.replace_dependency(app, get_current_user, wrapper) == 5  # once per route's dependency tree
    assert not app.dependency_overrides  # FastAPI's per-request re-inspection stays off
    return app, seen


def test_the_caller_is_bound_for_every_kind_of_endpoint_work(adapter: Adapter) -> None:
    app, seen = owui_like_app(adapter)
    with TestClient(app) as client:
        for path in ("/async", "/sync", "/task"):
            assert client.get(path, headers={"x-user": "alice"}).json() == {"acting": "alice"}, path
            assert client.get(path, headers={"x-user": "bob"}).json() == {"acting": "bob"}, path
        assert client.get("/stream", headers={"x-user": "alice"}).text == "alice\n"
        client.get("/background", headers={"x-user": "bob"})
        assert seen == ["bob"]
        assert client.get("/async").json() == {"acting": None}  # nobody: nothing bound, nothing leaked
        refused = client.get("/async", headers={"x-user": "ghost"})
        assert refused.status_code == 403 and "no encryption key" in refused.json()["detail"]


def test_socket_handlers_act_as_the_session_user(adapter: Adapter) -> None:
    seen: list = []

    async def connect(sid, environ, auth):
        seen.append(("connect", acting_user()))

    async def chat_events(sid, data):
        seen.append(("events:chat", acting_user()))

    async def catch_all(event, sid, *args):
        seen.append((event, acting_user()))

    handlers = {"connect": connect, "events:chat": chat_events, "*": catch_all}
    pool = {"sid-a": {"id": "alice"}, "sid-g": {"id": "ghost"}}
    assert binding.bind_socket_handlers(adapter, handlers, pool) == ["events:chat", "*"]
    assert binding.bind_socket_handlers(adapter, handlers, pool) == []  # never wrapped twice

    async def main() -> None:
        await handlers["connect"]("sid-a", {}, {})
        await handlers["events:chat"]("sid-a", {})
        await handlers["*"]("alice:chat:x", "sid-a", {})
        await handlers["events:chat"]("sid-unknown", {})
        await handlers["events:chat"]("sid-g", {})  # user without a key: runs unbound
        assert acting_user() is None  # unbound again after each handler

    asyncio.run(main())
    assert seen == [("connect", None), ("events:chat", "alice"), ("alice:chat:x", "alice"),
                    ("events:chat", None), ("events:chat", None)]


def test_automations_and_timers_act_as_the_owner(adapter: Adapter) -> None:
    seen: list = []

    async def execute_automation(app, automation):
        seen.append(acting_user())
        await asyncio.create_task(asyncio.sleep(0))

    async def owner(app, automation):
        return automation.user_id

    wrapped = binding.acting_as_owner(adapter, execute_automation, owner)

    async def main() -> None:
        await wrapped(None, types.SimpleNamespace(user_id="carol"))
        await wrapped(None, types.SimpleNamespace(user_id=None))
        await wrapped(None, types.SimpleNamespace(user_id="ghost"))
        assert acting_user() is None

    asyncio.run(main())
    assert seen == ["carol", None, None]


def test_websocket_token_resolver_binds_in_the_calling_task(adapter: Adapter) -> None:
    async def get_verified_user_by_token(token, redis=None):
        return types.SimpleNamespace(id=token) if token else None

    resolve = binding.binding_user_resolver(adapter, get_verified_user_by_token)

    async def handler(token):
        user = await resolve(token, None)
        return user.id if user else None, acting_user()

    async def main():
        return [await asyncio.create_task(handler(t)) for t in ("dave", "", "ghost")]

    assert asyncio.run(main()) == [("dave", "dave"), (None, None), (None, None)]
