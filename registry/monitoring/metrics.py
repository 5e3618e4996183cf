"""`GET /metrics` in the Prometheus text format (prometheus_client), and what feeds it: a
middleware that counts every request by route template, method and status, and the Recorder
the auth, pull-through cache and garbage collection report to. Loaded only when [metrics] is
enabled (prometheus_client: 1 MiB a process on import, about 3 MiB a worker once serving).

Labels are bounded by the code, never by what clients send: the route is aiohttp's template
(`/v2/{name}/manifests/{reference}`, never a path or a repository name), the method one of the
HTTP methods the registry knows (else "other"), a proxy its configured prefix.

With `kura serve --workers N` the values are kept in the workers' shared directory
(workers.py) and every scrape sums them over the workers, whichever one answers it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import values as prometheus_values

from storage.usage import StoreUsage

from ..config import Config
from ..context import STORAGE
from . import workers
from .recorder import RECORDER, Recorder
from .usage import Schedule, UsageCounter

# Chosen by prometheus_client when it was imported (from PROMETHEUS_MULTIPROC_DIR).
MULTIPROCESS = prometheus_values.ValueClass is not prometheus_values.MutexValue
# No `…_created` series beside every counter and histogram: a third more lines to write and
# store, for a time Prometheus does not use.
disable_created_metrics()

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route: 404, or 405 for a method the path does not take
UPLOAD_ROUTES = frozenset({"/v2/{name}/blobs/uploads/", "/v2/{name}/blobs/uploads",
                           "/v2/{name}/blobs/uploads/{uuid}"})
UPLOAD_METHODS = frozenset({"POST", "PATCH", "PUT"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus version reads
FLUSH_SECONDS = 1.0  # request counts reach the metrics (and, with workers, the shared files) this often
CLIENT_CLOSED = 499  # the client went away before an answer (nginx's code for it)
# Small requests take milliseconds; blob transfers minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, float("inf"))
GC_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, float("inf"))


class Metrics(Recorder):
    """Every metric of one server process, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

        def counter(name, text, labels=()):
            return Counter(name, text, labels, registry=registry)

        def gauge(name, text, labels=(), mode="mostrecent"):
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=mode)

        self.requests = counter("kura_http_requests", "HTTP requests answered, by route template, method and "
                                "status", ("route", "method", "status"))
        self.duration = Histogram("kura_http_request_duration_seconds", "Time from the request's headers to "
                                  "the handler's end (a streamed body included)", ("route", "method"),
                                  registry=registry, buckets=LATENCY_BUCKETS)
        self.received = counter("kura_http_received_bytes", "Request body bytes received", ("route", "method"))
        self.sent = counter("kura_http_sent_bytes", "Response body bytes sent (as their Content-Length "
                            "announced)", ("route", "method"))
        self.uploads = gauge("kura_uploads_in_progress", "Upload requests (POST, PATCH, PUT of blob uploads) "
                             "being received", mode="livesum")
        self.failed_logins = counter("kura_auth_failed_logins", "Failed password checks, by reason", ("reason",))
        self.cache = counter("kura_proxy_cache_requests", "Pull-through cache lookups: hit, revalidated, stale, "
                             "miss", ("proxy", "kind", "result"))
        self.upstream_requests = counter("kura_proxy_upstream_requests", "Requests the pull-through cache sent "
                                         "its upstream, by status", ("proxy", "status"))
        self.upstream_failures = counter("kura_proxy_upstream_failures", "Upstream requests that failed "
                                         "(unreachable, 5xx, refused, bad content)", ("proxy",))
        self.rate_limit = gauge("kura_proxy_upstream_ratelimit_limit", "The upstream's last ratelimit-limit "
                                "header", ("proxy",))
        self.rate_remaining = gauge("kura_proxy_upstream_ratelimit_remaining", "The upstream's last "
                                    "ratelimit-remaining header", ("proxy",))
        self.gc_runs = counter("kura_gc_runs", "Garbage collections, by outcome: completed, skipped (another "
                               "process was collecting), failed", ("outcome",))
        self.gc_duration = Histogram("kura_gc_duration_seconds", "Time a completed garbage collection took",
                                     registry=registry, buckets=GC_BUCKETS)
        self.gc_freed = counter("kura_gc_freed_bytes", "Bytes of blobs garbage collections deleted")
        self.gc_blobs = counter("kura_gc_deleted_blobs", "Blobs garbage collections deleted")
        self.gc_last = gauge("kura_gc_last_completed_timestamp_seconds", "When the last completed garbage "
                             "collection ended (Unix time)")
        self._store: dict[str, Gauge] | None = None
        self._durations: dict[tuple, Histogram] = {}
        self._pending: dict[tuple, list] = {}

    # -- requests ---------------------------------------------------------------------
    def request_done(self, route: str, method: str, status: int, seconds: float, received: int, sent: int) -> None:
        """Count one request. The duration goes to its histogram at once; the counts wait in
        a dict for the next flush(), at most FLUSH_SECONDS later: with workers, each increment
        of a series is a write to a shared file, and a request would otherwise make four."""
        duration = self._durations.get((route, method))
        if duration is None:
            duration = self._durations[(route, method)] = self.duration.labels(route, method)
        duration.observe(seconds)
        key = (route, method, status)
        counts = self._pending.get(key)
        if counts is None:
            counts = self._pending[key] = [0, 0, 0]
        counts[0] += 1
        counts[1] += received
        counts[2] += sent

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for (route, method, status), (count, received, sent) in pending.items():
            self.requests.labels(route, method, str(status)).inc(count)
            if received:
                self.received.labels(route, method).inc(received)
            if sent:
                self.sent.labels(route, method).inc(sent)

    # -- Recorder -----------------------------------------------------------------------
    def failed_login(self, reason: str) -> None:
        self.failed_logins.labels(reason).inc()

    def cache_lookup(self, proxy: str, kind: str, result: str) -> None:
        self.cache.labels(proxy, kind, result).inc()

    def upstream_response(self, proxy: str, status: int, limit: int | None, remaining: int | None) -> None:
        self.upstream_requests.labels(proxy, str(status)).inc()
        if limit is not None:
            self.rate_limit.labels(proxy).set(limit)
        if remaining is not None:
            self.rate_remaining.labels(proxy).set(remaining)

    def upstream_failure(self, proxy: str) -> None:
        self.upstream_failures.labels(proxy).inc()

    def garbage_collection(self, outcome: str, seconds: float, bytes_freed: int, blobs: int) -> None:
        self.gc_runs.labels(outcome).inc()
        if outcome == "completed":
            self.gc_duration.observe(seconds)
            self.gc_freed.inc(bytes_freed)
            self.gc_blobs.inc(blobs)
            self.gc_last.set(time.time())

    # -- what the store holds -------------------------------------------------------------
    def publish_usage(self, report: StoreUsage, seconds: float) -> None:
        """Made on the first count, so that no scrape shows a 0 that nobody counted."""
        if self._store is None:
            self._store = {name: Gauge(f"kura_storage_{name}", text, registry=self.registry,
                                       multiprocess_mode="mostrecent") for name, text in (
                ("repositories", "Repositories in the store"),
                ("manifests", "Manifests, counted in each repository that holds them"),
                ("tags", "Tags"),
                ("blobs", "Blobs stored (layers, configs, manifests)"),
                ("bytes", "Bytes of the blobs stored"),
                ("reclaimable_bytes", "Bytes of blobs no manifest references (the next collection's, after "
                                      "its grace period)"),
                ("usage_duration_seconds", "Time the last count of the store took"),
                ("usage_timestamp_seconds", "When the last count of the store ended (Unix time)"))}
        rows = report.repositories
        for name, value in (("repositories", len(rows)), ("manifests", sum(row.manifests for row in rows)),
                            ("tags", sum(row.tags for row in rows)), ("blobs", report.blobs),
                            ("bytes", report.store_bytes), ("reclaimable_bytes", report.reclaimable_bytes),
                            ("usage_duration_seconds", seconds), ("usage_timestamp_seconds", time.time())):
            self._store[name].set(value)


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def middleware(metrics: Metrics):
    @web.middleware
    async def count(request: web.Request, handler) -> web.StreamResponse:
        route = route_of(request)
        method = request.method if request.method in METHODS else "other"
        upload = method in UPLOAD_METHODS and route in UPLOAD_ROUTES
        if upload:
            metrics.uploads.inc()
        started = time.perf_counter()
        status, response = 500, None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            if upload:
                metrics.uploads.dec()
            sent = response.content_length if response is not None and method != "HEAD" else 0
            metrics.request_done(route, method, status, time.perf_counter() - started,
                                 request.content.total_bytes, sent or 0)

    return count


