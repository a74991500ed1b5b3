"""Structure of docker-compose.yml and the Dockerfile (Docker itself is not needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _named_volumes(service: dict[str, Any]) -> set[str]:
    names = set()
    for vol in service.get("volumes", []):
        source = vol.get("source", "") if isinstance(vol, dict) else vol.split(":", 1)[0]
        if source and not source.startswith((".", "/", "~")):
            names.add(source)
    return names


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _chat_services(services: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name in ("chat", "chat-gpu") if name in services]


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """The chat service, its GPU variant, the load balancer and the database are all defined."""
    assert {"chat", "chat-gpu", "haproxy", "db"} <= services.keys()


def test_chat_waits_for_healthy_db(services: dict[str, dict[str, Any]]) -> None:
    """Each chat service starts only once db reports healthy."""
    for name in _chat_services(services):
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy", name


def test_database_url_points_at_db(services: dict[str, dict[str, Any]]) -> None:
    """DATABASE_URL is a postgresql URL whose host is the db service."""
    for name in _chat_services(services):
        url = urlsplit(_env(services[name])["DATABASE_URL"])
        assert url.scheme in {"postgresql", "postgres"}, name
        assert url.hostname == "db", name


def test_db_is_postgres_with_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    """db runs postgres:16 and checks itself with pg_isready."""
    db = services["db"]
    assert db["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])


def test_haproxy_publishes_8765_in_front_of_the_replicas(services: dict[str, dict[str, Any]]) -> None:
    """haproxy publishes host port 8765; the chat replicas only expose 8765 to it (two replicas
    cannot share a host port); chat-gpu publishes its own host port."""
    assert "ports" not in services["chat"]
    assert [str(p) for p in services["chat"]["expose"]] == ["8765"]
    haproxy_ports = [str(p) for p in services["haproxy"]["ports"]]
    assert haproxy_ports == ["8765:8765"]
    assert _env(services["haproxy"])["LOCALCHAT_HAPROXY_BIND"] == ":8765"
    gpu_ports = [str(p) for p in services["chat-gpu"]["ports"]]
    assert any(p.split(":")[-1] == "8765" for p in gpu_ports)
    assert {p.split(":")[0] for p in gpu_ports}.isdisjoint({p.split(":")[0] for p in haproxy_ports})


def test_chat_runs_replicas_that_drain(services: dict[str, dict[str, Any]]) -> None:
    """chat runs 2 replicas, and Docker waits longer than the default --shutdown-grace (10 s)
    before it kills one, so a SIGTERM'd replica can let its replies finish."""
    chat = services["chat"]
    assert chat["deploy"]["replicas"] == 2
    assert re.fullmatch(r"(\d+)s", chat["stop_grace_period"])
    assert int(chat["stop_grace_period"][:-1]) > 10


def test_haproxy_runs_the_repositorys_config(services: dict[str, dict[str, Any]]) -> None:
    """haproxy mounts deploy/haproxy.cfg, whose servers are the chat service's replicas on 8765,
    checked on /readyz, hashed consistently on the affinity key."""
    haproxy = services["haproxy"]
    assert haproxy["image"].startswith("haproxy:")
    assert "chat" in haproxy["depends_on"]
    source, target = haproxy["volumes"][0].split(":")[:2]
    assert (ROOT / source).resolve() == ROOT / "deploy" / "haproxy.cfg"
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    config = (ROOT / "deploy" / "haproxy.cfg").read_text(encoding="utf-8")
    assert re.search(r"^\s*server-template chat \d+-\d+ chat:8765 check resolvers docker", config, re.M)
    for line in ("hash-type consistent", "balance hash var(txn.affinity)", "uri /readyz", "timeout tunnel"):
        assert line in config


def test_chat_healthcheck_uses_healthz(services: dict[str, dict[str, Any]]) -> None:
    """The chat healthcheck fetches /healthz with python's urllib (no curl in the image)."""
    for name in _chat_services(services):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "urllib" in test, name
        assert "/healthz" in test, name


def test_volumes_declared_and_used(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """chat-data and pg-data are declared, mounted, and no undeclared named volume is used."""
    declared = set(compose["volumes"])
    used = set().union(*(_named_volumes(s) for s in services.values()))
    assert {"chat-data", "pg-data"} <= declared
    assert used == declared
    assert "chat-data" in _named_volumes(services["chat"])
    assert "pg-data" in _named_volumes(services["db"])


def test_chat_runs_service_on_all_interfaces(services: dict[str, dict[str, Any]]) -> None:
    """chat listens on 0.0.0.0 and keeps its data dir on the chat-data volume."""
    command = services["chat"]["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    data_dir = command[command.index("--data-dir") + 1]
    assert f"chat-data:{data_dir}" in services["chat"]["volumes"]


def test_gpu_service_in_gpu_profile(services: dict[str, dict[str, Any]]) -> None:
    """chat-gpu is only in the gpu profile, so a plain `docker compose up` never needs a GPU."""
    assert services["chat-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["chat"]
    assert "profiles" not in services["db"]


def test_gpu_service_requests_nvidia_devices(services: dict[str, dict[str, Any]]) -> None:
    """chat-gpu reserves NVIDIA GPUs and runs with --device cuda."""
    gpu = services["chat-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    command = gpu["command"]
    assert command[command.index("--device") + 1] == "cuda"


def test_gpu_service_builds_onnxruntime_gpu(services: dict[str, dict[str, Any]]) -> None:
    """chat-gpu passes ONNXRUNTIME=onnxruntime-gpu and a CUDA base image as build args."""
    args = services["chat-gpu"]["build"]["args"]
    assert args["ONNXRUNTIME"] == "onnxruntime-gpu"
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert services["chat-gpu"]["image"] != services["chat"]["image"]


def test_dockerfile_args_are_used() -> None:
    """The Dockerfile declares BASE_IMAGE (before FROM) and ONNXRUNTIME (in the stage) and uses both."""
    instructions = _instructions()
    keywords = [kw for kw, _ in instructions]
    from_at = keywords.index("FROM")
    args = {i: dict([rest.split("=", 1)]) for i, (kw, rest) in enumerate(instructions) if kw == "ARG"}
    base = next(a["BASE_IMAGE"] for i, a in args.items() if "BASE_IMAGE" in a and i < from_at)
    ort = next(a["ONNXRUNTIME"] for i, a in args.items() if "ONNXRUNTIME" in a and i > from_at)
    assert base.startswith("python:3.11")
    assert ort == "onnxruntime"
    assert re.fullmatch(r"\$\{?BASE_IMAGE\}?", instructions[from_at][1])
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert re.search(r"\$\{?ONNXRUNTIME\}?", runs)
    assert "pip uninstall -y onnxruntime" in runs


def test_dockerfile_runs_the_service() -> None:
    """The image starts `python -m service`, exposes 8765 and has a /healthz healthcheck."""
    instructions = dict(_instructions())
    assert instructions["ENTRYPOINT"] == '["python", "-m", "service"]'
    assert instructions["EXPOSE"] == "8765"
    assert "/healthz" in instructions["HEALTHCHECK"]
