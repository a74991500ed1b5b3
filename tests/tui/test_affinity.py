"""The affinity key the TUI sends to a load balancer: stable per user, never the token itself."""

from __future__ import annotations

from pathlib import Path

from tui_client.affinity import affinity_key, with_affinity


def test_a_token_gives_the_same_key_everywhere_and_hides_the_token(tmp_path: Path) -> None:
    """The key is a hash of the token: equal for equal tokens, distinct otherwise, no file kept."""
    key = affinity_key("secret-token", tmp_path / "affinity")
    assert key == affinity_key("secret-token", tmp_path / "other")
    assert key != affinity_key("another-token", tmp_path / "affinity")
    assert "secret" not in key
    assert not (tmp_path / "affinity").exists()


def test_without_a_token_a_random_key_is_kept(tmp_path: Path) -> None:
    """Under --auth none the key is random, made once and reused from the state file."""
    path = tmp_path / "state" / "affinity"
    key = affinity_key(None, path)
    assert path.read_text().strip() == key
    assert affinity_key(None, path) == key
    path.write_text("garbage\n")
    assert affinity_key(None, path) not in (key, "garbage")


def test_the_key_goes_in_the_query() -> None:
    """The key joins any query the URL has, and never replaces one given explicitly."""
    assert with_affinity("ws://h:1/ws", "k") == "ws://h:1/ws?affinity=k"
    assert with_affinity("ws://h:1/ws?x=1", "k") == "ws://h:1/ws?x=1&affinity=k"
    assert with_affinity("ws://h:1/ws?affinity=mine", "k") == "ws://h:1/ws?affinity=mine"
    assert with_affinity("ws://h:1/ws", None) == "ws://h:1/ws"
