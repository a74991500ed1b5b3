"""``--instance-name``, ``--lease`` and ``--heartbeat`` on the command line."""

from __future__ import annotations

import os
import socket

import pytest

from service.cli.serve import _parser, settings_from_args


def _settings(*argv: str) -> object:
    return settings_from_args(_parser().parse_args(list(argv)))


def test_replica_options_reach_the_settings() -> None:
    """The name, lease and heartbeat given are the ones the service runs with."""
    settings = settings_from_args(
        _parser().parse_args(["--instance-name", "chat-1", "--lease", "3", "--heartbeat", "0.5"])
    )
    assert (settings.replica.instance_name, settings.replica.lease_s, settings.replica.heartbeat_s) == (
        "chat-1",
        3.0,
        0.5,
    )


def test_the_default_name_is_host_and_pid_and_the_lease_15_s() -> None:
    """Without options: HOST:PID (distinct per process), a 15 s lease renewed every 5 s."""
    settings = settings_from_args(_parser().parse_args([]))
    assert settings.replica.instance_name == f"{socket.gethostname()}:{os.getpid()}"
    assert (settings.replica.lease_s, settings.replica.heartbeat_s) == (15.0, 5.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lease", "5", "--heartbeat", "5"], "shorter than --lease"),
        (["--heartbeat", "0"], "shorter than --lease"),
        (["--instance-name", "two words"], "without whitespace"),
    ],
)
def test_bad_replica_options_are_refused(argv: list[str], message: str) -> None:
    """A heartbeat that could let a live lease lapse, or an unreadable name, stops the start."""
    with pytest.raises(SystemExit, match=message):
        _settings(*argv)
