"""URL routes of the distribution API. Order matters: uploads before blobs/<digest>."""

from aiohttp import web

from . import base, blobs, catalog, manifests, referrers, tags, uploads

NAME = "{name:.+}"


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2/", base.api_version_check)
    r.add_get("/v2", base.api_version_check)
    r.add_get("/v2/_catalog", catalog.list_repositories)
    r.add_get(f"/v2/{NAME}/tags/list", tags.list_tags)
    r.add_get(f"/v2/{NAME}/referrers/{{digest:[^/]+}}", referrers.list_referrers)

    r.add_post(f"/v2/{NAME}/blobs/uploads/", uploads.start_upload)
    r.add_post(f"/v2/{NAME}/blobs/uploads", uploads.start_upload)
    session = f"/v2/{NAME}/blobs/uploads/{{uuid:[^/]+}}"
    r.add_get(session, uploads.upload_status, allow_head=False)
    r.add_patch(session, uploads.upload_chunk)
    r.add_put(session, uploads.finish_upload)
    r.add_delete(session, uploads.cancel_upload)

    blob = f"/v2/{NAME}/blobs/{{digest:[^/]+}}"
    r.add_get(blob, blobs.get_blob)  # also HEAD
    r.add_delete(blob, blobs.delete_blob)

    manifest = f"/v2/{NAME}/manifests/{{reference:[^/]+}}"
    r.add_get(manifest, manifests.get_manifest)  # also HEAD
    r.add_put(manifest, manifests.put_manifest)
    r.add_delete(manifest, manifests.delete_manifest)
