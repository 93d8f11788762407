"""Token authentication of the Ray Jobs client (``submit``, ``status``, ``logs``, ``stop``).

Ray 2.60 clusters use token auth by default, but a client process sends its token only when ``RAY_AUTH_MODE``
is ``token``, and Ray caches the mode (in its C++ RayConfig) the first time anything reads it. A user who
exports only ``RAY_AUTH_TOKEN`` (or has a token file) gets the mode set here; should Ray already have cached
``disabled`` (a module imported earlier imported Ray), its settings and token cache are re-read. No Ray import
at module level: this runs before anything else of the command.
"""

from __future__ import annotations

import os
import sys

MODE_ENV = "RAY_AUTH_MODE"


def token_file() -> str:
    """Where Ray's token loader looks for a token file."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or os.path.isfile(token_file())


def enable_token_auth() -> bool:
    """Set ``RAY_AUTH_MODE=token`` when a token is available and the user set no mode (``disabled`` is respected);
    return whether the mode changed. Safe to call at any time and more than once."""
    if os.environ.get(MODE_ENV) or not token_available():
        return False
    os.environ[MODE_ENV] = "token"
    if "ray._raylet" in sys.modules:  # Ray may have read the mode already: make it read it again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return True
