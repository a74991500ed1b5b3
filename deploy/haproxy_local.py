"""deploy/haproxy.cfg for replicas on known addresses (``scripts/cluster``, the tests).

The compose file finds replicas through Docker's DNS; here they are local processes on ports
picked at start, so the ``servers:begin`` .. ``servers:end`` block becomes one ``server`` line
each, and the Docker resolver goes. Every other setting (the hash, the timeouts, the checks)
is the file's own, so what the tests exercise is what compose runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple

CONFIG: Final = Path(__file__).resolve().parent / "haproxy.cfg"
BIND_ENV: Final = "LOCALCHAT_HAPROXY_BIND"


class Replica(NamedTuple):
    name: str  # also the HAProxy server name, sent back in X-Localchat-Replica
    host: str
    port: int


def render(replicas: Sequence[Replica], template: str | None = None) -> str:
    """The config with ``replicas`` as its servers (HAProxy reads the bind address from
    :data:`BIND_ENV`)."""
    text = CONFIG.read_text(encoding="utf-8") if template is None else template
    out: list[str] = []
    skipping = False
    resolvers = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("resolvers "):
            resolvers = True
            continue
        if resolvers:
            if stripped and not line[0].isspace():
                resolvers = False
            else:
                continue
        if stripped == "# servers:begin":
            skipping = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}server {r.name} {r.host}:{r.port} check" for r in replicas)
            continue
        if stripped == "# servers:end":
            skipping = False
            continue
        if not skipping:
            out.append(line)
    if skipping:
        raise ValueError("haproxy.cfg: '# servers:begin' without '# servers:end'")
    return "\n".join(out) + "\n"
