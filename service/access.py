"""Which browsers may talk to the service: ``Host`` and ``Origin`` checks, pure.

Any web page a user visits can open a WebSocket to ``127.0.0.1:8765`` (cross-site WebSocket
hijacking) or reach it under its own domain name through DNS rebinding. So a request is
served only when its ``Host`` names this service (an IP literal, ``localhost``, the
``--host`` name, this machine's name or an ``--allowed-host``: rebinding always comes through
a domain name of the attacker's) and, for a browser (which sends ``Origin``), when the
origin is the service's own page or an ``--allowed-origin``. Clients that send no
``Origin`` (the TUI, scripts) are not browsers and pass.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    names: frozenset[str]  # lower-case host names the service answers to (besides IP literals)
    origins: frozenset[str]  # extra origins allowed, as scheme://host[:port], lower-case

    @classmethod
    def build(
        cls, *, host: str, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]
    ) -> AccessPolicy:
        names = {"localhost", host, socket.gethostname(), *allowed_hosts}
        return cls(
            names=frozenset(n.lower().strip("[]") for n in names if n),
            origins=frozenset(o.lower().rstrip("/") for o in allowed_origins),
        )

    def _name_allowed(self, name: str | None) -> bool:
        return name is not None and (_is_ip_literal(name) or name.lower() in self.names)

    def host_allowed(self, host: str | None) -> bool:
        """``host`` is the request's ``Host`` header."""
        if not host:
            return False
        try:
            return self._name_allowed(urlsplit(f"//{host}").hostname)
        except ValueError:
            return False

    def origin_allowed(self, origin: str | None, port: int) -> bool:
        """``origin`` is the ``Origin`` header (absent for non-browser clients); ``port`` the
        one the service listens on, so that a page served by another local port is refused."""
        if origin is None:
            return True
        normalized = origin.lower().rstrip("/")
        if normalized in self.origins:
            return True
        try:
            parts = urlsplit(normalized)
            origin_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        return (
            parts.scheme in ("http", "https") and origin_port == port and self._name_allowed(parts.hostname)
        )
