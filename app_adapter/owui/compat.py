"""Which Open WebUI this release supports, and the shape of everything it wraps.

``owui-crypto serve`` refuses an open-webui outside :data:`SUPPORTED`, and
before it changes anything it checks every object it is about to wrap,
override or listen to (:data:`EXPECTED`). One problem stops the start with
all problems listed: it never runs half-hooked.

Line numbers are those of open-webui 0.12.4.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app_adapter.errors import OwuiCryptoError

#: Open WebUI releases this owui-crypto release was built and tested against.
SUPPORTED = ">=0.12.4,<0.13"


class IncompatibleOpenWebUI(OwuiCryptoError):
    """The installed Open WebUI is outside the supported range or changed what owui-crypto wraps."""


def installed_version() -> str | None:
    """The open-webui version: from pip's metadata, else (the official image runs it from source)
    from the ``package.json`` next to its ``backend`` directory. None if not installed."""
    try:
        return importlib.metadata.version("open-webui")
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("open_webui")
    if spec is None or not spec.origin:
        return None
    package_json = Path(spec.origin).resolve().parent.parent.parent / "package.json"
    try:
        return str(json.loads(package_json.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def installed_from_wheel() -> bool:
    try:
        importlib.metadata.version("open-webui")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _release(version: str) -> tuple[int, ...] | None:
    """``'0.12.4'`` -> ``(0, 12, 4)``; None for anything but a final release (``rc``, ``dev``, local...)."""
    parts = version.strip().split(".")
    if not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
        "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def version_supported(version: str, spec: str = SUPPORTED) -> bool:
    """``version`` is a final release satisfying every comma-separated clause of ``spec``
    (``>=``, ``<=``, ``==``, ``<``, ``>`` on release numbers). Pre-releases are not supported."""
    have = _release(version)
    if have is None:
        return False
    for clause in (c.strip() for c in spec.split(",")):
        op = next(o for o in (">=", "<=", "==", "<", ">") if clause.startswith(o))
        want = _release(clause[len(op):])
        assert want is not None, f"bad clause {clause!r} in {spec!r}"
        width = max(len(have), len(want))
        if not _OPS[op](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def check_version() -> str:
    version = installed_version()
    if version is None:
        raise IncompatibleOpenWebUI(
            "open-webui is not installed in this Python environment: install a supported release "
            f"(pip install 'open-webui{SUPPORTED}'), or run owui-crypto inside the official Open WebUI image")
    if not version_supported(version):
        raise IncompatibleOpenWebUI(
            f"open-webui {version} is not supported by this owui-crypto release (supported: {SUPPORTED}). "
            f"Install a supported open-webui (pip install 'open-webui{SUPPORTED}') or an owui-crypto release "
            "that supports yours; running it anyway could store chats in plaintext or break them")
    return version


# -- shapes ------------------------------------------------------------------------------


def resolve(path: str) -> Any:
    """``'package.module:attr.attr'`` -> the object."""
    module_name, _, attrs = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj


def _unwrapped(obj: Any) -> Any:
    while getattr(obj, "__owui_crypto_wraps__", None) is not None:
        obj = obj.__owui_crypto_wraps__
    return obj


@dataclass(frozen=True)
class Expect:
    """What owui-crypto relies on about one Open WebUI object."""

    path: str
    why: str
    is_async: bool | None = None  # a coroutine function
    params: tuple[str, ...] | None = None  # its parameter names, in order (self excluded)
    source: tuple[str, ...] = ()  # substrings its source must contain
    test: Callable[[Any], str | None] | None = field(default=None, compare=False)  # extra check: a problem or None

    def problems(self) -> list[str]:
        try:
            obj = _unwrapped(resolve(self.path))
        except (ImportError, AttributeError) as exc:
            return [f"{self.path}: missing ({type(exc).__name__}: {exc}); needed because {self.why}"]
        found = []
        if self.is_async is not None and inspect.iscoroutinefunction(obj) != self.is_async:
            found.append(f"{self.path}: expected {'a coroutine function' if self.is_async else 'a plain function'}")
        if self.params is not None:
            try:
                names = tuple(p for p in inspect.signature(obj).parameters if p != "self")
            except (TypeError, ValueError):
                names = ()
            if names != self.params:
                found.append(f"{self.path}: parameters are {names}, expected {self.params}")
        if self.source:
            try:
                text = inspect.getsource(obj)
            except (OSError, TypeError):
                text = ""
            found += [f"{self.path}: source no longer contains {s!r}" for s in self.source if s not in text]
        if self.test is not None:
            problem = self.test(obj)
            if problem:
                found.append(f"{self.path}: {problem}")
        return [f"{p}; needed because {self.why}" for p in found]


def _is(kind: str) -> Callable[[Any], str | None]:
    def test(obj: Any) -> str | None:
        module_name, _, name = kind.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        return None if isinstance(obj, cls) else f"is a {type(obj).__name__}, expected a {name}"
    return test


def _first_uuid4_is_the_id(obj: Any) -> str | None:
    text = inspect.getsource(obj)
    first = text.find("uuid.uuid4()")
    if first < 0 or text.find("new_id = str(uuid.uuid4())") != first - len("new_id = str("):
        return "the first uuid.uuid4() call is no longer the new user's id"
    return None


def _uuid_module(obj: Any) -> str | None:
    return None if obj is uuid or getattr(obj, "_module", None) is uuid else "is not the uuid module"


def _table(name: str, *columns: str) -> Callable[[Any], str | None]:
    def test(obj: Any) -> str | None:
        table = getattr(obj, "__table__", None)
        if table is None or table.name != name:
            return f"does not map table {name!r}"
        if table.schema is not None:
            return f"maps {table.schema}.{name}: DATABASE_SCHEMA must be unset"
        missing = [c for c in columns if c not in table.c]
        return f"lacks columns {missing}" if missing else None
    return test


def _socket_server(obj: Any) -> str | None:
    handlers = getattr(obj, "handlers", None)
    if not isinstance(handlers, dict) or not isinstance(handlers.get("/"), dict):
        return "has no handlers['/'] table"
    sync = [name for name, h in handlers["/"].items() if not inspect.iscoroutinefunction(_unwrapped(h))]
    return f"has synchronous handlers {sync}" if sync else None


def _same_as(path: str) -> Callable[[Any], str | None]:
    def test(obj: Any) -> str | None:
        return None if obj is _unwrapped(resolve(path)) else f"is no longer {path}"
    return test


def _mapping(obj: Any) -> str | None:
    return None if hasattr(obj, "get") else "has no .get()"


CURRENT_USER_PARAMS = ("request", "response", "background_tasks", "auth_token")

EXPECTED: tuple[Expect, ...] = (
    Expect("open_webui.internal.db:async_engine", "all runtime database work goes through it (internal/db.py:504)",
           test=_is("sqlalchemy.ext.asyncio.AsyncEngine")),
    Expect("open_webui.internal.db:engine", "start-up and health checks use it (internal/db.py:422)",
           test=_is("sqlalchemy.engine.Engine")),
    Expect("open_webui.main:app", "it is the application served", test=_is("fastapi.FastAPI")),
    Expect("open_webui.utils.auth:get_current_user",
           "every authenticated endpoint depends on it; its override binds the caller (auth.py:389)",
           is_async=True, params=CURRENT_USER_PARAMS),
    Expect("open_webui.routers.chats:get_optional_verified_user",
           "shared-chat reads resolve their optional user with it (routers/chats.py:99)",
           is_async=True, params=CURRENT_USER_PARAMS),
    Expect("open_webui.models.auths:Auths.insert_new_auth",
           "every sign-up path creates users through it (models/auths.py:288)",
           is_async=True, params=("email", "password", "name", "profile_image_url", "role", "oauth", "db"),
           test=_first_uuid4_is_the_id),
    Expect("open_webui.models.auths:uuid", "insert_new_auth makes the user id with uuid.uuid4() (models/auths.py:302)",
           test=_uuid_module),
    Expect("open_webui.models.auths:Auths.delete_auth_by_id",
           "user deletion goes through it (models/auths.py:420)", is_async=True, params=("id", "db")),
    Expect("open_webui.models.users:User", "keys are provisioned when its row is inserted",
           test=_table("user", "id", "email")),
    Expect("open_webui.models.chats:Chat", "it is a protected table",
           test=_table("chat", "id", "user_id", "title", "chat")),
    Expect("open_webui.models.shared_chats:SharedChat", "it is a protected table",
           test=_table("shared_chat", "id", "title", "chat")),
    Expect("open_webui.models.chat_messages:ChatMessage", "its upsert is sent to the base table",
           test=_table("chat_message", "id", "chat_id", "content")),
    Expect("open_webui.models.chat_messages:ChatMessages.upsert_messages",
           "its INSERT ... ON CONFLICT cannot go through a view (models/chat_messages.py:335)",
           is_async=True, params=("chat_id", "user_id", "messages", "db"),
           source=("on_conflict_do_nothing(index_elements=['id'])",)),
    Expect("open_webui.socket.main:sio", "its handlers are wrapped to act as the session user", test=_socket_server),
    Expect("open_webui.socket.main:SESSION_POOL", "socket handlers find their user in it (socket/main.py:573)",
           test=_mapping),
    Expect("open_webui.utils.automations:execute_automation",
           "scheduled automations run through it without a request (utils/automations.py:353)",
           is_async=True, params=("app", "automation")),
    Expect("open_webui.routers.automations:execute_automation", "'run now' calls it (routers/automations.py:345)",
           test=_same_as("open_webui.utils.automations:execute_automation")),
    Expect("open_webui.utils.timers:execute_due_timer",
           "chat timers run through it without a request (utils/timers.py:231)",
           is_async=True, params=("app", "timer_id", "claim_id")),
    Expect("open_webui.routers.audio.realtime:get_verified_user_by_token",
           "the realtime-call WebSocket authenticates with it (routers/audio/realtime.py:375)",
           is_async=True, params=("token", "redis"),
           test=_same_as("open_webui.utils.auth:get_verified_user_by_token")),
    Expect("open_webui.models.chats:Chats.get_chat_by_id", "timers find their owner with it", is_async=True,
           params=("id", "db")),
)


def check_shapes(expected: tuple[Expect, ...] = EXPECTED) -> None:
    """Raise :class:`IncompatibleOpenWebUI` listing every expectation the loaded Open WebUI breaks."""
    problems = [p for e in expected for p in e.problems()]
    if problems:
        raise IncompatibleOpenWebUI(
            "Open WebUI changed where owui-crypto hooks in, so it will not start (running half-hooked could "
            "store chats in plaintext or lose them):\n  - " + "\n  - ".join(problems))
