"""Who is acting: binding Open WebUI's work to the user whose key it needs.

The acting user is :mod:`app_adapter.hook`'s context variable; whatever is
bound when a transaction begins decides which key PostgreSQL gets. The key is
resolved (cache, else KMS) when the user is bound, before any database work.

* HTTP: Open WebUI resolves the caller in the FastAPI dependency
  ``utils/auth.py`` ``get_current_user`` (Bearer JWT, ``token`` cookie,
  ``x-api-key`` via ``request.state.token``, ``sk-`` API keys), which
  ``get_verified_user``, ``get_admin_user`` and ``get_human_user`` depend on,
  and in ``routers/chats.py`` ``get_optional_verified_user`` (shared chats).
  Both are replaced, in every route's dependency tree, by wrappers that call
  the original and bind the user it returns (:func:`replace_dependency`; not
  ``app.dependency_overrides``, with which FastAPI re-inspects every
  dependency of a route on every request, about 1.5 ms of Python each). An async dependency runs in
  the request's own task, so the binding is seen by the endpoint body, by sync
  endpoints (Starlette's threadpool copies the context), by tasks the request
  spawns (``asyncio.create_task`` copies it), by streamed responses and
  background tasks (they run later in the same task).
* socket.io: every handler registered on ``sio`` is wrapped to bind the user
  of ``SESSION_POOL[sid]`` for the duration of the handler.
* No request: ``utils/automations.py`` ``execute_automation`` binds the
  automation's owner; ``utils/timers.py`` ``execute_due_timer`` binds the
  owner of the timer chat. The realtime-call WebSocket binds the user its
  token resolves to.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app_adapter.errors import OwuiCryptoError
from app_adapter.hook import Adapter
from app_adapter.owui.responses import describe

log = logging.getLogger("owui_crypto.binding")

#: socket.io events that run before a session user exists or after it is gone.
UNBOUND_SOCKET_EVENTS = frozenset({"connect", "disconnect"})


def _http_error(exc: OwuiCryptoError) -> Exception:
    from fastapi import HTTPException

    status, detail = describe(exc) or (500, str(exc))
    return HTTPException(status_code=status, detail=detail)


def acting_dependency(adapter: Adapter, dependency: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A FastAPI dependency that runs ``dependency`` (which returns a user or None) and binds that user.

    ``functools.wraps`` keeps the original's signature (FastAPI reads it
    through ``__wrapped__``), so FastAPI injects exactly what it injected before.
    """

    @functools.wraps(dependency)
    async def acting(*args: Any, **kwargs: Any) -> Any:
        user = await dependency(*args, **kwargs)
        if user is not None:
            try:
                await adapter.abind(user.id)
            except OwuiCryptoError as exc:
                raise _http_error(exc) from None
        return user

    acting.__owui_crypto_wraps__ = dependency  # type: ignore[attr-defined]
    return acting


#: What FastAPI derives from a dependency's callable and caches on its Dependant.
_DERIVED_FROM_CALL = ("cache_key", "is_gen_callable", "is_async_gen_callable", "is_coroutine_callable",
                      "_is_security_scheme", "_security_scheme", "_security_dependencies")


def replace_dependency(app: Any, original: Callable[..., Any], replacement: Callable[..., Any]) -> int:
    """Make every route of ``app`` (mounted apps included) call ``replacement`` where its dependency tree
    calls ``original``. Returns how many places changed: 0 means Open WebUI changed shape."""
    seen: set[int] = set()
    changed = 0

    def walk(dependant: Any) -> None:
        nonlocal changed
        if dependant is None or id(dependant) in seen:
            return
        seen.add(id(dependant))
        if dependant.call is original:
            dependant.call = replacement
            for derived in _DERIVED_FROM_CALL:
                dependant.__dict__.pop(derived, None)
            changed += 1
        for sub in dependant.dependencies:
            walk(sub)

    def routes(router_owner: Any) -> None:
        for route in getattr(router_owner, "routes", []):
            walk(getattr(route, "dependant", None))
            routes(route)  # Mount: its own routes
            routes(getattr(route, "app", None))

    routes(getattr(app, "router", app))
    return changed


def bind_socket_handlers(adapter: Adapter, handlers: dict[str, Callable[..., Any]],
                         session_pool: Mapping[str, Any]) -> list[str]:
    """Wrap every handler of one socket.io namespace to act as the session's user. Returns the events wrapped."""
    wrapped = []
    for event_name, handler in list(handlers.items()):
        if event_name in UNBOUND_SOCKET_EVENTS or getattr(handler, "__owui_crypto_wraps__", None):
            continue
        handlers[event_name] = _socket_handler(adapter, event_name, handler, session_pool)
        wrapped.append(event_name)
    return wrapped


def _socket_handler(adapter: Adapter, event_name: str, handler: Callable[..., Awaitable[Any]],
                    session_pool: Mapping[str, Any]) -> Callable[..., Awaitable[Any]]:
    sid_index = 1 if event_name == "*" else 0  # the catch-all handler gets (event, sid, *args)

    @functools.wraps(handler)
    async def acting(*args: Any) -> Any:
        sid = args[sid_index] if len(args) > sid_index else None
        session = session_pool.get(sid) if sid is not None else None
        user_id = session.get("id") if isinstance(session, Mapping) else None
        if not user_id:
            return await handler(*args)
        try:
            token = await adapter.abind(user_id)
        except OwuiCryptoError as exc:
            # Runs unbound: reads show placeholders, sealed writes are refused.
            log.warning("socket.io %s: cannot act as the session's user: %s", event_name, type(exc).__name__)
            return await handler(*args)
        try:
            return await handler(*args)
        finally:
            adapter.unbind(token)

    acting.__owui_crypto_wraps__ = handler  # type: ignore[attr-defined]
    return acting


def acting_as_owner(adapter: Adapter, func: Callable[..., Awaitable[Any]],
                    owner_of: Callable[..., Awaitable[str | None]]) -> Callable[..., Awaitable[Any]]:
    """Wrap background work (no request): find the owner with ``owner_of(*args)`` and act as them.

    If the owner cannot be found or has no key, the work runs unbound and
    Open WebUI's own checks (owner deleted, demoted...) decide what happens.
    """

    @functools.wraps(func)
    async def acting(*args: Any, **kwargs: Any) -> Any:
        try:
            owner = await owner_of(*args, **kwargs)
        except Exception:
            log.exception("%s: could not find the owner to act as", func.__name__)
            owner = None
        if owner:
            try:
                token = await adapter.abind(owner)
            except OwuiCryptoError as exc:
                log.warning("%s: cannot act as owner %s: %s", func.__name__, owner, type(exc).__name__)
            else:
                try:
                    return await func(*args, **kwargs)
                finally:
                    adapter.unbind(token)
        return await func(*args, **kwargs)

    acting.__owui_crypto_wraps__ = func  # type: ignore[attr-defined]
    return acting


def binding_user_resolver(adapter: Adapter, resolve: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a function returning a user (or None), such as ``get_verified_user_by_token``, to bind that user
    in the calling task. For WebSocket endpoints that authenticate inside their own handler."""

    @functools.wraps(resolve)
    async def acting(*args: Any, **kwargs: Any) -> Any:
        user = await resolve(*args, **kwargs)
        if user is not None:
            try:
                await adapter.abind(user.id)
            except OwuiCryptoError as exc:
                log.warning("cannot act as user %s: %s", user.id, type(exc).__name__)
                return None  # treated by the caller as "not authenticated"
        return user

    acting.__owui_crypto_wraps__ = resolve  # type: ignore[attr-defined]
    return acting
