#!/usr/bin/env python3
"""make demo: the real Open WebUI with per-user encryption, on a throw-away local stack.

Brings up PostgreSQL (the local server, or a container; a throw-away
database), AWS KMS emulated by moto over HTTP, a stub OpenAI-compatible model
on 127.0.0.1 and Open WebUI 0.12.4 through `owui-crypto serve`; signs up a
demo user, chats once with the stub model through Open WebUI's API, prints the
chat as the API returns it beside the same row as it sits in the database, and
prints the URL to open once Open WebUI answers and the demo user can sign in.

It then serves until Ctrl-C (SIGINT) or SIGTERM, terminal or not, and stops and
removes everything it started: Open WebUI, the stub model, moto, the database,
its temporary directory. --exit (make demo DEMO_EXIT=1) does that right after
the printout. --screenshot DIR (make demo-screenshot) signs in with headless
Chromium, chats once more in the web interface, and saves the chat and the
sealed row as PNGs in DIR. Runs in .venv-owui (make demo sets it up).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg

from app_adapter import devdb
from app_adapter.devstack import kms_emulator, side_by_side
from app_adapter.stubmodel import StubModelHandler, last_user_text

EMAIL, PASSWORD, NAME = "demo@example.com", "demo-password-1", "Demo User"
TITLE = "Knee surgery questions"
QUESTION = "My MRI shows a torn meniscus. What are my options?"
FOLLOW_UP = "Can I wait and see whether it heals on its own?"  # typed in the browser by --screenshot
SECRET_WORDS = ("Knee surgery", "meniscus", "heals on its own")  # must never be readable in the database
STUB_MODEL = "demo-stub-model"
OWUI_VERSION = "0.12.4"
#: Open WebUI offline: no model downloads, no version check, no Ollama; the stub model is its only backend.
OFFLINE = {"OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ENABLE_OLLAMA_API": "false",
           "RAG_EMBEDDING_ENGINE": "openai", "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
           "ENABLE_VERSION_UPDATE_CHECK": "false", "PYTHONUNBUFFERED": "1"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-default-browser-check", "--password-store=basic")
VIEWPORT = (1280, 900)  # the browser's page area, in CSS pixels: what each screenshot shows
ROW_PAGE_WIDTH = 1040  # pixels of the psql page beside the chat
PSQL_COLUMNS = 136  # characters: fills that page at 12 px DejaVu Sans Mono (7.2 px a character)


# -- stopping -------------------------------------------------------------------------------------------------

class Stopped(KeyboardInterrupt):
    """A signal asked the demo to stop. A KeyboardInterrupt, so no `except Exception` on the way swallows it
    and every `with` block on the stack unwinds: that is what removes what the demo started."""


class _Signals:
    tearing_down = False


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if _Signals.tearing_down:
        return  # a second Ctrl-C must not cut the clean-up short (and leave a database behind)
    _Signals.tearing_down = True
    # Said at once, since the clean-up takes seconds; os.write because a print here could re-enter a print
    # that the signal interrupted.
    name = signal.Signals(signum).name
    os.write(sys.stderr.fileno(), f"\nstopping ({name}): removing what the demo started ...\n".encode())
    raise Stopped(name)


def install_signal_handlers() -> None:
    # Set, not inherited: a shell starts background jobs with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt, so `make demo &` followed by `kill -INT` would otherwise leave everything running.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


class Teardown(contextlib.ExitStack):
    """An ExitStack that ignores further stop signals while it unwinds, so each clean-up step completes."""

    def __exit__(self, *exc: Any) -> bool | None:
        _Signals.tearing_down = True
        return super().__exit__(*exc)


# -- the stub model ------------------------------------------------------------------------------------------

def stub_reply(body: dict[str, Any]) -> str:
    text = last_user_text(body).strip()
    if text.startswith("### Task:"):
        # Open WebUI's own tasks (title, tags, follow-ups) expect JSON. An empty object makes it fall back to
        # its defaults (the first message as title, no tags), where an echo of the prompt would become a title.
        return "{}"
    return (f'Demo stub model here, answering from 127.0.0.1 without any real model. You wrote: "{text}". '
            "This reply, like your message, was sealed under your key before it reached PostgreSQL.")


class _StubHandler(StubModelHandler):
    model = STUB_MODEL
    owned_by = "owui-crypto demo"

    def reply(self, body: dict[str, Any]) -> str:
        return stub_reply(body)


@contextlib.contextmanager
def stub_model() -> Iterator[str]:
    """An OpenAI-compatible model on a free loopback port, in a thread; yields its base URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.daemon_threads = True  # an open stream must not hold up the demo's exit
    thread = threading.Thread(target=server.serve_forever, name="stub-model", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# -- the stack ------------------------------------------------------------------------------------------------

@dataclass
class Demo:
    base_url: str
    database: str
    database_url: str  # libpq URL, as superuser: what a database reader sees
    workdir: Path
    log: Path
    process: subprocess.Popen[bytes]
    token: str
    chat_id: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:]


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"owui-crypto serve exited ({process.returncode}); its log:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"Open WebUI did not become healthy in {timeout:.0f} s; its log:\n{log_tail(log)}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # uvicorn waits for open connections (a browser's websocket)
            process.kill()
            process.wait()


