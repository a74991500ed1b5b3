"""The command line: ``localchat`` and ``python -m service`` (``serve``, ``users``, ``models``),
and the options every entry point shares (``options``). Nothing below imports this package,
except the engine's own small entry points (``service.engine.demo``,
``python -m service.engine.models``), which take the shared model options."""
