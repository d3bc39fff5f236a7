"""The soak's load: simulated users doing through Open WebUI's HTTP API what its web client does.

Each user is one thread with a bounded loop (count and time) and think time, sending each request to either serve
instance. Everything a user writes carries the user's marker (``mkr<NNN>x<hex8>``), in sealed fields only (titles,
messages, note bodies, feedback comments: never names, emails or tags, which stay plaintext by policy), so a leak
is a marker in the wrong place. Every request becomes one line of the events file (the interface with
scripts/soak_report.py); every response body is scanned for other users' markers, real envelopes and the
``[encrypted]`` placeholder. A ledger keeps what Open WebUI acknowledged (2xx), and what may or may not have been
written (no answer, or a 5xx): the final check accepts only those. Users with a socket.io connection, who wait
for their replies on it, are scripts/soak_socket.py's.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests import owui

STUB_MODEL = "e2e-stub-model"
MARKER = re.compile(r"mkr\d{3}x[0-9a-f]{8}")
ENVELOPE = re.compile(r"oc1:[0-9a-f]{16}:")
PLACEHOLDER = "[encrypted]"
PASSWORD = "soak-Pw-" + secrets.token_hex(6)
REPLY_TIMEOUT_S = 40.0
REQUEST_TIMEOUT_S = 30.0


def marker_for(index: int) -> str:
    return f"mkr{index:03d}x{secrets.token_hex(4)}"


class EventLog:
    """events.jsonl: one line per request, written as it ends (the report sorts by start time)."""

    def __init__(self, path: Path) -> None:
        self.t0 = time.monotonic()
        self._file = path.open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, start: float, ms: float, user: str, instance: str, action: str, status: int,
               detail: str) -> None:
        line = json.dumps({"t": round(start, 3), "ms": round(ms, 1), "user": user, "instance": instance,
                           "action": action, "status": status, "detail": detail})
        with self._lock:
            self._file.write(line + "\n")
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class Violations:
    """Invariant breaks seen while running: messages name users, actions and ids, never user text."""

    items: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: str) -> None:
        with self.lock:
            if len(self.items) < 1000:
                self.items.append(message)


def scan_response(text: str, own_marker: str | None, *, placeholders_ok: bool = False) -> list[str]:
    """What must never be in an answer to this user: others' markers, envelopes, placeholders."""
    found = []
    others = {m for m in MARKER.findall(text) if m != own_marker}
    if others:
        found.append(f"another user's marker ({len(others)} distinct)")
    if ENVELOPE.search(text):
        found.append("a real envelope (oc1:<key id>:...)")
    if not placeholders_ok and PLACEHOLDER in text:
        found.append("the [encrypted] placeholder")
    return found


def _detail(response: httpx.Response | None, exc: BaseException | None) -> str:
    if exc is not None:
        return type(exc).__name__
    assert response is not None
    if response.is_success:
        return ""
    body = MARKER.sub("<marker>", response.text[:120])  # no user text in the events file
    return re.sub(r"\s+", " ", body)


class Api:
    """One user's HTTP session with both instances; records every request and scans every answer."""

    def __init__(self, label: str, token: str, endpoints: dict[str, str], events: EventLog, violations: Violations,
                 rng: random.Random, marker: str | None, *, placeholders_ok: bool = False) -> None:
        self.label = label
        self.marker = marker
        self.events = events
        self.violations = violations
        self.rng = rng
        self.placeholders_ok = placeholders_ok
        headers = {"Authorization": f"Bearer {token}"}
        self.clients = {name: httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S)
                        for name, url in endpoints.items()}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def pick(self) -> str:
        return self.rng.choice(sorted(self.clients))

    def call(self, action: str, method: str, path: str, *, instance: str | None = None,
             **kw: Any) -> httpx.Response | None:
        """The response, or None when no HTTP answer came (refused, reset, timed out)."""
        instance = instance or self.pick()
        start = self.events.now()
        began = time.monotonic()
        response: httpx.Response | None = None
        error: BaseException | None = None
        try:
            response = self.clients[instance].request(method, path, **kw)
        except httpx.HTTPError as exc:
            error = exc
        ms = (time.monotonic() - began) * 1000
        self.events.record(start, ms, self.label, instance, action, response.status_code if response else 0,
                           _detail(response, error))
        if response is not None:
            for problem in scan_response(response.text, self.marker, placeholders_ok=self.placeholders_ok):
                self.violations.add(f"{self.label} {action} on {instance} ({response.status_code}): {problem}")
        return response


