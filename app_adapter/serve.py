"""``owui-crypto serve``: run the installed Open WebUI with per-user encryption.

The work is in :mod:`app_adapter.owui` (launcher, binding, lifecycle, compat,
statements, responses); this module is the stable entry point the CLI calls.
"""

from __future__ import annotations

from app_adapter.owui.launcher import serve

__all__ = ["serve"]
