"""Open WebUI's own web interface, in headless Chromium, against ``owui-crypto serve`` and the stub model.

A new user does what a person does: signs up (the first account, so the admin),
chats, rates the reply with a comment, saves a memory, writes a note, makes a
folder, uploads a text file and asks about it, posts in a channel. Then the
owner sees all of it, each place loaded afresh; a second user, signed in in a
fresh browser profile, sees none of it; the admin sees the second user's chats
only as placeholders. Last, a ``pg_dump`` of the database and the PostgreSQL
server log are searched for every canary, one test per table, each naming the
table that holds one.

The tests run in file order and share one server, one set of canaries and the
browsers (module fixtures). Screenshots of every step: e2e/artifacts/browser/.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e.browser import Browser, BrowserFactory, xpath_literal
from e2e.conftest import Owui
from e2e.owui_api import tokens, words
from tests.serverlog import LogWindow

PLACEHOLDER_TITLE = "[encrypted]"
OWNER = ("Olivia Owner", "olivia@example.com", "olivia-Pw-12345")
OTHER = ("Bob Other", "bob@example.com", "bob-Pw-1234567")
_STARTED = time.monotonic()


@dataclass
class Site:
    """The server, the browsers and what was written through them."""

    owui: Owui
    browsers: BrowserFactory
    artifacts: Path
    owner: Browser | None = None
    canaries: dict[str, str] = field(default_factory=dict)  # what -> the text typed, owner's and other's
    ids: dict[str, str] = field(default_factory=dict)  # chat, file chat, note, channel, other chat ids
    timings: dict[str, float] = field(default_factory=dict)

    def canary(self, what: str) -> str:
        if what not in self.canaries:
            self.canaries[what] = words(what)
        return self.canaries[what]

    def owners(self) -> list[str]:
        return [text for what, text in self.canaries.items() if not what.startswith("other")]

    def others(self) -> list[str]:
        return [text for what, text in self.canaries.items() if what.startswith("other")]

    def step(self, name: str) -> None:
        self.timings[name] = time.monotonic() - _STARTED
        for browser in self.browsers.opened:
            for kind, seconds in browser.spent.items():
                self.timings[f"{browser.name}: {kind}"] = seconds


def not_shown(browser: Browser, texts: list[str], where: str) -> None:
    """None of ``texts``, nor any random part of them, is on the page: visible text or markup."""
    page = browser.driver.page_source + browser.page_text()
    leaked = sorted({t for text in texts for t in [text, *tokens(text)] if t in page})
    if leaked:
        path = browser.shot(f"leak {where}")
        pytest.fail(f"{browser.name} sees, on {where}: {leaked[:4]} (screenshot {path})")


@pytest.fixture(scope="module")
def site(browser_owui: Owui, browsers: BrowserFactory, artifacts: Path) -> Site:
    s = Site(browser_owui, browsers, artifacts)
    for what in ("chat message", "feedback comment", "memory", "note title", "note body", "folder name",
                 "folder prompt", "file content", "file question", "channel post",
                 "other chat message", "other feedback comment"):
        s.canary(what)
    s.canaries["file name"] = f"brief-{secrets.token_hex(5)}.txt"
    s.canaries["channel name"] = f"lounge-{secrets.token_hex(5)}"
    s.step("server started")
    return s


def owner(site: Site) -> Browser:
    assert site.owner is not None, "the owner's browser did not start (an earlier step failed)"
    return site.owner


# -- the owner, as a new user ------------------------------------------------------------------------


def test_sign_up_chat_title_and_reload(site: Site) -> None:
    b = site.owner = site.browsers.open(site.owui.base_url, "owner")
    b.sign_up_first_user(*OWNER)
    b.shows("What's New in Open WebUI")  # shown to the admin once per version
    b.shot("signed up whats new")
    b.dismiss_whats_new()
    b.shot("signed up")

    text = site.canary("chat message")
    chat_id = site.ids["chat"] = b.new_chat(text)
    b.shows(f"echo: {text}")  # the stub model's reply, streamed over socket.io
    b.shot("reply")
    # The title task: the stub's answer is not the JSON Open WebUI asks for, so Open WebUI falls back
    # to the first message as the title; it lands in the sidebar by a chat:title event.
    b.open_sidebar()
    b.element(f"//a[@href='/c/{chat_id}'][contains(normalize-space(.), '{tokens(text)[0]}')]", "the chat's title")
    b.shot("title in sidebar")

    b.driver.refresh()
    b.shows(f"echo: {text}")
    b.element(f"//a[@href='/c/{chat_id}'][contains(normalize-space(.), '{tokens(text)[0]}')]",
              "the title after a reload")
    b.shot("chat after reload")
    site.step("chat")


def test_thumbs_up_with_a_comment(site: Site) -> None:
    b = owner(site)
    b.go(f"/c/{site.ids['chat']}")
    b.shows(f"echo: {site.canaries['chat message']}")
    b.click(b.by_label("Good Response"), "Good Response")
    b.click(b.button("Accurate information"), "a reason")
    b.type_into(b.by_label("Additional feedback comments"), site.canary("feedback comment"))
    b.shot("feedback form")
    b.click(b.button("Save"), "Save feedback")
    b.until(lambda _: site.canaries["feedback comment"] in json.dumps(b.api("/api/v1/evaluations/feedbacks/user")),
            "the feedback to be saved")
    b.shot("feedback saved")
    site.step("feedback")


def test_memory(site: Site) -> None:
    b = owner(site)
    b.go("/")
    b.open_settings("Personalization")
    b.shows("Saved Memories")
    b.click(b.button("Actions"), "Actions")
    b.click(b.button("Add Memory"), "Add Memory")
    b.type_into(b.by_placeholder("Add a preference, fact, or instruction about you"), site.canary("memory"))
    b.click(b.button("Add"), "Add")
    b.shows(site.canaries["memory"])
    b.shows("Saved Memories 1")
    b.shot("memory added")
    b.escape()
    site.step("memory")


def test_note(site: Site) -> None:
    b = owner(site)
    b.go("/notes")
    b.click(b.button("Create"), "Create note")
    note_id = site.ids["note"] = b.until(
        lambda d: d.current_url.rsplit("/notes/", 1)[1] if "/notes/" in d.current_url else None, "the new note")
    title = b.by_placeholder("Title")
    b.until(lambda _: title.get_attribute("value"), "the new note's default title")  # then it is ours to change
    b.replace_text(title, site.canary("note title"))
    b.type_into(b.by_label("Write something..."), site.canary("note body"))
    b.until(lambda _: title.get_attribute("value") == site.canaries["note title"], "the title typed")
    b.until(lambda _: all(site.canaries[what] in json.dumps(b.api(f"/api/v1/notes/{note_id}"))
                          for what in ("note title", "note body")), "the note's title and body to be saved")
    b.shot("note written")
    b.go("/notes")
    b.shows(site.canaries["note title"])
    b.shot("notes list")
    site.step("note")


def test_folder(site: Site) -> None:
    b = owner(site)
    b.go("/")
    b.open_sidebar()
    b.click(b.by_label("New Folder"), "New Folder")
    b.type_into(b.by_placeholder("Enter folder name"), site.canary("folder name"))
    b.type_into(b.element("//textarea[starts-with(@placeholder, 'Write your model system prompt')]",
                          "the folder's system prompt"), site.canary("folder prompt"))
    b.shot("folder form")
    b.click(b.button("Save"), "Save folder")
    b.shows(site.canaries["folder name"])
    b.shot("folder in sidebar")
    site.step("folder")


def test_file_upload_and_question(site: Site) -> None:
    """Upload a text file and ask about it: with BYPASS_EMBEDDING_AND_RETRIEVAL the whole file goes
    to the model as context, so the stub's echo carries the file's text back."""
    b = owner(site)
    path = site.artifacts.parent / site.canaries["file name"]
    path.write_text(f"The secret fruit is durian. {site.canaries['file content']}\n", encoding="utf-8")
    try:
        b.go("/")
        b.attach(path)
        b.shows(site.canaries["file name"])
        b.until(lambda _: not b.visible("//*[contains(@class, 'animate-spin')]"), "the upload to finish")
        b.shot("file attached")
        b.send(site.canary("file question"))
        b.until(lambda d: "/c/" in d.current_url, "the file chat's URL")
        site.ids["file chat"] = b.driver.current_url.rsplit("/c/", 1)[1]
        b.shows(site.canaries["file content"])  # the reply echoes the prompt, file text included
        b.shows(site.canaries["file question"])
        b.shot("file answered")
    finally:
        path.unlink(missing_ok=True)
    site.step("file")


def test_channel_post(site: Site) -> None:
    b = owner(site)
    b.go("/")
    b.open_sidebar()
    b.click(b.by_label("Create Channel"), "Create Channel")
    b.type_into(b.by_placeholder("new-channel"), site.canaries["channel name"])
    b.click(b.button("Create"), "Create channel")
    site.ids["channel"] = b.until(
        lambda d: d.current_url.rsplit("/channels/", 1)[1] if "/channels/" in d.current_url else None,
        "the channel page")
    b.type_into(b.by_label("Type here..."), site.canary("channel post"), submit=True)
    b.shows(site.canaries["channel post"])
    b.shot("channel post")
    site.step("channel")


# -- who sees what -------------------------------------------------------------------------------------


def test_owner_sees_everything(site: Site) -> None:
    """Each place loaded afresh from the server (a full page load each)."""
    b = owner(site)
    b.go("/")
    b.expand("Folders")
    b.expand("Channels")
    for what in ("chat message", "folder name", "file question", "channel name"):
        b.shows(site.canaries[what])  # chat titles, the folder and the channel, in the sidebar
    b.shot("owner sidebar")
    b.go(f"/c/{site.ids['chat']}")
    b.shows(f"echo: {site.canaries['chat message']}")
    b.go(f"/c/{site.ids['file chat']}")
    b.shows(site.canaries["file content"])
    b.shows(site.canaries["file name"])
    b.shot("owner file chat")
    b.go(f"/notes/{site.ids['note']}")
    b.shows(site.canaries["note body"])
    b.go(f"/channels/{site.ids['channel']}")
    b.shows(site.canaries["channel post"])
    b.shot("owner channel")
    b.go("/")
    b.open_settings("Personalization")
    b.shows(site.canaries["memory"])
    b.shot("owner memory")
    b.go("/admin/evaluations/feedback")  # the owner is the admin: the feedback list shows her own
    b.click(b.by_text("e2e-stub-model", tag="td"), "her feedback")
    b.shows(site.canaries["feedback comment"])
    b.shot("owner feedback")
    b.escape()
    site.step("owner sees all")


def test_a_second_user_sees_none_of_it(site: Site) -> None:
    admin = owner(site)
    admin.go("/admin/users")
    admin.click(admin.button("Add User"), "Add User")
    admin.type_into(admin.by_placeholder("Enter Your Full Name"), OTHER[0])
    admin.type_into(admin.by_placeholder("Enter Your Email"), OTHER[1])
    admin.type_into(admin.by_placeholder("Enter Your Password"), OTHER[2])
    admin.click(admin.button("Save"), "Save user")
    admin.shows(OTHER[1])
    admin.shot("user added")

    b = site.browsers.open(site.owui.base_url, "other")
    b.sign_in(OTHER[1], OTHER[2])
    text = site.canaries["other chat message"]
    site.ids["other chat"] = b.new_chat(text)
    b.shows(f"echo: {text}")
    b.click(b.by_label("Good Response"), "Good Response")
    b.type_into(b.by_label("Additional feedback comments"), site.canaries["other feedback comment"])
    b.click(b.button("Save"), "Save feedback")
    b.until(lambda _: site.canaries["other feedback comment"] in json.dumps(
        b.api("/api/v1/evaluations/feedbacks/user")), "the other user's feedback to be saved")
    b.open_sidebar()
    b.element(f"//a[@href='/c/{site.ids['other chat']}'][contains(normalize-space(.), '{tokens(text)[0]}')]",
              "their own chat in the sidebar")  # the check below looks where their own text does show
    b.shot("other user chat")
    mine = site.owners()
    not_shown(b, mine, "their own home page and sidebar")
    for where, path in (("the owner's chat by URL", f"/c/{site.ids['chat']}"),
                        ("the owner's note by URL", f"/notes/{site.ids['note']}"),
                        ("the owner's channel by URL", f"/channels/{site.ids['channel']}")):
        b.go(path)  # Open WebUI refuses: it sends the user home
        b.until(lambda d: d.current_url.rstrip("/") == site.owui.base_url, f"a redirect home from {where}")
        b.chat_input()
        b.shot(f"other {where}")
        not_shown(b, mine, where)
    b.go("/notes")
    b.shows("No Notes")
    not_shown(b, mine, "the notes list")
    b.go("/")
    b.open_settings("Personalization")
    b.shows("Saved Memories 0")
    not_shown(b, mine, "their memories")
    b.shot("other memories")
    site.step("other user")


def test_the_admin_sees_placeholders_for_the_other_users_chats(site: Site) -> None:
    b = owner(site)
    b.go("/admin/users")
    b.click(b.by_label("Chats"), "the other user's Chats")
    b.shows(f"{OTHER[0]}'s Chats")
    b.shows(PLACEHOLDER_TITLE)
    b.shot("admin other users chats")
    not_shown(b, site.others(), "the other user's chat list")
    b.click(b.by_text(PLACEHOLDER_TITLE), "the placeholder chat")  # opens /s/<id>, the admin's read-only view
    b.until(lambda d: d.current_url.endswith(f"/s/{site.ids['other chat']}"), "the other user's chat")
    b.shows(PLACEHOLDER_TITLE)
    b.shot("admin opens other users chat")
    not_shown(b, site.others(), "the other user's chat")
    site.step("admin chats")


def test_the_admin_sees_no_text_of_the_other_users_feedback(site: Site) -> None:
    """Evaluations > Feedback lists every user's ratings; its details show the rated prompt, reply and comment.

    Open WebUI's details dialog reads ``snapshot.chat.chat.history.messages``: a placeholder snapshot
    without that shape leaves the dialog on its spinner for good.
    """
    b = owner(site)
    b.go("/admin/evaluations/feedback")
    row = b.element(f"//tr[.//img[@alt={xpath_literal(OTHER[0])}]]", "the other user's feedback row")
    b.click(row.find_element("xpath", ".//button[normalize-space(.)='e2e-stub-model']"), "the feedback")
    b.shows("Feedback Details")
    rendered = b.settles(lambda _: "Reason" in b.page_text(), timeout=5)
    b.shot("admin other users feedback")
    not_shown(b, site.others(), "the other user's feedback")
    site.step("admin feedback")
    if not rendered:
        listed = b.api("/api/v1/evaluations/feedbacks/list")
        theirs = [f for f in listed.get("items", []) if (f.get("user") or {}).get("name") == OTHER[0]]
        detail = b.api(f"/api/v1/evaluations/feedback/{theirs[0]['id']}") if theirs else {}
        pytest.fail("the admin's Feedback Details dialog never renders another user's feedback (it reads "
                    "snapshot.chat.chat.history.messages); the API gives it snapshot = "
                    + json.dumps((detail or {}).get("snapshot"))[:300])


# -- what the database and its log hold ----------------------------------------------------------------

#: Tables the browser wrote text into; every other table is checked as one.
TABLES = ["chat", "chat_message", "feedback", "memory", "note", "file", "folder", "channel", "message"]
OTHER_TABLES = "any other table"
LOG_ONLY = "statements naming no table"


#: Plaintext by decision (owui_crypto.plaintext_column, README "The protection policy"): where a canary may stand.
#: file.path is the storage location Open WebUI reads the upload from, and it embeds the file name; channel names
#: are shown to every member. Anywhere else they are a leak like any other.
BY_DECISION = {("file name", "file"), ("channel name", "channel")}


@dataclass
class Findings:
    dump: dict[str, set[str]]  # table -> canaries (or random parts) found in its rows
    log: dict[str, set[str]]  # table -> canaries found in logged statements on it
    logged: int  # statements of this database in the log window (log_statement = all): not zero


def _found(text: str, canaries: dict[str, str]) -> set[str]:
    return {what for what, phrase in canaries.items() if any(t in text for t in [phrase, *tokens(phrase)])}


def dump_by_table(dump: str) -> dict[str, str]:
    """A plain pg_dump split by the table whose COPY block holds each line (schema-qualified)."""
    parts: dict[str, list[str]] = defaultdict(list)
    current: str | None = None
    for line in dump.splitlines():
        if current is None:
            match = re.match(r'COPY ([\w."]+) ', line)
            if match:
                current = match.group(1).replace('"', "")
            else:
                parts["(schema)"].append(line)
        elif line == "\\.":
            current = None
        else:
            parts[current].append(line)
    return {name: "\n".join(lines) for name, lines in parts.items()}


def log_entries(log: str) -> list[str]:
    """The server log's entries (an entry: a line and its tab-indented continuation lines)."""
    entries: list[str] = []
    for line in log.splitlines():
        if line[:1] in ("\t", " ") and entries:
            entries[-1] += "\n" + line
        else:
            entries.append(line)
    return entries


