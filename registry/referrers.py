"""`GET /v2/<name>/referrers/<digest>`: manifests whose `subject` is that digest."""

import json

from aiohttp import web

from ocispec import mediatypes as mt

from .context import parse_digest, repository, storage


async def list_referrers(request: web.Request) -> web.Response:
    subject = parse_digest(request.match_info["digest"])
    descriptors = await storage(request).list_referrers(repository(request), subject)
    headers = {}
    artifact_type = request.rel_url.query.get("artifactType")
    if artifact_type is not None:
        descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": descriptors}
    return web.Response(body=json.dumps(index).encode(), headers=headers, content_type=mt.OCI_INDEX)
