"""``scripts/cluster N``: N replicas of the service behind HAProxy on one PostgreSQL, on this
machine, for trying replicas out (docs/scaling.md). Not for production: use docker-compose.yml
or Kubernetes there.

The replicas listen on ``--base-port``, ``--base-port + 1``, ... as ``chat-1``, ``chat-2``, ...;
HAProxy (deploy/haproxy.cfg, rendered for these ports) listens on ``--port``. The database is
``--database-url`` (or ``$DATABASE_URL``), else the embedded PostgreSQL of the data directory
(the same one a single ``scripts/start`` uses). The first replica starts alone, so the model is
prepared once, then the others. Arguments after ``--`` go to every replica. Ctrl-C (or SIGTERM)
drains the replicas (SIGTERM each: replies finish within ``--shutdown-grace``), then stops
HAProxy and the database. A replica that dies (try ``kill -9``) stays down.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from deploy.haproxy_local import BIND_ENV, Replica, render
from service.paths import default_data_dir
from service.store.embedded import EmbeddedPostgres

_LISTENING = re.compile(r"listening on http://[\d.]+:(\d+)/")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("replicas", type=int, help="how many replicas (1..8)")
    p.add_argument("--port", type=int, default=8765, help="HAProxy's port (default: %(default)s)")
    p.add_argument(
        "--base-port",
        type=int,
        default=8801,
        help="the first replica's port; 0: free ones (default: %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HAProxy's interface (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, help="models and the embedded database")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or None)
    p.epilog = "Arguments after -- go to every replica (python -m service --help)."
    return p


def _wait_listening(process: subprocess.Popen[str], name: str, echoes: list[threading.Thread]) -> int:
    """Echo the replica's log until it listens, then keep echoing it (a thread added to
    ``echoes``); returns the port it listens on."""
    assert process.stderr is not None
    for line in process.stderr:
        sys.stderr.write(line)
        if match := _LISTENING.search(line):
            break
    else:
        raise SystemExit(f"{name} exited before it listened")
    stream = process.stderr
    echo = threading.Thread(target=lambda: [sys.stderr.write(line) for line in stream], daemon=True)
    echo.start()
    echoes.append(echo)
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = _parser().parse_args(ours)
    if not 1 <= args.replicas <= 8:
        raise SystemExit("replicas: 1..8")
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not installed (scripts/cluster installs Debian's package)")
    data_dir = args.data_dir or default_data_dir()
    embedded = None
    url = args.database_url
    if url is None:
        embedded = EmbeddedPostgres.start(data_dir)
        url = embedded.dsn
    names = [f"chat-{i + 1}" for i in range(args.replicas)]
    replicas: list[Replica] = []
    work = Path(tempfile.mkdtemp(prefix="localchat-cluster-"))
    processes: list[subprocess.Popen[str]] = []
    echoes: list[threading.Thread] = []
    proxy = None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for i, name in enumerate(names):
            port = args.base_port + i if args.base_port else 0
            command = [
                sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                "--instance-name", name, "--data-dir", str(data_dir), "--database-url", url, *extra,
            ]  # fmt: skip
            # Own process group: Ctrl-C reaches the cluster, which drains the replicas in turn.
            process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
            processes.append(process)
            replicas.append(Replica(name, "127.0.0.1", _wait_listening(process, name, echoes)))
        config = work / "haproxy.cfg"
        config.write_text(render(replicas), encoding="utf-8")
        env = {**os.environ, BIND_ENV: f"{args.host}:{args.port}"}
        proxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], env=env, start_new_session=True)
        ports = ", ".join(str(r.port) for r in replicas)
        print(
            f"\n{len(replicas)} replica(s) behind HAProxy: http://{args.host}:{args.port}/ "
            f"(replicas on ports {ports}); Ctrl-C stops\n",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait()
        for echo in echoes:
            echo.join()  # the replicas' last lines (how their drain went) reach the terminal
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
