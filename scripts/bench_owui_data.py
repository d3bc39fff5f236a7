"""The data of ``make bench-owui``: users, chats and their sizes, the same for both servers.

Everything is drawn from one seeded :class:`random.Random`, so two runs with
the same seed send the same chats. A chat is a document shaped as Open WebUI's
web client writes it (``history.messages`` plus the legacy ``messages`` list),
imported through ``POST /api/v1/chats/import`` with spread-out timestamps.

Sizes (of the chat's JSON document, both copies of every message included):
log-normal with a median of 4 KiB, so most chats are a few KB, and a long tail
to 200 KiB; every user with 100 chats or more also gets 1% of them between 64
and 200 KiB, one of them at the full 200 KiB, so the tail is there at every
scale. Two words serve the searches: ``TITLE_WORD`` is in about 5% of the
titles and never in a message, ``TEXT_WORD`` in a message of about 5% of the
chats and never in a title.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MODEL = "e2e-stub-model"  # e2e/llm_stub.py's model
KIB = 1024
MAX_CHAT_BYTES = 200 * KIB
MEDIAN_CHAT_BYTES = 4 * KIB
SIGMA = 1.25  # of ln(size): p90 about 20 KiB, p99 about 75 KiB before the forced tail
TITLE_WORD = "kubernetes"
TEXT_WORD = "quokka"
SEARCH_SHARE = 0.05

_WORDS_TEXT = """
the of and to in is that for it as with was on be by this are or at from have an they which one you were her all
she there would their we him been has when who will more no if out so said what up its about into than them can
only other new some could time these two may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right used take
three states himself few house use during without again place american around however home small found thought went
say part once general high upon school every government until always away something fact though water less public
put think almost hand enough far took head yet number system better set told nothing night end why called eyes find
going look asked later knew point next program city business give group toward young days let room president side
social given present several order national possible rather second face per among form important often things
looked early white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members others mind country area done turned although open god
service certain kind problem began different door thus help sense means whole matter perhaps itself york times law
human line above name example action company hands local show whether five history gave today either act feet across
taken past quite anyone having seen death experience body word half really week field car words already themselves
information tell together college shall money period held keep sure probably free seems political real behind
cannot question air office making brought whose special major heard problems ago became federal moment study
available known result street economic boy position reason change south board individual job areas society
"""
_WORDS = _WORDS_TEXT.split()
_TOPICS_TEXT = """
python postgres docker terraform react rust budget recipe travel fitness garden mortgage resume interview essay
poem contract invoice pipeline migration backup index query latency cache kernel network firewall certificate
spreadsheet presentation marketing sales onboarding holiday birthday wedding knee diet sleep guitar piano chess
"""
_TOPICS = _TOPICS_TEXT.split()
assert TITLE_WORD not in _WORDS + _TOPICS and TEXT_WORD not in _WORDS + _TOPICS


@dataclass
class Chat:
    """One chat as both servers get it; ``ids`` maps a server's name to the id it gave the chat."""

    index: int
    doc: dict[str, Any]
    created_at: int
    updated_at: int
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return str(self.doc["title"])

    def size(self) -> int:
        return len(json.dumps(self.doc))


@dataclass
class User:
    """A user of the benchmark, the same on both servers; ``tokens``/``ids`` per server name."""

    key: str  # "u20", "u1000", "other1", "writer", "admin"
    email: str
    name: str
    role: str
    chats: list[Chat] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)


PASSWORD = "bench-owui-password-1"


def prose(rng: random.Random, n_chars: int, vocab: list[str] | None = None) -> str:
    """About ``n_chars`` of words drawn from ``vocab`` (common English words by default)."""
    vocab = vocab or _WORDS
    words: list[str] = []
    length = 0
    while length < n_chars:
        chunk = rng.choices(vocab, k=24)
        words.extend(chunk)
        length += sum(len(w) + 1 for w in chunk)
    text = " ".join(words)[:n_chars].rstrip()
    return text[:1].upper() + text[1:] + "."


def chat_size(rng: random.Random) -> int:
    """A chat's JSON size in bytes: log-normal, median 4 KiB, at most 200 KiB, at least 700 bytes."""
    size = math.exp(rng.gauss(math.log(MEDIAN_CHAT_BYTES), SIGMA))
    return int(min(MAX_CHAT_BYTES, max(700, size)))


def message(rng: random.Random, role: str, content: str, parent: str | None, ts: int) -> dict[str, Any]:
    m: dict[str, Any] = {"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "parentId": parent,
                         "childrenIds": [], "role": role, "content": content, "timestamp": ts}
    if role == "assistant":
        m.update(model=MODEL, modelName=MODEL, done=True)
    else:
        m["models"] = [MODEL]
    return m


def append(doc: dict[str, Any], msg: dict[str, Any]) -> None:
    """Add a message after the current one, in both the history tree and the legacy list (as the web client)."""
    history = doc["history"]
    parent = history.get("currentId")
    msg["parentId"] = parent
    if parent:
        history["messages"][parent]["childrenIds"].append(msg["id"])
    history["messages"][msg["id"]] = msg
    history["currentId"] = msg["id"]
    doc["messages"].append(msg)


