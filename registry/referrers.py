"""`GET /v2/<name>/referrers/<digest>`: manifests whose `subject` is that digest."""

import json
from urllib.parse import urlencode

from aiohttp import web

from ocispec import mediatypes as mt
from storage import manifests

from .context import parse_digest, repository, storage

# A page stops at whichever comes first; annotations can make descriptors large.
PAGE_ENTRIES = 1000
PAGE_BYTES = 4 << 20


async def list_referrers(request: web.Request) -> web.Response:
    subject = parse_digest(request.match_info["digest"])
    query = request.rel_url.query
    after = parse_digest(query["last"]) if "last" in query else None
    artifact_type = query.get("artifactType")
    page, cursor = await manifests.referrers(storage(request), repository(request), subject, after=after,
                                             artifact_type=artifact_type, max_entries=PAGE_ENTRIES,
                                             max_bytes=PAGE_BYTES)
    headers = {}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    if cursor is not None:
        params = {"last": str(cursor)}
        if artifact_type is not None:
            params["artifactType"] = artifact_type
        headers["Link"] = f'<{request.rel_url.path}?{urlencode(params)}>; rel="next"'
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": page}
    return web.Response(body=json.dumps(index).encode(), headers=headers, content_type=mt.OCI_INDEX)