def ok(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                         f"{response.text[:500]}")
    return response


def send(api: httpx.Client, text: str, chat_id: str | None = None, parent_id: str | None = None) -> tuple[str, str]:
    """Ask the stub model through Open WebUI as its web client does; returns (chat id, reply id). The reply is
    streamed and written into the chat by a background task of Open WebUI's, acting as the chat's owner."""
    user_id, reply_id = str(uuid.uuid4()), str(uuid.uuid4())
    body: dict[str, Any] = {
        "model": STUB_MODEL, "stream": True, "messages": [{"role": "user", "content": text}],
        "parent_id": parent_id, "id": reply_id, "session_id": "owui-crypto-demo",
        "user_message": {"id": user_id, "parentId": parent_id, "childrenIds": [reply_id], "role": "user",
                         "content": text, "timestamp": int(time.time())}}
    if chat_id:
        body["chat_id"] = chat_id
    return ok(api.post("/api/chat/completions", json=body)).json()["chat_id"], reply_id


def wait_for_reply(api: httpx.Client, chat_id: str, reply_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = ok(api.get(f"/api/v1/chats/{chat_id}")).json()["chat"]["history"]["messages"].get(reply_id) or {}
        if message.get("done"):
            return dict(message)
        time.sleep(0.2)
    raise SystemExit(f"the stub model's reply did not arrive in {timeout:.0f} s")


@contextlib.contextmanager
def running_demo(removed: list[str], port: int = 0) -> Iterator[Demo]:
    """The whole stack, seeded; everything it started is stopped and removed when the block exits, and named
    in ``removed`` once it is gone."""
    with Teardown() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="owui-crypto-demo-"))
        stack.callback(removed.append, str(workdir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        server = devdb.find_server()
        if server.keepalive is not None:  # a testcontainers PostgreSQL: stopped (and removed) last
            stack.callback(server.keepalive.stop)
        kms_endpoint, _, _ = stack.enter_context(kms_emulator())
        stack.callback(removed.append, "moto")
        roles = stack.enter_context(devdb.database_roles(server, "owui_crypto_demo"))  # dropped after the database
        stack.callback(removed.append, f"roles {roles.owner} and {roles.app}")
        database = stack.enter_context(server.scratch_database("owui_crypto_demo", owner=roles.owner))
        stack.callback(removed.append, f"database {database}")
        model_url = stack.enter_context(stub_model())
        stack.callback(removed.append, "the stub model")
        url = server.url(database)
        port = port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        # Two roles, as in production (README, "Two roles"): serve migrates as the database's owner and runs Open
        # WebUI as a role it grants; neither is a superuser.
        env = {**os.environ, **OFFLINE, **roles.env(url), "WEBUI_SECRET_KEY": os.urandom(24).hex(),
               "DATA_DIR": str(workdir / "data"),
               "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": model_url, "OPENAI_API_KEYS": "demo-stub",
               "BYPASS_MODEL_ACCESS_CONTROL": "true",  # the stub is every user's model, no admin step first
               "DEFAULT_MODELS": STUB_MODEL}  # preselected in a new chat
        for name in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE"):
            env.pop(name, None)  # settings serve refuses or that would point Open WebUI elsewhere
        log = workdir / "serve.log"
        cli = Path(sys.executable).with_name("owui-crypto")
        print(f"PostgreSQL: {server.origin}, throw-away database {database}; serve migrates as {roles.owner} and "
              f"Open WebUI connects as {roles.app} (neither a superuser)")
        print(f"KMS:        moto at {kms_endpoint} (emulated, in this process)")
        print(f"model:      {STUB_MODEL}, a stub at {model_url} (no real model; it quotes what you write)")
        print(f"starting Open WebUI {OWUI_VERSION} through owui-crypto serve (about 30 s; log: {log}) ...",
              flush=True)
        with log.open("wb") as sink:
            # Same process group as the demo: a terminal's Ctrl-C reaches it too, so even a demo that were
            # killed outright would not leave Open WebUI serving.
            process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                       env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=workdir)
        stack.callback(removed.append, f"Open WebUI (pid {process.pid})")
        stack.callback(stop_process, process)
        healthy_after = wait_healthy(base_url, process, log)
        print(f"Open WebUI answers after {healthy_after:.0f} s; signing up {EMAIL} and asking the stub model ...",
              flush=True)
        with httpx.Client(base_url=base_url, timeout=60) as api:
            signup = ok(api.post("/api/v1/auths/signup", json={"email": EMAIL, "password": PASSWORD, "name": NAME}))
            token = signup.json()["token"]
            api.headers["Authorization"] = f"Bearer {token}"
            # The first user is an admin, whom Open WebUI greets with its changelog; marking it read lets a
            # visitor land on the chat.
            ok(api.post("/api/v1/users/user/settings/update", json={"ui": {"version": OWUI_VERSION}}))
            chat_id, reply_id = send(api, QUESTION)
            wait_for_reply(api, chat_id, reply_id)
            ok(api.post(f"/api/v1/chats/{chat_id}", json={"chat": {"title": TITLE}}))
            # What a visitor does first: the URL is printed only once this works.
            ok(httpx.post(f"{base_url}/api/v1/auths/signin", json={"email": EMAIL, "password": PASSWORD},
                          timeout=60))
        yield Demo(base_url, database, url, workdir, log, process, token, chat_id)


# -- what the demo prints -----------------------------------------------------------------------------------

def message_texts(chat: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, content) of the chat's messages, oldest first."""
    messages = chat["history"]["messages"].values()
    return [(m["role"], str(m["content"]).strip()) for m in sorted(messages, key=lambda m: m.get("timestamp", 0))]


def report(demo: Demo) -> None:
    with httpx.Client(base_url=demo.base_url, timeout=60, headers={"Authorization": f"Bearer {demo.token}"}) as api:
        returned = ok(api.get(f"/api/v1/chats/{demo.chat_id}")).json()
    with psycopg.connect(demo.database_url) as conn:
        row = conn.execute('SELECT id, kms_encrypted_dek IS NOT NULL, user_encrypted_dek IS NOT NULL FROM "user" '
                           "WHERE email = %s", (EMAIL,)).fetchone()
        sealed = conn.execute("SELECT title, chat::text FROM public.chat WHERE id = %s", (demo.chat_id,)).fetchone()
    assert row is not None and sealed is not None
    user_id, has_kms, has_user = row
    dump = subprocess.run(["pg_dump", demo.database_url], capture_output=True, text=True, check=True).stdout
    found = [w for w in SECRET_WORDS if w in dump]
    print(f"\nuser id {user_id} (a KMS HMAC of the email); KMS-wrapped copy of the user's key: "
          f"{'yes' if has_kms else 'no'}; user-held copy: {'yes' if has_user else 'no'}")
    print(f"pg_dump of the database: {len(dump):,} bytes; chat text in it: {found or 'none'}\n")
    side_by_side("title, as the API returns it", returned["title"], "title, as it sits in public.chat", sealed[0])
    said = "  ".join(f"{role}: {text}" for role, text in message_texts(returned["chat"]))
    # The whole sealed document runs to dozens of lines; its start makes the point and keeps the URL on screen.
    shown = f"{sealed[1][:290]}... ({len(sealed[1]):,} characters in all)"
    side_by_side("chat, as the API returns it", said, "chat, as it sits in public.chat", shown)


# -- screenshots (make demo-screenshot) -----------------------------------------------------------------------

def psql(url: str, query: str) -> str:
    # Expanded and wrapped at the page's width: unwrapped, psql draws each record's header as wide as its
    # longest value, a line of thousands of dashes.
    return subprocess.run(["psql", "-X", url, "-x", "-P", "format=wrapped", "-P", f"columns={PSQL_COLUMNS}",
                           "-c", query], capture_output=True, text=True, check=True).stdout


def sealed_row_page(demo: Demo) -> str:
    """An HTML page of a psql session on the chat's rows: what a database reader sees."""
    short_url = f"postgresql://postgres@127.0.0.1/{demo.database}"
    blocks = []
    for query in (f"SELECT id, user_id, title, chat FROM chat WHERE id = '{demo.chat_id}';",
                  f"SELECT role, content FROM chat_message WHERE chat_id = '{demo.chat_id}' "
                  "ORDER BY created_at, role DESC;"):
        blocks.append(f"$ psql {short_url} -x -c \"{query}\"\n{psql(demo.database_url, query)}")
    dump = subprocess.run(["pg_dump", demo.database_url], capture_output=True, text=True, check=True).stdout
    pattern = "|".join(SECRET_WORDS)
    hits = sum(1 for line in dump.splitlines() if re.search(pattern, line))
    blocks.append(f"$ pg_dump {short_url} | grep -cE '{pattern}'\n{hits}\n")
    body = "\n".join(html.escape(b) for b in blocks)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>the sealed row</title><style>
body {{ margin: 0; background: #1e1e1e; color: #d4d4d4; font: 12px/1.35 "DejaVu Sans Mono", monospace; }}
h1 {{ font: 600 15px/1.4 "DejaVu Sans", sans-serif; color: #fff; margin: 0; padding: 14px 18px 4px; }}
p {{ font: 13px/1.4 "DejaVu Sans", sans-serif; color: #aaa; margin: 0; padding: 0 18px 6px; }}
pre {{ margin: 0; padding: 8px 18px 18px; white-space: pre-wrap; word-break: break-all; }}
</style></head><body><h1>The same chat, as it sits in PostgreSQL</h1>
<p>read as the database superuser, with no key: every message of the chat is a sealed value</p>
<pre>{body}</pre></body></html>"""


def take_screenshots(demo: Demo, outdir: Path) -> list[Path]:
    """Sign in with headless Chromium, open the chat, chat once more, and save the chat and the sealed row."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.wait import WebDriverWait

    outdir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
                 f"--user-data-dir={demo.workdir / 'chromium-profile'}"):  # fresh, removed with the workdir
        options.add_argument(flag)
    # The driver's path is given, so Selenium Manager never tries to download one.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(demo.workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)

        def viewport(width: int, height: int) -> None:
            """Make the page area (what a screenshot shows) exactly width x height. Through DevTools: sizing
            the window leaves the page area to whatever the browser's frame takes, which varies."""
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

        def page_shows(text: str) -> None:
            try:
                wait.until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
            except TimeoutException:
                driver.save_screenshot(str(demo.workdir / "timeout.png"))
                raise SystemExit(f"the page never showed {text!r} (see {demo.workdir / 'timeout.png'})") from None

        viewport(*VIEWPORT)
        driver.get(f"{demo.base_url}/auth")
        email = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=email]"))
        email.send_keys(EMAIL)
        driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(PASSWORD + Keys.ENTER)
        wait.until(lambda d: "/auth" not in d.current_url)
        driver.get(f"{demo.base_url}/c/{demo.chat_id}")
        page_shows(QUESTION)
        # Open WebUI starts with its sidebar folded; open, it shows the chat list and who is signed in.
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[aria-label='Open Sidebar']")).click()
        page_shows(NAME)
        box = wait.until(lambda d: d.find_element(By.ID, "chat-input"))
        box.click()
        box.send_keys(FOLLOW_UP + Keys.ENTER)
        page_shows(f'You wrote: "{FOLLOW_UP}"')
        time.sleep(1.5)  # let the streamed reply's last words and the follow-up UI settle

        # The row after the reply, so it holds every message on screen; in a second tab of the same browser.
        chat_tab = driver.current_window_handle
        page = demo.workdir / "sealed-row.html"
        page.write_text(sealed_row_page(demo), encoding="utf-8")
        driver.switch_to.new_window("tab")
        viewport(ROW_PAGE_WIDTH, VIEWPORT[1])
        driver.get(page.as_uri())
        height = max(VIEWPORT[1], int(driver.execute_script("return document.documentElement.scrollHeight")))
        viewport(ROW_PAGE_WIDTH, height)  # the whole psql session, uncut
        row_png = outdir / "demo-sealed-row.png"
        driver.save_screenshot(str(row_png))

        # The chat as tall as the psql page, so the two sit side by side without padding.
        driver.switch_to.window(chat_tab)
        viewport(VIEWPORT[0], height)
        time.sleep(1)  # Open WebUI re-lays out the page on resize
        chat_png = outdir / "demo-chat.png"
        driver.save_screenshot(str(chat_png))
    finally:
        driver.quit()
    return [chat_png, row_png, *side_by_side_png(chat_png, row_png, outdir / "demo-side-by-side.png")]


def side_by_side_png(left: Path, right: Path, out: Path) -> list[Path]:
    """The two screenshots in one image, for the README; skipped (with a note) without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        print("Pillow is not installed: no side-by-side image (the two screenshots are there)")
        return []
    with Image.open(left) as a, Image.open(right) as b:
        gap, height = 12, max(a.height, b.height)
        canvas = Image.new("RGB", (a.width + gap + b.width, height), (30, 30, 30))
        canvas.paste(a.convert("RGB"), (0, 0))
        canvas.paste(b.convert("RGB"), (a.width + gap, 0))
        canvas.save(out, optimize=True)
    return [out]


# -- main -----------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port for Open WebUI (default: a free one)")
    parser.add_argument("--exit", action="store_true",
                        help="stop and remove everything right after the printout (make demo DEMO_EXIT=1)")
    parser.add_argument("--screenshot", type=Path, metavar="DIR",
                        help="sign in with headless Chromium, chat, save PNGs of the chat and the sealed row in DIR,"
                             " then stop (make demo-screenshot)")
    args = parser.parse_args()
    install_signal_handlers()
    removed: list[str] = []
    status = 0
    try:
        with running_demo(removed, args.port) as demo:
            report(demo)
            print(f"\nOpen WebUI is up: {demo.base_url}   sign in as {EMAIL} / {PASSWORD}")
            print(f'  "{TITLE}" is in the sidebar; new messages get answers from the stub model, and are sealed too')
            if args.screenshot:
                print("\ntaking screenshots with headless Chromium ...", flush=True)
                for path in take_screenshots(demo, args.screenshot):
                    print(f"  saved {path}")
            elif not args.exit:
                print("serving until Ctrl-C, which stops and removes everything the demo started", flush=True)
                demo.process.wait()
                print(f"Open WebUI exited by itself ({demo.process.returncode}); its log ends:\n"
                      f"{log_tail(demo.log)}", file=sys.stderr)
                status = 1
    except Stopped:
        pass  # the signal handler has said so; the stack has unwound
    finally:  # also after a failure (SystemExit with Open WebUI's log), which then reports itself
        if removed:
            print(f"stopped and removed: {', '.join(removed)}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
