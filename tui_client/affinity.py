"""The affinity key the client sends as ``/ws?affinity=<key>`` so that a load balancer in front
of several replicas (deploy/haproxy.cfg) sends the same user to the same replica: warm KV
caches, and replies to reattach to after a reconnect.

With a token the key is a hash of it (the same user everywhere, and the token itself never
appears in a proxy's logs); without one (``--auth none``) it is a random id made once and kept
in ``$XDG_STATE_HOME/localchat/affinity`` (``~/.local/state/...``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

PARAM = "affinity"


def state_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "localchat" / "affinity"


def affinity_key(token: str | None, path: Path | None = None) -> str:
    if token:
        return hashlib.sha256(b"localchat-affinity\0" + token.encode()).hexdigest()[:32]
    path = path or state_file()
    try:
        kept = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        kept = ""
    if len(kept) == 32 and all(c in "0123456789abcdef" for c in kept):
        return kept
    key = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key + "\n", encoding="ascii")
    except OSError:
        pass  # a read-only home: the key still holds for this run
    return key


def with_affinity(url: str, key: str | None) -> str:
    """``url`` with ``?affinity=key`` (unless ``key`` is None or the URL names one already)."""
    if key is None:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == PARAM for name, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, (PARAM, key)])))
