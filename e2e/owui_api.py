"""Open WebUI's HTTP API as the e2e tests use it, and chat documents shaped like the web client's."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

import httpx

from tests import owui


def words(label: str) -> str:
    """A phrase nobody else writes: what the tests look for in dumps, logs and responses."""
    return f"{label} {secrets.token_hex(5)} quokka {secrets.token_hex(5)}"


_TOKEN = re.compile(r"\b[0-9a-f]{10}\b")


def tokens(text: str) -> list[str]:
    """The random parts of a phrase made by :func:`words`."""
    return _TOKEN.findall(text)


def chat_document(title: str, texts: list[str]) -> dict:
    """A chat as the web client posts it, turns alternating user / assistant."""
    return owui.chat_document(title, [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)],
                              model="e2e-model")


@dataclass
class Chat:
    id: str
    title: str
    texts: list[str]
    owner: str

    def secrets(self) -> list[str]:
        """Every string of this chat that must never appear outside its owner's responses."""
        return [self.title, *self.texts]


@dataclass
class User:
    id: str
    email: str
    name: str
    password: str
    token: str
    role: str
    chats: list[Chat] = field(default_factory=list)


def ok(response: httpx.Response, *expected: int) -> httpx.Response:
    codes = expected or (200,)
    assert response.status_code in codes, f"{response.request.method} {response.request.url.path}: " \
                                          f"{response.status_code} {response.text[:500]}"
    return response


def signup(client: httpx.Client, name: str, email: str, password: str) -> User:
    body = ok(client.post("/api/v1/auths/signup", json={"name": name, "email": email, "password": password})).json()
    return User(body["id"], email, name, password, body["token"], body["role"])


def add_user(admin: httpx.Client, name: str, email: str, password: str, client: httpx.Client) -> User:
    ok(admin.post("/api/v1/auths/add", json={"name": name, "email": email, "password": password, "role": "user"}))
    body = ok(client.post("/api/v1/auths/signin", json={"email": email, "password": password})).json()
    return User(body["id"], email, name, password, body["token"], body["role"])


def new_chat(client: httpx.Client, owner: User, label: str, n_messages: int = 4) -> Chat:
    title = words(f"{label} title")
    texts = [words(f"{label} message {i}") for i in range(n_messages)]
    body = ok(client.post("/api/v1/chats/new", json={"chat": chat_document(title, texts)})).json()
    chat = Chat(body["id"], title, texts, owner.id)
    owner.chats.append(chat)
    return chat


def message_texts(chat_json: dict) -> list[str]:
    history = (chat_json.get("history") or {}).get("messages") or {}
    return sorted(m.get("content") for m in history.values())
