"""Helpers shared by the benchmarks: machine facts, memory, a fixed-width table, JSON output."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from service.engine.models.onnx_builder import Precision

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
_LISTENING = re.compile(rb"listening on http://[\d.]+:(\d+)/")


@dataclass(frozen=True, slots=True)
class ServiceProcess:
    url: str  # ws://127.0.0.1:PORT/ws
    pid: int


@asynccontextmanager
async def service_subprocess(*options: str, start_timeout_s: float = 600) -> AsyncIterator[ServiceProcess]:
    """``python -m service --port 0 OPTIONS`` in its own process, as users run it, until the block
    ends (SIGTERM, then its exit is awaited). ``$DATABASE_URL`` is not passed on: only a
    ``--database-url`` among the options names a database, else it embeds its own."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "--port", "0", *options, "--log-level", "INFO",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    log: list[bytes] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        while not (match := _LISTENING.search(log[-1] if log else b"")):
            line = await asyncio.wait_for(process.stderr.readline(), start_timeout_s)
            if not line:
                raise RuntimeError("the service exited:\n" + b"".join(log).decode(errors="replace"))
            log.append(line)
        drain = asyncio.create_task(process.stderr.read())  # keep its pipe from filling up
        yield ServiceProcess(f"ws://127.0.0.1:{int(match.group(1))}/ws", process.pid)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
        if drain is not None:
            await drain


def median(values: Iterable[float]) -> float | None:
    """The median, or None for no values."""
    items = list(values)
    return statistics.median(items) if items else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to what platform knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def onnxruntime_version() -> str | None:
    """The installed onnxruntime distribution (CPU or GPU build), read without importing it."""
    return package_version("onnxruntime") or package_version("onnxruntime-gpu")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float | None:
    """Resident memory of this process now, in MiB, from /proc (None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fmt(value: object, digits: int = 1) -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, one rule under the header."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` pretty-printed (creating folders), atomically; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of values sorted ascending."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def run_facts(began: float) -> dict[str, Any]:
    """Where and with what a benchmark ran, and for how long since ``began`` (a perf_counter)."""
    return {
        "machine": machine_info(),
        "onnxruntime_version": onnxruntime_version(),
        "peak_rss_mb": peak_rss_mb(),
        "bench_seconds": time.perf_counter() - began,
        "timestamp": timestamp(),
    }


def machine_line(data: dict[str, Any]) -> str:
    """The table head's line on where it ran: CPU, cores, load, onnxruntime, peak RSS, duration."""
    machine = data["machine"]
    return (
        f"{machine['cpu_model']} ({machine['usable_cores']} cores, load {machine['load_avg_1m']:.2f}); "
        f"onnxruntime {data['onnxruntime_version']}; peak RSS {data['peak_rss_mb']:.0f} MiB; "
        f"{data['bench_seconds']:.0f} s"
    )


def add_run_arguments(
    parser: argparse.ArgumentParser, *, out: str, tokens: int = 128, rounds: int = 3
) -> None:
    """--threads, --tokens, --rounds, --out, -v: how much a generation benchmark runs, and where
    its JSON goes (``bench/results/<out>``)."""
    parser.add_argument("--threads", type=int, default=2, help="decoder threads (default 2)")
    parser.add_argument(
        "--tokens", type=int, default=tokens, help=f"max tokens per generation (default {tokens})"
    )
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"repetitions; medians are reported (default {rounds})"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / out, help="JSON output file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every round as it ends")


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --database-url, --precision: where a benchmarked service finds its model and history."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO_ROOT / ".cache",
        help="where the model is cached (default: <repo>/.cache)",
    )
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL (default: embedded, in a temporary folder)"
    )
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=Precision.INT8.value)