def uncertain(response: httpx.Response | None) -> bool:
    """No clear answer: the write may or may not have happened."""
    return response is None or response.status_code >= 500


# -- the ledger ---------------------------------------------------------------------------------------------------

Fingerprint = tuple[str, tuple[tuple[str, str], ...]]  # title, sorted (message id, content)


def fingerprint(title: str, chat: dict[str, Any]) -> Fingerprint:
    messages = ((chat.get("history") or {}).get("messages") or {})
    return title, tuple(sorted((mid, _content(m)) for mid, m in messages.items()))


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True)


@dataclass
class ChatLedger:
    """What the owner may read back from one chat: the last acknowledged version, or a version written after it
    without a clear answer; messages of completions that got no clear answer may be absent, or hold the user's
    text or a prefix of the stub's echo."""

    id: str
    acked: Fingerprint | None = None
    maybe: list[Fingerprint] = field(default_factory=list)
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # message id -> allowed contents / prefixes
    tainted: bool = False  # a completion may still write into it: no more edits
    any_title: bool = False  # made by a completion that got no clear answer: the title is Open WebUI's
    titles: set[str] = field(default_factory=set)

    def ack(self, fp: Fingerprint) -> None:
        self.acked, self.maybe = fp, []
        self.titles.add(fp[0])

    def maybe_written(self, fp: Fingerprint) -> None:
        self.maybe.append(fp)
        self.titles.add(fp[0])

    @property
    def settled(self) -> bool:
        return not self.maybe and not self.extras and self.acked is not None

    def accepts(self, fp: Fingerprint) -> bool:
        bases = ([self.acked] if self.acked else []) + self.maybe
        return any(self._within(base, fp) for base in bases)

    def _within(self, base: Fingerprint, fp: Fingerprint) -> bool:
        if base[0] != fp[0] and not self.any_title:
            return False
        have, want = dict(fp[1]), dict(base[1])
        for mid, content in have.items():
            if mid in want and want[mid] == content:
                continue
            if mid in self.extras and any(content == a or (a.startswith("prefix:") and a[7:].startswith(content))
                                          for a in self.extras[mid]):
                continue
            return False
        return all(mid in have or mid in self.extras for mid in want)


@dataclass
class NoteLedger:
    id: str
    acked: tuple[str, str] | None = None  # title, markdown
    maybe: list[tuple[str, str]] = field(default_factory=list)

    def accepts(self, value: tuple[str, str]) -> bool:
        return value == self.acked or value in self.maybe


@dataclass
class UserLedger:
    label: str
    user_id: str
    marker: str
    chats: dict[str, ChatLedger] = field(default_factory=dict)
    notes: dict[str, NoteLedger] = field(default_factory=dict)
    feedback: dict[str, str] = field(default_factory=dict)  # id -> comment, acknowledged
    shares: dict[str, str] = field(default_factory=dict)  # share id -> chat id
    unknown_chats: list[Fingerprint] = field(default_factory=list)  # creations with no clear answer (id unknown)
    unknown_texts: set[str] = field(default_factory=set)  # texts of completions whose new chat id is unknown
    unknown_notes: list[tuple[str, str]] = field(default_factory=list)
    unknown_feedback: set[str] = field(default_factory=set)
    deleted: bool = False
    writes_acked: int = 0
    writes_uncertain: int = 0


# -- chats shaped like the web client's ----------------------------------------------------------------------------

def chat_document(title: str, texts: list[str]) -> dict[str, Any]:
    """Turns alternating user / assistant, as the web client posts a chat."""
    return owui.chat_document(title, [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)],
                              model=STUB_MODEL)


# -- one simulated user --------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One completion as the web client sends it, and what the chat may hold if its reply has no clear end."""

    request: dict[str, Any]
    follow: ChatLedger | None  # the settled chat it continues, or None: a new chat
    text: str
    reply_id: str
    extras: dict[str, tuple[str, ...]]  # message id -> allowed contents / prefixes


