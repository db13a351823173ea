"""tunneld: keep the LocalForwards of an ssh_config host up, in the background.

From Python (docs/python.md)::

    import tunneld
    t = tunneld.ensure("mlflowserver")  # start unless it runs, wait until up and healthy
    t.url()                             # "http://127.0.0.1:5000"

`import tunneld` loads nothing else and touches no file: the names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The API (tunneld/api.py), and the errors it raises (tunneld/errors.py), each with `message`, `hint`, `exit_code`.
_API = frozenset({"ForwardAddress", "Tunnel", "ensure", "status", "stop", "tunnel"})
__all__ = [
    "AlreadyRunningError",
    "AuthError",
    "AutostartError",
    "ConfigError",
    "ConnectError",
    "CorruptFileError",
    "FatalError",
    "ForwardAddress",
    "HandshakeStalledError",
    "HostKeyError",
    "NeedsAuthError",
    "NoForwardsError",
    "NotRunningError",
    "PortInUseError",
    "RefusedByServerError",
    "StartupError",
    "Tunnel",
    "TunneldError",
    "UnreachableError",
    "__version__",
    "ensure",
    "status",
    "stop",
    "tunnel",
]
_ERRORS = frozenset(__all__) - _API - {"__version__"}

if TYPE_CHECKING:
    from tunneld.api import ForwardAddress as ForwardAddress
    from tunneld.api import Tunnel as Tunnel
    from tunneld.api import ensure as ensure
    from tunneld.api import status as status
    from tunneld.api import stop as stop
    from tunneld.api import tunnel as tunnel
    from tunneld.errors import AlreadyRunningError as AlreadyRunningError
    from tunneld.errors import AuthError as AuthError
    from tunneld.errors import AutostartError as AutostartError
    from tunneld.errors import ConfigError as ConfigError
    from tunneld.errors import ConnectError as ConnectError
    from tunneld.errors import CorruptFileError as CorruptFileError
    from tunneld.errors import FatalError as FatalError
    from tunneld.errors import HandshakeStalledError as HandshakeStalledError
    from tunneld.errors import HostKeyError as HostKeyError
    from tunneld.errors import NeedsAuthError as NeedsAuthError
    from tunneld.errors import NoForwardsError as NoForwardsError
    from tunneld.errors import NotRunningError as NotRunningError
    from tunneld.errors import PortInUseError as PortInUseError
    from tunneld.errors import RefusedByServerError as RefusedByServerError
    from tunneld.errors import StartupError as StartupError
    from tunneld.errors import TunneldError as TunneldError
    from tunneld.errors import UnreachableError as UnreachableError


else:  # hidden from type checkers, which see the names above (and flag any other)

    def __getattr__(name: str) -> object:
        """Load the API (or the error classes) on first use, so that `import tunneld` stays free."""
        if name in _API:
            from tunneld import api

            return getattr(api, name)
        if name in _ERRORS:
            from tunneld import errors

            return getattr(errors, name)
        raise AttributeError(f"module 'tunneld' has no attribute {name!r}")

    def __dir__() -> list[str]:
        """List the API's names too (tab completion in a notebook), without loading them."""
        return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
