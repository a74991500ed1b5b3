"""Plain HTTP on the service's port: the page, ``/healthz``, ``/readyz``, ``/metrics``, and the
plain generation and REST chat routes (``routes.plain_routes``, described in schema/openapi.yaml)."""
