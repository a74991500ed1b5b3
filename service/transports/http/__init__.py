"""Plain HTTP on the service's port: the page, ``/healthz``, ``/readyz``, ``/metrics``."""