def chat_document(rng: random.Random, target: int, title_word: bool, text_word: bool, ts: int) -> dict[str, Any]:
    """A chat of about ``target`` bytes of JSON, turns alternating user / assistant."""
    topic = rng.choice(_TOPICS)
    title_words = [topic, *rng.choices(_WORDS, k=rng.randint(2, 5))]
    if title_word:
        title_words.insert(rng.randint(0, len(title_words)), TITLE_WORD)
    doc: dict[str, Any] = {"title": " ".join(title_words).capitalize(), "models": [MODEL],
                           "history": {"messages": {}, "currentId": None}, "messages": [], "tags": [],
                           "params": {}, "timestamp": ts * 1000}
    estimate, i = 400, 0
    vocab = [*_WORDS, topic, topic]
    marked_at = -1
    while estimate < target or i < 2:
        role = "user" if i % 2 == 0 else "assistant"
        median = 250 if role == "user" else 1400
        n = int(min(12000, max(20, math.exp(rng.gauss(math.log(median), 0.8)))))
        n = min(n, max(20, (target - estimate) // 2))
        content = prose(rng, n, vocab)
        if text_word and role == "user" and marked_at < 0:
            marked_at = i
            cut = content.rfind(" ", 0, max(1, len(content) // 2))
            content = f"{content[:cut]} {TEXT_WORD}{content[cut:]}" if cut > 0 else f"{TEXT_WORD} {content}"
        append(doc, message(rng, role, content, None, ts + i * 20))
        estimate += 2 * (len(content) + 330)
        i += 1
    return doc


def make_chats(rng: random.Random, n: int, now: int) -> list[Chat]:
    sizes = [chat_size(rng) for _ in range(n)]
    if n >= 100:  # the long tail, at every scale: 1% between 64 and 200 KiB, one at 200 KiB
        tail = max(1, n // 100)
        for j, k in enumerate(rng.sample(range(n), tail)):
            sizes[k] = MAX_CHAT_BYTES if j == 0 else rng.randint(64 * KIB, MAX_CHAT_BYTES)
    titled = {i for i in range(n) if rng.random() < SEARCH_SHARE} or {rng.randrange(n)}  # at least one each
    texted = {i for i in range(n) if rng.random() < SEARCH_SHARE} or {rng.randrange(n)}
    chats = []
    for i, size in enumerate(sizes):
        created = now - rng.randint(3600, 365 * 86400)
        updated = min(now - 60, created + rng.randint(60, 30 * 86400))
        doc = chat_document(rng, size, i in titled, i in texted, created)
        chats.append(Chat(i, doc, created, updated))
    return chats


def make_users(seed: int, measured: list[int], others: int, other_chats: int) -> list[User]:
    """admin (signs up first, creates the others), the measured users (``u<N>`` with N chats each), a few
    other users with chats of their own, and ``writer`` (new chats and completions land there, so the
    measured users' chat counts stay as seeded)."""
    rng = random.Random(seed)
    now = int(time.time())
    users = [User("admin", "bench-admin@example.com", "Bench Admin", "admin")]
    for n in measured:
        user = User(f"u{n}", f"bench-u{n}@example.com", f"Bench {n}", "user")
        user.chats = make_chats(rng, n, now)
        users.append(user)
    for k in range(1, others + 1):
        user = User(f"other{k}", f"bench-other{k}@example.com", f"Other {k}", "user")
        user.chats = make_chats(rng, other_chats, now)
        users.append(user)
    users.append(User("writer", "bench-writer@example.com", "Bench Writer", "user"))
    return users


def size_summary(chats: list[Chat]) -> str:
    sizes = sorted(c.size() for c in chats)
    if not sizes:
        return "no chats"

    def q(p: float) -> int:
        return sizes[min(len(sizes) - 1, int(p * len(sizes)))]

    return (f"{len(sizes)} chats, {sum(sizes) / 1e6:.1f} MB: median {q(0.5) / KIB:.1f} KiB, p90 {q(0.9) / KIB:.1f}, "
            f"p99 {q(0.99) / KIB:.1f}, max {sizes[-1] / KIB:.0f} KiB")


def import_batches(chats: list[Chat], max_chats: int = 40, max_bytes: int = 3_000_000) -> list[list[Chat]]:
    """Chats in groups for ``POST /api/v1/chats/import``, bounded in count and bytes."""
    batches: list[list[Chat]] = [[]]
    size = 0
    for chat in chats:
        s = chat.size()
        if batches[-1] and (len(batches[-1]) >= max_chats or size + s > max_bytes):
            batches.append([])
            size = 0
        batches[-1].append(chat)
        size += s
    return [b for b in batches if b]


def import_form(chat: Chat) -> dict[str, Any]:
    return {"chat": chat.doc, "meta": {}, "pinned": False, "archived": False, "folder_id": None,
            "created_at": chat.created_at, "updated_at": chat.updated_at}


def ten_message_chat(rng: random.Random, label: str) -> dict[str, Any]:
    """The body of one ``POST /api/v1/chats/new``: 10 messages of typical length (about 9 KB of JSON)."""
    ts = int(time.time())
    doc: dict[str, Any] = {"title": f"{label} {rng.choice(_TOPICS)} {rng.choice(_WORDS)}", "models": [MODEL],
                           "history": {"messages": {}, "currentId": None}, "messages": [], "tags": [],
                           "params": {}, "timestamp": ts * 1000}
    for i in range(10):
        role = "user" if i % 2 == 0 else "assistant"
        append(doc, message(rng, role, prose(rng, 150 if role == "user" else 700, _WORDS), None, ts + i))
    return {"chat": doc}


def follow_up(rng: random.Random, chat: Chat) -> dict[str, Any]:
    """Append one message to ``chat`` (its document changes); returns the body of the
    ``POST /api/v1/chats/{id}`` the web client sends then: the whole history, as it does."""
    append(chat.doc, message(rng, "user", prose(rng, 250, _WORDS), None, int(time.time())))
    d = chat.doc
    return {"chat": {"models": d["models"], "history": d["history"], "messages": d["messages"],
                     "params": d["params"]}}
