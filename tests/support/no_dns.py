"""Run `kura` with name resolution kept on this machine (python -m tests.support.no_dns ARGS).

Loopback names resolve as usual; every other name fails exactly as an unknown name does
(EAI_NONAME), so a test can use `no-such-host.invalid` without a query going to the machine's
nameserver, which may be elsewhere. Each lookup is appended to the file $KURA_TEST_LOOKUPS."""

from __future__ import annotations

import os
import socket
import sys

import aiohttp.connector
import aiohttp.resolver

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host)
    with open(os.environ["KURA_TEST_LOOKUPS"], "a") as log:
        log.write(name + "\n")
    if name not in LOOPBACK:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
# Lookups through getaddrinfo even if aiodns (a resolver of its own) is installed.
aiohttp.resolver.DefaultResolver = aiohttp.connector.DefaultResolver = aiohttp.resolver.ThreadedResolver

if __name__ == "__main__":
    from kura.__main__ import main
    sys.exit(main(sys.argv[1:]))
