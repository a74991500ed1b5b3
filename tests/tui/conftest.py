"""The TUI tests run against a real service (tiny model, real PostgreSQL) from tests/service."""

from __future__ import annotations

from tests.service.conftest import server, service_settings, start_service, tiny_base_model  # noqa: F401
