"""What the server reports for its metrics, without loading prometheus_client: the app holds
a Recorder under RECORDER; this one records nothing ([metrics] enabled = false), the one of
metrics.py counts. Callers need not know which."""

from __future__ import annotations

from aiohttp import web


class Recorder:
    def failed_login(self, reason: str) -> None:
        """A password check failed: `unknown user`, `wrong password`, `no user name`, `locked out`."""

    def cache_lookup(self, proxy: str, kind: str, result: str) -> None:
        """The pull-through cache answered a `kind` ("manifest", "blob") request: `result` is
        "hit" (no upstream request), "revalidated" (a HEAD confirmed it), "stale" (served while
        the upstream failed) or "miss" (fetched from the upstream)."""

    def upstream_response(self, proxy: str, status: int, limit: int | None, remaining: int | None) -> None:
        """The upstream of `proxy` answered; `limit`/`remaining`: its rate-limit headers, if any."""

    def upstream_failure(self, proxy: str) -> None:
        """A request to the upstream of `proxy` failed (unreachable, 5xx, refused, bad content)."""

    def garbage_collection(self, outcome: str, seconds: float, bytes_freed: int, blobs: int) -> None:
        """One collection ended: "completed", "skipped" (another process was collecting) or "failed"."""


RECORDER = web.AppKey("recorder", Recorder)


def recorder(request: web.Request) -> Recorder:
    return request.app[RECORDER]
