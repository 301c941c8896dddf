"""``adaptune serve``: many adapters over one base model behind an OpenAI/vLLM-compatible API.

Modules, one job each: ``engine`` (the scheduler thread, continuous batching), ``batching`` (the
running batch's rows and caches), ``sampling`` and ``text`` (tokens and text per request),
``adapters`` and ``registry`` (adapter folders, names, leases, LRU residency), ``schemas``,
``handlers``, ``streams``, ``protocol`` and ``api`` (the HTTP side), ``metrics`` (Prometheus),
``server`` (assembling and running it). Nothing heavy is imported here.
"""

from __future__ import annotations

__all__ = ["ServeOptions", "build_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