def tables_named(statement: str) -> list[str]:
    targets = re.findall(r'(?:INSERT INTO|UPDATE|DELETE FROM|COPY)\s+(?:\w+\.)?"?(\w+)"?', statement, re.I)
    return targets or re.findall(r'(?:FROM|JOIN)\s+(?:\w+\.)?"?(\w+)"?', statement, re.I)


@pytest.fixture(scope="module")
def findings(site: Site, browser_pg_log: LogWindow) -> Findings:
    for browser in list(site.browsers.opened):  # nothing more is written
        browser.quit()
        site.browsers.opened.remove(browser)
    dump = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", site.owui.database_url], check=True,
                          capture_output=True, text=True, timeout=120).stdout
    (site.artifacts / "pg_dump.sql").write_text(dump, encoding="utf-8")
    by_table: dict[str, set[str]] = defaultdict(set)
    for name, text in dump_by_table(dump).items():
        table = name.rsplit(".", 1)[-1] if name.startswith("public.") else name
        key = table if table in TABLES else OTHER_TABLES
        by_table[key] |= {f"{what} (in {name})" if key == OTHER_TABLES else what
                          for what in _found(text, site.canaries) if (what, key) not in BY_DECISION}
    in_log: dict[str, set[str]] = defaultdict(set)
    entries = log_entries(browser_pg_log.read())  # every database's: the canaries are this test's alone
    logged = sum(1 for e in entries if site.owui.database in e and "owui_crypto.activate" in e)
    for entry in entries:
        found = _found(entry, site.canaries)
        if found:
            named = [t for t in tables_named(entry) if t in TABLES] or [LOG_ONLY]
            for table in named:
                in_log[table] |= found
    site.step("dump and log read")
    (site.artifacts / "timings.json").write_text(json.dumps(site.timings, indent=1))
    return Findings(dict(by_table), dict(in_log), logged)


@pytest.mark.parametrize("table", [*TABLES, OTHER_TABLES, LOG_ONLY])
def test_no_canary_in_the_dump_or_the_server_log(findings: Findings, table: str) -> None:
    assert findings.logged, "the server log holds no statement of the browser test's database: nothing checked"
    in_dump = sorted(findings.dump.get(table, set()))
    in_log = sorted(findings.log.get(table, set()))
    assert not in_dump and not in_log, (
        f"table {table}: the pg_dump holds {in_dump or 'none'}; the server log holds {in_log or 'none'}")