ACTIONS = (("new_chat", 3), ("completion", 3), ("edit_chat", 3), ("read", 4), ("search", 1), ("share", 1),
           ("feedback", 1), ("note", 2))


@dataclass
class UserSim:
    ledger: UserLedger
    api: Api
    rng: random.Random
    violations: Violations
    think_s: tuple[float, float]
    n: int = 0

    def text(self, what: str) -> str:
        self.n += 1
        return f"{self.ledger.marker} {what} {self.n} {secrets.token_hex(3)}"

    def run(self, deadline: float, stop: threading.Event, max_iterations: int) -> None:
        names = [a for a, _ in ACTIONS]
        weights = [w for _, w in ACTIONS]
        for _ in range(max_iterations):
            if stop.is_set() or time.monotonic() >= deadline or self.ledger.deleted:
                return
            action = self.rng.choices(names, weights)[0]
            try:
                getattr(self, action)()
            except Exception as exc:  # a bug of the simulation, not of the system: report it
                self.violations.add(f"{self.ledger.label}: simulation error in {action}: {type(exc).__name__}")
            if self.api.events is not None and self._gone():
                return
            self.between()
            stop.wait(self.rng.uniform(*self.think_s))

    def between(self) -> None:
        """Between two actions: nothing here; the socket.io users send their heartbeat (scripts/soak_socket.py)."""

    def _gone(self) -> bool:
        return self.ledger.deleted

    def _json(self, response: httpx.Response | None) -> Any:
        try:
            return response.json() if response is not None else None
        except ValueError:
            return None

    def _settled_chat(self) -> ChatLedger | None:
        candidates = [c for c in self.ledger.chats.values() if not c.tainted and c.acked is not None]
        return self.rng.choice(candidates) if candidates else None

    def _note_401(self, response: httpx.Response | None) -> None:
        if response is not None and response.status_code == 401 and self.ledger.deleted is False:
            pass  # the user may have been deleted by the admin: the soak's user_delete fault sets `deleted`

    # -- actions --
    def new_chat(self) -> None:
        title = self.text("title")
        doc = chat_document(title, [self.text("question"), self.text("answer")])
        fp = fingerprint(title, doc)
        response = self.api.call("new_chat", "POST", "/api/v1/chats/new", json={"chat": doc})
        body = self._json(response)
        if response is not None and response.is_success and isinstance(body, dict) and body.get("id"):
            ledger = ChatLedger(body["id"])
            ledger.ack(fp)
            self.ledger.chats[ledger.id] = ledger
            self.ledger.writes_acked += 1
        elif uncertain(response):
            self.ledger.unknown_chats.append(fp)
            self.ledger.writes_uncertain += 1

    def read(self) -> None:
        self.api.call("list_chats", "GET", "/api/v1/chats/list", params={"page": 1})
        chat = self._settled_chat()
        if chat is None:
            return
        self.get_and_check(chat)

    def get_and_check(self, chat: ChatLedger) -> dict[str, Any] | None:
        """GET the chat; while it is settled, what it reads must be exactly what was acknowledged."""
        response = self.api.call("get_chat", "GET", f"/api/v1/chats/{chat.id}")
        body = self._json(response)
        if response is None or not response.is_success or not isinstance(body, dict):
            return None
        fp = fingerprint(body.get("title") or "", body.get("chat") or {})
        if chat.settled and fp != chat.acked:
            self.violations.add(f"{self.ledger.label}: chat {chat.id} read back differs from its acknowledged "
                                "version (during the run)")
        return body

    def edit_chat(self) -> None:
        chat = self._settled_chat()
        if chat is None:
            return
        body = self.get_and_check(chat)
        if body is None or not chat.settled:
            return
        doc = body.get("chat") or {}
        messages = (doc.get("history") or {}).get("messages") or {}
        users = [m for m in messages.values() if m.get("role") == "user"]
        if not users:
            return
        target = self.rng.choice(users)
        target["content"] = self.text("edited")
        for legacy in doc.get("messages") or []:
            if legacy.get("id") == target["id"]:
                legacy["content"] = target["content"]
        doc["title"] = self.text("retitled")
        fp = fingerprint(doc["title"], doc)
        response = self.api.call("edit_chat", "POST", f"/api/v1/chats/{chat.id}", json={"chat": doc})
        if response is not None and response.is_success:
            chat.ack(fp)
            self.ledger.writes_acked += 1
        elif uncertain(response):
            chat.maybe_written(fp)
            self.ledger.writes_uncertain += 1

    def completion(self) -> None:
        """POST /api/chat/completions as the web client asks (session_id, id, parent_id, user_message); the
        reply is streamed by a task of Open WebUI's into the chat, which is polled until the reply is done. (The
        socket.io users of scripts/soak_socket.py wait for the done event instead.)"""
        prompt = self.prompt(f"soak-{self.ledger.label}")
        if prompt is None:
            return
        chat = self.send(prompt, self.api.pick())
        if chat is not None and not self._wait_reply(chat, prompt):
            self.unsettled(chat, prompt)

    def prompt(self, session_id: str) -> Prompt | None:
        """The next completion request: in a new chat, or after the current message of a settled one."""
        follow = self._settled_chat() if self.rng.random() < 0.5 else None
        text = self.text("prompt")
        user_id, reply_id = str(uuid.uuid4()), str(uuid.uuid4())
        parent_id = None
        if follow is not None:
            body = self.get_and_check(follow)
            if body is None or not follow.settled:
                return None
            parent_id = ((body.get("chat") or {}).get("history") or {}).get("currentId")
        request: dict[str, Any] = {
            "model": STUB_MODEL, "stream": True, "messages": [{"role": "user", "content": text}],
            "parent_id": parent_id, "id": reply_id, "session_id": session_id,
            "user_message": {"id": user_id, "parentId": parent_id, "childrenIds": [reply_id], "role": "user",
                             "content": text, "timestamp": int(time.time())}}
        if follow is not None:
            request["chat_id"] = follow.id
        extras = {user_id: (text,), reply_id: ("prefix:echo: " + text,)}
        return Prompt(request, follow, text, reply_id, extras)

    def send(self, prompt: Prompt, instance: str) -> ChatLedger | None:
        """POST the prompt to ``instance``; the chat the reply goes into, or None (no clear answer: noted)."""
        response = self.api.call("completion", "POST", "/api/chat/completions", instance=instance,
                                 json=prompt.request)
        body = self._json(response)
        follow = prompt.follow
        chat_id = follow.id if follow is not None else (body or {}).get("chat_id") if isinstance(body, dict) else None
        if response is None or not response.is_success or not chat_id:
            if uncertain(response):
                self.ledger.writes_uncertain += 1
                if follow is not None:
                    follow.extras.update(prompt.extras)
                    follow.tainted = True
                else:
                    self.ledger.unknown_texts.update([prompt.text, "prefix:echo: " + prompt.text])
            return None
        chat = self.ledger.chats.get(chat_id)
        if chat is None:
            chat = ChatLedger(chat_id)
            self.ledger.chats[chat_id] = chat
        return chat

    def unsettled(self, chat: ChatLedger, prompt: Prompt) -> None:
        """No done reply seen: the reply may still be written (or not), so the chat takes no more edits."""
        chat.extras.update(prompt.extras)
        chat.tainted = True
        if chat.acked is None:
            chat.acked = ("", ())  # no base: what the server holds is only what `extras` allows
            chat.any_title = True
        self.ledger.writes_uncertain += 1

    def _wait_reply(self, chat: ChatLedger, prompt: Prompt) -> bool:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(0.4)
            settled = self.settle(chat, prompt, "poll_reply")
            if settled is not None:
                return settled
        return False

    def settle(self, chat: ChatLedger, prompt: Prompt, action: str) -> bool | None:
        """GET the chat once: True when the reply is done and is the stub's echo (the chat is acknowledged as it
        reads), False when Open WebUI gave up on it, None when it is not done or the read failed."""
        response = self.api.call(action, "GET", f"/api/v1/chats/{chat.id}")
        body = self._json(response)
        if response is None or not response.is_success or not isinstance(body, dict):
            return None
        messages = ((body.get("chat") or {}).get("history") or {}).get("messages") or {}
        reply = messages.get(prompt.reply_id) or {}
        if not reply.get("done"):
            return None
        content = reply.get("content")
        if reply.get("error") or not content:
            return False  # Open WebUI gave up on it (a fault): nothing was promised
        if content != "echo: " + prompt.text:
            shape = (f"{type(content).__name__} of {len(content)} chars, starts with the echo: "
                     f"{str(content).startswith('echo: ')}, keys {sorted(reply)}")
            self.violations.add(f"{self.ledger.label}: completion reply in chat {chat.id} is done but is not "
                                f"the stub's echo of the prompt ({shape})")
        chat.ack(fingerprint(body.get("title") or "", body.get("chat") or {}))
        self.ledger.writes_acked += 1
        return True

    def search(self) -> None:
        response = self.api.call("search", "GET", "/api/v1/chats/search", params={"text": self.ledger.marker})
        body = self._json(response)
        if response is not None and response.is_success and isinstance(body, list):
            foreign = [c.get("id") for c in body if isinstance(c, dict) and c.get("user_id") not in
                       (None, self.ledger.user_id)]
            if foreign:
                self.violations.add(f"{self.ledger.label}: search returned {len(foreign)} chats of other users")

    def share(self) -> None:
        chat = self._settled_chat()
        if chat is None:
            return
        response = self.api.call("share", "POST", f"/api/v1/chats/{chat.id}/share")
        body = self._json(response)
        if response is None or not response.is_success or not isinstance(body, dict):
            return
        share_id = body.get("share_id") or body.get("id")
        if not share_id:
            return
        self.ledger.shares[share_id] = chat.id
        shared = self.api.call("get_share", "GET", f"/api/v1/chats/share/{share_id}")
        got = self._json(shared)
        if shared is not None and shared.is_success and isinstance(got, dict) and got.get("title") not in chat.titles:
            self.violations.add(f"{self.ledger.label}: share {share_id} reads another title than its chat had")

    def feedback(self) -> None:
        chat = self._settled_chat()
        if chat is None or chat.acked is None:
            return
        messages = [mid for mid, _ in chat.acked[1]]
        if not messages:
            return
        comment = self.text("feedback")
        form = {"type": "rating",
                "data": {"rating": self.rng.choice([1, -1]), "model_id": STUB_MODEL, "reason": "",
                         "comment": comment},
                "meta": {"chat_id": chat.id, "message_id": self.rng.choice(messages), "model_id": STUB_MODEL}}
        response = self.api.call("feedback", "POST", "/api/v1/evaluations/feedback", json=form)
        body = self._json(response)
        if response is not None and response.is_success and isinstance(body, dict) and body.get("id"):
            self.ledger.feedback[body["id"]] = comment
            self.ledger.writes_acked += 1
        elif uncertain(response):
            self.ledger.unknown_feedback.add(comment)
            self.ledger.writes_uncertain += 1

    def note(self) -> None:
        notes = list(self.ledger.notes.values())
        if notes and self.rng.random() < 0.5:
            note = self.rng.choice(notes)
            value = (self.text("note title"), self.text("note body"))
            response = self.api.call("edit_note", "POST", f"/api/v1/notes/{note.id}/update",
                                     json={"title": value[0], "data": {"content": {"md": value[1]}}})
            if response is not None and response.is_success:
                note.acked, note.maybe = value, []
                self.ledger.writes_acked += 1
            elif uncertain(response):
                note.maybe.append(value)
                self.ledger.writes_uncertain += 1
            return
        value = (self.text("note title"), self.text("note body"))
        response = self.api.call("new_note", "POST", "/api/v1/notes/create",
                                 json={"title": value[0], "data": {"content": {"md": value[1]}}})
        body = self._json(response)
        if response is not None and response.is_success and isinstance(body, dict) and body.get("id"):
            self.ledger.notes[body["id"]] = NoteLedger(body["id"], value)
            self.ledger.writes_acked += 1
        elif uncertain(response):
            self.ledger.unknown_notes.append(value)
            self.ledger.writes_uncertain += 1


def note_value(body: dict[str, Any]) -> tuple[str, str]:
    data = body.get("data") or {}
    content = data.get("content") or {} if isinstance(data, dict) else {}
    return body.get("title") or "", (content.get("md") if isinstance(content, dict) else "") or ""
