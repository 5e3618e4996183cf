"""`kura login` / `kura logout`: check credentials against the registry, then store them."""

from __future__ import annotations

from ocispec.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

from .aiohttp_loader import aiohttp
from .credentials import Credentials
from .registries import Endpoint
from .transport import AuthError, RegistryClient


def normalise_server(server: str | None) -> str:
    server = (server or DOCKER_HUB).removeprefix("https://").removeprefix("http://").rstrip("/")
    server = server.split("/", 1)[0]
    return DOCKER_HUB if server in DOCKER_HUB_ALIASES else server


async def verify(server: str, credentials: Credentials, insecure: bool = False) -> None:
    """Raises AuthError unless the registry accepts these credentials (token flow or Basic)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = RegistryClient(session, Endpoint(server, "", insecure), credentials)
        async with client.request("GET", "/v2/", scope="") as response:
            if response.status != 200:
                raise AuthError(f"{server} answered {response.status} to /v2/")