class Exposition:
    """What `/metrics` answers with, and who may ask."""

    def __init__(self, metrics: Metrics, token: str | None, counter: UsageCounter):
        self.metrics = metrics
        self.token = token.encode() if token is not None else None
        self.counter = counter
        if MULTIPROCESS:
            from prometheus_client.multiprocess import MultiProcessCollector

            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # every worker's files, live or not
        else:
            self.registry = metrics.registry

    def authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                  self.token)

    async def handle(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.Response(status=401, text="401: /metrics needs `Authorization: Bearer <metrics.token>`\n",
                                headers={"WWW-Authenticate": 'Bearer realm="kura metrics"'})
        self.counter.poke()
        self.metrics.flush()  # this process's counts to the second (the others': within FLUSH_SECONDS)
        # Milliseconds of work (reading every worker's files, with workers): not on the event loop.
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})


EXPOSITION = web.AppKey("metrics_exposition", Exposition)


async def _background(app: web.Application):
    """Flush the request counts every FLUSH_SECONDS; at the end, stop counting the store and
    flush what is left."""
    exposition = app[EXPOSITION]

    async def flushing() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            exposition.metrics.flush()

    task = asyncio.ensure_future(flushing())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await exposition.counter.close()
    exposition.metrics.flush()


def setup(app: web.Application, config: Config) -> web.middleware:
    """Install the metrics on `app` (not started yet); the middleware to put first among the
    app's own (inside any logging one), so that it sees the status error_middleware made."""
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    app[RECORDER] = metrics
    shared = workers.directory() if MULTIPROCESS else None
    schedule = Schedule(config.metrics_usage_refresh_seconds, Path(shared, "usage.lock") if shared else None)
    counter = UsageCounter(app[STORAGE], schedule, metrics.publish_usage)
    app[EXPOSITION] = exposition = Exposition(metrics, config.metrics_token, counter)
    app.cleanup_ctx.append(_background)
    app.router.add_get("/metrics", exposition.handle)
    return middleware(metrics)
