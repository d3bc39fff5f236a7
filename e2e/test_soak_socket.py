"""The soak's socket.io users (scripts/soak_socket.py) against one ``owui-crypto serve``.

Two users keep a socket.io connection as Open WebUI's web client does and ask the stub model at the same time,
each with their real socket session id. Each must get its own reply streamed on its socket and nothing of the
other's: no event about the other's messages, none of the other's words, no envelope, no placeholder. The soak
counts on exactly this when it scans every payload a socket receives.

The server is this module's own, on a throw-away database (the first sign-up becomes its admin).
"""

from __future__ import annotations

import json
import random
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app_adapter import devdb
from e2e.conftest import Owui, Roles, logged_database, start_owui, stop_owui
from e2e.llm_stub import LlmStub
from e2e.owui_api import User, add_user, ok, signup
from scripts import soak_load, soak_socket

REPLY_WAIT_S = 90.0  # an upper bound on waiting, not an assertion: a reply that never comes fails as "timeout"


@pytest.fixture(scope="module")
def server(pg_server: devdb.Server, e2e_roles: Roles, kms_server, llm: LlmStub,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owui]:
    with logged_database(pg_server, "owui_crypto_e2e_socket", owner=e2e_roles.owner) as database:
        handle = start_owui(pg_server.url(database), database, llm, tmp_path_factory.mktemp("socket"), {},
                            roles=e2e_roles)
        try:
            yield handle
        finally:
            stop_owui(handle)


@dataclass
class Person:
    user: User
    marker: str
    link: soak_socket.SocketLink


@pytest.fixture(scope="module")
def people(server: Owui) -> Iterator[dict[str, Person]]:
    violations = soak_load.Violations()
    with server.client() as anon:
        admin = signup(anon, "Admin", "admin-socket@example.com", "admin-Pw-12345")
        with server.client(admin.token) as a:
            users = {name: add_user(a, name.title(), f"{name}-socket@example.com", f"{name}-Pw-12345", anon)
                     for name in ("alice", "bob")}
    result = {}
    for i, (name, user) in enumerate(users.items()):
        marker = soak_load.marker_for(i)
        link = soak_socket.SocketLink(name, user.token, {"a": server.base_url}, marker, violations,
                                      random.Random(i))
        result[name] = Person(user, marker, link)
    try:
        yield result
    finally:
        for person in result.values():
            person.link.close()
        assert not violations.items, violations.items


def _ask(server: Owui, person: Person, sid: str) -> tuple[str, soak_socket.Waiter, str]:
    """POST a completion in a new chat as the web client does, with the socket's session id, words carrying the
    user's marker; (chat id, the reply's waiter, the words)."""
    ledger = soak_load.UserLedger(person.user.name, person.user.id, person.marker)  # no chats: a new one
    api = typing.cast(soak_load.Api, None)  # a prompt in a new chat reads nothing
    sim = soak_socket.SocketUserSim(ledger, api, random.Random(0), person.link.violations, (0.0, 0.0),
                                    link=person.link)
    prompt = sim.prompt(sid)
    assert prompt is not None
    waiter = person.link.expect(prompt)
    with server.client(person.user.token) as c:
        chat_id = ok(c.post("/api/chat/completions", json=prompt.request)).json()["chat_id"]
    return chat_id, waiter, prompt.text


def test_each_socket_gets_its_own_streamed_reply_and_nothing_of_the_other(server: Owui,
                                                                            people: dict[str, Person]) -> None:
    alice = people["alice"]
    sids = {name: p.link.ensure() for name, p in people.items()}
    assert all(sids.values()), "a socket did not connect"
    asked = {name: _ask(server, p, sids[name]) for name, p in people.items()}  # both replies stream at once
    outcomes = {name: waiter.wait(REPLY_WAIT_S) for name, (_, waiter, _) in asked.items()}
    assert outcomes == {"alice": "done", "bob": "done"}

    for name, person in people.items():
        other = "bob" if name == "alice" else "alice"
        seen = "\n".join(person.link.seen)
        chat_id, waiter, text = asked[name]
        other_chat, other_waiter, other_text = asked[other]
        assert "echo: " + text in seen, f"{name}'s socket did not stream {name}'s reply"
        assert other_text not in seen and people[other].marker not in seen, f"{name}'s socket saw {other}'s words"
        assert other_waiter.reply_id not in seen and other_chat not in seen, \
            f"{name}'s socket saw an event about {other}'s chat"
        with server.client(person.user.token) as c:
            reply = ok(c.get(f"/api/v1/chats/{chat_id}")).json()["chat"]["history"]["messages"][waiter.reply_id]
        assert reply["content"] == "echo: " + text and reply["done"]
    assert not alice.link.violations.items, alice.link.violations.items  # what the soak checks on every payload


def test_the_soak_user_counts_socket_exchanges(server: Owui, people: dict[str, Person], tmp_path: Path) -> None:
    """SocketUserSim, as the soak runs it: each completion is one ``completion_socket`` event, 200 at the done
    event, and the chat is acknowledged as it reads afterwards."""
    alice = people["alice"]
    events = soak_load.EventLog(tmp_path / "events.jsonl")
    ledger = soak_load.UserLedger("alice", alice.user.id, alice.marker)
    api = soak_load.Api("alice", alice.user.token, {"a": server.base_url}, events, alice.link.violations,
                        random.Random(2), alice.marker)
    alice.link.events = events
    try:
        sim = soak_socket.SocketUserSim(ledger, api, random.Random(3), alice.link.violations, (0.0, 0.0),
                                        link=alice.link)
        for _ in range(3):
            sim.completion()
    finally:
        api.close()
        alice.link.events = None
        events.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    exchanges = [e for e in lines if e["action"] == "completion_socket"]
    assert [e["status"] for e in exchanges] == [200, 200, 200], exchanges
    assert ledger.writes_acked == 3 and ledger.writes_uncertain == 0
    assert all(c.settled for c in ledger.chats.values())
    assert not alice.link.violations.items, alice.link.violations.items


def test_the_link_flags_what_a_socket_must_never_receive() -> None:
    """The scan the tests above rely on, fed by hand: another user's marker, an envelope, the placeholder, and an
    event about a message this user never asked for are each a violation; its own words are not."""
    violations = soak_load.Violations()
    own, other = soak_load.marker_for(1), soak_load.marker_for(2)
    link = soak_socket.SocketLink("alice", "token", {"a": "http://127.0.0.1:1"}, own, violations, random.Random(0))
    ledger = soak_load.UserLedger("alice", "alice-id", own)
    sim = soak_socket.SocketUserSim(ledger, typing.cast(soak_load.Api, None), random.Random(0), violations,
                                    (0.0, 0.0), link=link)
    prompt = sim.prompt("sid")
    assert prompt is not None
    waiter = link.expect(prompt)

    def event(message_id: str, content: str, done: bool = False) -> None:
        data = {"type": "chat:completion", "data": {"content": content, "done": done}}
        link._on_event("events", ({"chat_id": "c", "message_id": message_id, "data": data},))

    event(prompt.reply_id, f"echo: {own} words")
    assert not violations.items and waiter.outcome is None
    for content in (f"echo: {other}", "oc1:0123456789abcdef:AAAA", "[encrypted]"):
        event(prompt.reply_id, content)
    event("a-message-of-somebody-else", "")
    assert len(violations.items) == 4, violations.items
    event(prompt.reply_id, "echo: done", done=True)
    assert waiter.wait(0) == "done"
