"""The soak's socket.io users: they keep a socket.io connection to Open WebUI as its web client does, send their
completions with their real socket session id, and wait for the reply's done event on the socket instead of
polling the chat.

As the web client (Open WebUI 0.12.4's src/routes/+layout.svelte): websocket transport at ``/ws/socket.io``, the
user's token as the connection's auth, ``user-join`` with the token after every connect, a ``heartbeat`` every
30 s, python-socketio's own reconnection (1 s doubling to 5 s, +-50%) after a dropped connection, and a new
connection when the server disconnected it. A socket that stays down (its serve was SIGKILLed) is replaced by one
to either instance. The completion is POSTed to either instance, whichever the socket is on: the events of a task
on one instance reach a socket on the other through Redis (``WEBSOCKET_MANAGER=redis``).

Every payload a socket receives is scanned as HTTP bodies are (another user's marker, a real envelope, the
``[encrypted]`` placeholder), and an ``events`` payload about a message this user never asked for is a leak too.
Each exchange is one line of the events file: action ``completion_socket``, status 200 when the done event came
(500 when it came with an error), 0 on a timeout or a disconnect, ``ms`` the time from the POST to the done event.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import socketio

from scripts.soak_load import EventLog, Prompt, UserSim, Violations, scan_response

SOCKET_PATH = "/ws/socket.io"
HEARTBEAT_S = 30.0  # the web client's default websocket_heartbeat_interval
CONNECT_TIMEOUT_S = 10.0
RECONNECT_WAIT_S = 6.0  # how long a user waits for python-socketio's own reconnection before a new socket
RECONNECT_ATTEMPTS = 30  # python-socketio's reconnection gives up after these (about 2.5 min at 5 s apiece)
#: Longer than the pollers' 40 s: a timeout here is an error the report must explain by a fault, and the slowest
#: replies of a 15-minute run with 50 users on 2 cores took 25 s (p99) to 44 s (max, near faults).
REPLY_TIMEOUT_S = 60.0
SEEN_KEPT = 200  # payloads kept per link for a test to read (the soak scans each as it arrives)


@dataclass
class Waiter:
    """The end of one reply as the socket sees it: ``done``, ``error`` (done with an error, or cancelled) or
    ``disconnected``; None until then."""

    reply_id: str
    outcome: str | None = None
    contents: list[str] = field(default_factory=list)  # the streamed content of each chat:completion event
    ended: threading.Event = field(default_factory=threading.Event)

    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self.ended.set()

    def wait(self, timeout: float) -> str:
        return self.outcome if self.ended.wait(max(0.0, timeout)) and self.outcome else "timeout"


@dataclass
class LinkStats:
    connects: int = 0  # new sockets (python-socketio's own reconnections not counted)
    failed_connects: int = 0
    reconnects: int = 0  # connects of an existing socket after a drop (python-socketio's reconnection)
    server_disconnects: int = 0
    events: int = 0
    done: int = 0
    asked_across: int = 0  # completions POSTed to the other instance than the socket's (its events cross Redis)
    done_across: int = 0  # of those, the ones whose done event came
    lost: int = 0  # timeouts and disconnects


class SocketLink:
    """One user's socket.io connection, kept as the web client keeps it; at most one socket at a time."""

    def __init__(self, label: str, token: str, endpoints: dict[str, str], marker: str | None,
                 violations: Violations, rng: random.Random, events: EventLog | None = None) -> None:
        self.label, self.token, self.endpoints, self.marker = label, token, endpoints, marker
        self.violations, self.rng, self.events = violations, rng, events
        self.client: socketio.Client | None = None
        self.instance: str | None = None
        self.stats = LinkStats()
        self.seen: collections.deque[str] = collections.deque(maxlen=SEEN_KEPT)
        self.asked: set[str] = set()  # reply ids this user asked for: events about any other message are a leak
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self._heartbeat_at = 0.0
        self._server_dropped = False  # python-socketio does not reconnect after a server disconnect

    # -- the connection --
    def ensure(self) -> str | None:
        """The socket.io session id of a connected socket, or None when neither instance takes one now."""
        client = self.client
        if client is not None:
            deadline = time.monotonic() + RECONNECT_WAIT_S
            while not client.connected and not self._server_dropped and time.monotonic() < deadline:
                time.sleep(0.2)  # python-socketio may be reconnecting right now
            if client.connected:
                with contextlib.suppress(Exception):
                    return client.get_sid("/")
            self._drop()
        first = self.rng.choice(sorted(self.endpoints))
        for instance in [first, *sorted(set(self.endpoints) - {first})]:
            sid = self._connect(instance)
            if sid is not None:
                return sid
        return None

    def _connect(self, instance: str) -> str | None:
        client = socketio.Client(reconnection=True, reconnection_attempts=RECONNECT_ATTEMPTS, reconnection_delay=1,
                                 reconnection_delay_max=5, randomization_factor=0.5, handle_sigint=False,
                                 request_timeout=CONNECT_TIMEOUT_S)
        client.on("connect", lambda: self._on_connect(client))
        client.on("disconnect", lambda reason=None: self._on_disconnect(client, reason))
        client.on("*", lambda event, *args: self._on_event(event, args))
        start = self.events.now() if self.events else 0.0
        began = time.monotonic()
        status, detail = 200, ""
        try:
            client.connect(self.endpoints[instance], socketio_path=SOCKET_PATH, transports=["websocket"],
                           auth={"token": self.token}, wait_timeout=CONNECT_TIMEOUT_S, retry=False)
            sid = client.get_sid("/")
        except Exception as exc:  # refused, reset, timed out: no socket on this instance now
            status, detail, sid = 0, type(exc).__name__, None
            with contextlib.suppress(Exception):
                client.shutdown()
        if self.events is not None:
            self.events.record(start, (time.monotonic() - began) * 1000, self.label, instance, "socket_connect",
                               status, detail)
        if sid is None:
            self.stats.failed_connects += 1
            return None
        self.client, self.instance, self._server_dropped = client, instance, False
        self.stats.connects += 1
        self._heartbeat_at = time.monotonic()
        return sid

    def _on_connect(self, client: socketio.Client) -> None:
        if client is self.client:
            self.stats.reconnects += 1  # the first connect of a socket happens before it becomes self.client
        client.emit("user-join", {"auth": {"token": self.token}})  # what the web client emits on every connect

    def _on_disconnect(self, client: socketio.Client, reason: object) -> None:
        """Events sent while a socket is down are lost: every reply waited for on it ends here. After a server
        disconnect python-socketio does not reconnect: the next :meth:`ensure` makes a new socket."""
        if reason == socketio.Client.reason.SERVER_DISCONNECT and client is self.client:
            self.stats.server_disconnects += 1
            self._server_dropped = True
        with self._lock:
            waiting = list(self._waiters.values())
        for waiter in waiting:
            waiter.end("disconnected")

    def _on_event(self, event: str, args: tuple[Any, ...]) -> None:
        """Every payload is scanned; ``events`` about this user's replies feed their waiters."""
        self.stats.events += 1
        text = json.dumps(args, ensure_ascii=False, default=str)
        self.seen.append(f"{event} {text}")
        where = f"{self.label} socket event {str(event)[:40]!r} on {self.instance}"
        for problem in scan_response(text, self.marker):
            self.violations.add(f"{where}: {problem}")
        payload = args[0] if args and isinstance(args[0], dict) else None
        if event != "events" or payload is None:
            return
        message_id = payload.get("message_id")
        if message_id and message_id not in self.asked:
            self.violations.add(f"{where}: about message {message_id}, which this user never asked for")
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        kind, inner = data.get("type"), data.get("data") if isinstance(data.get("data"), dict) else {}
        with self._lock:
            waiter = self._waiters.get(message_id) if message_id else None
        if waiter is None:
            return
        if kind == "chat:completion":
            if isinstance(inner.get("content"), str):
                waiter.contents.append(inner["content"])
            if inner.get("done"):
                waiter.end("error" if inner.get("error") else "done")
        elif kind in ("chat:message:error", "chat:tasks:cancel"):
            waiter.end("error")

    def heartbeat(self) -> None:
        client = self.client
        if client is not None and client.connected and time.monotonic() - self._heartbeat_at >= HEARTBEAT_S:
            self._heartbeat_at = time.monotonic()
            with contextlib.suppress(Exception):
                client.emit("heartbeat", {})

    # -- replies --
    def expect(self, prompt: Prompt) -> Waiter:
        """Before the POST: the done event may come before its answer. Events name the reply, or the user's
        message (``chat:list``)."""
        waiter = Waiter(prompt.reply_id)
        with self._lock:
            self.asked.update([prompt.reply_id, prompt.request["user_message"]["id"]])
            self._waiters[prompt.reply_id] = waiter
        return waiter

    def forget(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.pop(waiter.reply_id, None)

    def _drop(self) -> None:
        client, self.client, self.instance = self.client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()  # disconnects, or stops python-socketio's reconnection and joins it

    def close(self) -> None:
        self._drop()


class SocketUserSim(UserSim):
    """A simulated user whose completions go through its socket.io session, as the web client's do."""

    def __init__(self, *args: Any, link: SocketLink, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.link = link

    def between(self) -> None:
        self.link.heartbeat()

    def completion(self) -> None:
        sid = self.link.ensure()
        if sid is None:
            super().completion()  # no socket on either instance now: the reply is polled, as an HTTP user's
            return
        prompt = self.prompt(sid)
        if prompt is None:
            return
        waiter = self.link.expect(prompt)
        try:
            self._exchange(prompt, waiter)
        finally:
            self.link.forget(waiter)

    def _exchange(self, prompt: Prompt, waiter: Waiter) -> None:
        api, link = self.api, self.link
        socket_instance = link.instance or "?"
        post_instance = api.pick()
        start = api.events.now()
        began = time.monotonic()
        chat = self.send(prompt, post_instance)
        if chat is None:
            return  # no clear answer to the POST (noted by send) or a 4xx: nothing to wait for
        across = post_instance != socket_instance
        link.stats.asked_across += across
        outcome = waiter.wait(REPLY_TIMEOUT_S - (time.monotonic() - began))
        ms = (time.monotonic() - began) * 1000
        status = {"done": 200, "error": 500}.get(outcome, 0)
        api.events.record(start, ms, api.label, socket_instance, "completion_socket", status,
                          f"{outcome}; posted to {post_instance}")
        if outcome == "done":
            link.stats.done += 1
            link.stats.done_across += across
            if self.settle(chat, prompt, "read_reply"):
                return
        elif outcome in ("timeout", "disconnected"):
            link.stats.lost += 1
        self.unsettled(chat, prompt)  # the reply may still be written, or not


def socket_users(labels: list[str], share: float, seed: int) -> set[str]:
    """Which users keep a socket: ``share`` of them (rounded), chosen by the run's seed."""
    count = round(max(0.0, min(1.0, share)) * len(labels))
    return set(random.Random(seed).sample(sorted(labels), count))


def summary(links: list[SocketLink]) -> dict[str, int]:
    total: dict[str, int] = collections.Counter()
    for link in links:
        total.update(vars(link.stats))
    return dict(total, users=len(links))

