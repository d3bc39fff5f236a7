#!/usr/bin/env python3
"""make demo: the real Open WebUI with per-user encryption, on a throw-away local stack.

Brings up PostgreSQL (the local server, or a container), AWS KMS emulated by
moto over HTTP, and Open WebUI 0.12.4 through `owui-crypto serve`; signs up a
demo user, creates a chat through Open WebUI's API, prints the URL to open,
and prints the chat as the API returns it beside the same row as it sits in
the database. Runs in .venv-owui (make demo sets it up). With a terminal it
keeps serving until Ctrl-C; without one it stops after printing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from app_adapter import devdb
from app_adapter.devstack import kms_emulator, side_by_side

EMAIL, PASSWORD = "demo@example.com", "demo-password-1"
OFFLINE = {"OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ENABLE_OLLAMA_API": "false",
           "ENABLE_OPENAI_API": "false", "RAG_EMBEDDING_ENGINE": "openai", "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
           "ENABLE_VERSION_UPDATE_CHECK": "false", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"owui-crypto serve exited ({process.returncode}); its log:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"Open WebUI did not become healthy in {timeout:.0f} s; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port for Open WebUI (default: a free one)")
    parser.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="keep serving until Ctrl-C (default: when run from a terminal)")
    args = parser.parse_args()

    server = devdb.find_server()
    workdir = Path(tempfile.mkdtemp(prefix="owui-crypto-demo-"))
    with kms_emulator() as (kms_endpoint, _, _), server.scratch_database("owui_crypto_demo") as database:
        url = server.url(database)
        port = args.port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **OFFLINE, "DATABASE_URL": url, "WEBUI_SECRET_KEY": os.urandom(24).hex(),
               "DATA_DIR": str(workdir / "data")}
        for name in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS"):
            env.pop(name, None)
        log = workdir / "serve.log"
        cli = Path(sys.executable).with_name("owui-crypto")
        print(f"PostgreSQL: {server.origin}, database {database}")
        print(f"KMS:        moto at {kms_endpoint}")
        print(f"starting Open WebUI through owui-crypto serve (log: {log}) ...", flush=True)
        with log.open("wb") as sink:
            process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                       env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            print(f"Open WebUI healthy after {wait_healthy(base_url, process, log):.0f} s\n")
            with httpx.Client(base_url=base_url, timeout=60) as api:
                signup = api.post("/api/v1/auths/signup", json={"email": EMAIL, "password": PASSWORD, "name": "Demo"})
                signup.raise_for_status()
                token = signup.json()["token"]
                api.headers["Authorization"] = f"Bearer {token}"
                chat = {"title": "Knee surgery questions", "models": [], "messages": [], "history": {
                    "currentId": "m1", "messages": {"m1": {"id": "m1", "parentId": None, "childrenIds": [],
                                                           "role": "user", "timestamp": int(time.time()),
                                                           "content": "My MRI shows a torn meniscus. Options?"}}}}
                created = api.post("/api/v1/chats/new", json={"chat": chat})
                created.raise_for_status()
                chat_id = created.json()["id"]
                returned = api.get(f"/api/v1/chats/{chat_id}").json()
            with psycopg.connect(url) as conn:
                user_id, has_kms, has_user = conn.execute(
                    'SELECT id, kms_encrypted_dek IS NOT NULL, user_encrypted_dek IS NOT NULL FROM "user" '
                    "WHERE email = %s", (EMAIL,)).fetchone()
                raw_title, raw_chat = conn.execute("SELECT title, chat::text FROM public.chat WHERE id = %s",
                                                   (chat_id,)).fetchone()
            dump = subprocess.run(["pg_dump", url], capture_output=True, text=True, check=True).stdout
            print(f"open {base_url} and sign in as {EMAIL} / {PASSWORD}")
            print(f"user id {user_id} (KMS HMAC of the email); KMS backup of the key: {has_kms}; "
                  f"user-wrapped key: {has_user}")
            print(f"pg_dump: {len(dump):,} bytes, chat text in it: "
                  f"{[w for w in ('Knee surgery', 'meniscus') if w in dump] or 'none'}\n")
            side_by_side("title, as the API returns it", returned["title"],
                         "title, as it sits in public.chat", raw_title)
            side_by_side("chat, as the API returns it",
                         str(returned["chat"]["history"]["messages"]["m1"]["content"]),
                         "chat, as it sits in public.chat", raw_chat)
            if args.keep_running:
                print(f"serving at {base_url}; Ctrl-C stops and removes everything")
                with contextlib.suppress(KeyboardInterrupt):
                    process.wait()
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
