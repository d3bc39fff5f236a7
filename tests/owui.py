"""Rows shaped like the ones Open WebUI 0.12.4 writes, for the tests."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
from psycopg.types.json import Json


def chat_document(title: str, messages: list[tuple[str, str]], model: str = "test-model") -> dict:
    """A chat.chat value as Open WebUI's web client writes it: history.messages (a tree) plus the legacy list."""
    history, legacy, parent = {}, [], None
    for role, content in messages:
        mid = str(uuid.uuid4())
        message = {"id": mid, "parentId": parent, "childrenIds": [], "role": role, "content": content,
                   "timestamp": int(time.time())}
        if role == "assistant":
            message["model"] = model
        if parent:
            history[parent]["childrenIds"].append(mid)
        history[mid] = message
        legacy.append(message)
        parent = mid
    return {"title": title, "models": [model], "history": {"messages": history, "currentId": parent},
            "messages": legacy, "tags": [], "params": {}, "timestamp": int(time.time() * 1000)}


def insert_chat(conn: psycopg.Connection, user_id: str, title: str, messages: list[tuple[str, str]],
                chat_id: str | None = None) -> str:
    """Insert a chat and its chat_message rows through whatever `chat` resolves to."""
    chat_id = chat_id or str(uuid.uuid4())
    doc = chat_document(title, messages)
    now = int(time.time())
    conn.execute(
        "INSERT INTO chat (id, user_id, title, chat, created_at, updated_at, archived, pinned, meta, summary)"
        " VALUES (%s, %s, %s, %s, %s, %s, false, false, %s, %s)",
        (chat_id, user_id, title, Json(doc), now, now, Json({"tags": ["t1"]}), f"summary of {title}"))
    for mid, message in doc["history"]["messages"].items():
        conn.execute(
            "INSERT INTO chat_message (id, chat_id, user_id, role, parent_id, content, done, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, true, %s, %s)",
            (f"{chat_id}-{mid}", chat_id, user_id, message["role"], message["parentId"],
             Json(message["content"]), now, now))
    return chat_id


def raw(conn: psycopg.Connection, table: str, column: str, row_id: str) -> str | None:
    """The value as stored in the base table, as text."""
    row = conn.execute(f"SELECT {column}::text FROM public.{table} WHERE id = %s", (row_id,)).fetchone()
    return row[0] if row else None


def dumps(value: object) -> str:
    return json.dumps(value)
