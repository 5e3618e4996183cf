"""aiohttp, imported for the client without the work it does not need.

When aiohttp.connector is imported it builds two SSLContexts, each reading the system's
whole CA bundle (15 to 30 ms apiece measured here, of the 100 to 150 ms aiohttp takes to
import; every `kura pull` and `kura push` pays it, plain-HTTP ones included). One of them is
its context for `ssl=False`, which verifies nothing: the CAs it reads are never consulted. The
client's modules import aiohttp from here, which skips that read, and only that one: a context
that verifies certificates (aiohttp's default one, any other) loads the CAs exactly as before.

The import also runs with the cyclic garbage collector paused: it creates some 22,000 objects,
all long-lived (modules, classes, functions), and the collections they would trigger on the way
(30-odd, 7 to 20 ms in all here) find nothing to free. They are then frozen (gc.freeze()), so
that no later collection scans them again either; the client is a command that exits, and
what is alive at that point (its modules) lives until then anyway.

When aiohttp was imported earlier (the registry, the tests), this changes nothing.
"""

from __future__ import annotations

import gc
import ssl
import sys


def _load():
    if "aiohttp.connector" in sys.modules:
        import aiohttp
        return aiohttp
    own = "set_default_verify_paths" in ssl.SSLContext.__dict__  # else inherited from _ssl._SSLContext
    original = ssl.SSLContext.set_default_verify_paths

    def set_default_verify_paths(context: ssl.SSLContext) -> None:
        if context.verify_mode != ssl.CERT_NONE:
            original(context)

    ssl.SSLContext.set_default_verify_paths = set_default_verify_paths
    collecting = gc.isenabled()
    gc.disable()
    try:
        import aiohttp
        import aiohttp.connector  # noqa: F401  (the module that builds the contexts)
    finally:
        if collecting:
            gc.freeze()
            gc.enable()
        if own:
            ssl.SSLContext.set_default_verify_paths = original
        else:
            del ssl.SSLContext.set_default_verify_paths
    return aiohttp


aiohttp = _load()
