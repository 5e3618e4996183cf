"""Real load balancers in front of several `kura serve` instances: haproxy and nginx.

Each runs as a private process of the test: its own config, pid, log and temp files in a
folder the test gives, listening on a free port of 127.0.0.1 only, in the foreground
(haproxy `-W -db`, nginx `daemon off`), in a session of its own so that nothing outlives
`stop()`. Both spread requests round-robin over the backends with no stickiness, stream
request and response bodies (nothing is buffered to disk or memory first), allow bodies of
any size and give big uploads time.

Headers: Kura's `Location` headers are relative (`/v2/<name>/blobs/uploads/<uuid>`, see
registry/context.py and registry/uploads.py), so clients resolve them against the balancer's
URL and no header is needed for uploads to work. What Kura does need from a proxy is for the
token realm it advertises (`auth.mode = "token"`) and the client addresses it rate-limits
failed logins by: the balancers keep the client's `Host`, and set `X-Forwarded-Proto`,
`X-Forwarded-Host` and `X-Forwarded-For`, which Kura believes only from `auth.trusted_proxies`.

Every response carries `X-Kura-Backend`, naming the instance that answered (haproxy: the
server name, `k0`...; nginx: its address, `127.0.0.1:PORT`), so tests can see where each
request went. The configs in `haproxy_config` and `nginx_config` are the ones
docs/scale-out-draft.md shows."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .lifetime import assert_main_thread, die_with_parent
from .servers import free_port

BACKEND_HEADER = "X-Kura-Backend"
# Timeouts: haproxy's and nginx's are inactivity timeouts (no byte moved for that long), not
# limits on a whole request, so a 10 GiB layer that keeps moving is never cut off.
IDLE_TIMEOUT_SECONDS = 900


def haproxy_config(port: int, backends: list[int], pid_file: Path | None = None) -> str:
    servers = "\n".join(f"    server k{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    return f"""global
    log stdout format raw local0 info
    maxconn 4096
    nbthread 2
    {f'pidfile {pid_file}' if pid_file else ''}

defaults
    mode http
    log global
    option httplog
    # Requests are load-balanced one by one, also on a kept-alive client connection.
    option http-keep-alive
    # X-Forwarded-For: the client's address (Kura believes it only from auth.trusted_proxies).
    option forwardfor
    # A request that cannot reach its server (connection refused: an instance that died) is
    # tried again, on another server: no request body has been sent at that point.
    retries 3
    option redispatch 1
    timeout connect 5s
    timeout http-request 30s
    timeout client {IDLE_TIMEOUT_SECONDS}s
    timeout server {IDLE_TIMEOUT_SECONDS}s
    timeout http-keep-alive 30s
    timeout queue 30s

frontend registry
    bind 127.0.0.1:{port}
    # The Host header goes through unchanged; tell Kura what the client used.
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend kura

backend kura
    balance roundrobin
    # No stickiness: no cookie, no stick-table, no source hashing.
    # GET /v2/ answers 200 (no auth) or 401 (auth): either means the instance is serving.
    option httpchk GET /v2/
    http-check expect rstatus ^(200|401)$
    default-server check inter 500ms fall 1 rise 1
    http-response set-header {BACKEND_HEADER} %s
{servers}
"""


def nginx_config(port: int, backends: list[int], folder: Path, user: str | None = None) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in backends)
    temp = folder / "temp"
    return f"""{f'user {user};' if user else ''}
worker_processes 1;
daemon off;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} info;

events {{
    worker_connections 1024;
}}

http {{
    log_format kura '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                    'upstream=$upstream_addr upstream_status=$upstream_status time=$request_time';
    access_log {folder / 'access.log'} kura;
    client_body_temp_path {temp / 'body'};
    proxy_temp_path {temp / 'proxy'};
    fastcgi_temp_path {temp / 'fastcgi'};
    uwsgi_temp_path {temp / 'uwsgi'};
    scgi_temp_path {temp / 'scgi'};

    upstream kura {{
        # Round-robin (nginx's default), no ip_hash/hash/sticky.
{servers}
        keepalive 32;
        # Below Kura's [server] idle_timeout_seconds (60), so nginx never reuses a
        # connection the instance is closing.
        keepalive_timeout 30s;
    }}

    server {{
        listen 127.0.0.1:{port};

        # Blobs of any size, streamed both ways: nothing is spooled to disk first.
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";

        # Inactivity timeouts, long enough for big layers on slow links.
        client_body_timeout {IDLE_TIMEOUT_SECONDS}s;
        send_timeout {IDLE_TIMEOUT_SECONDS}s;
        proxy_connect_timeout 5s;
        proxy_send_timeout {IDLE_TIMEOUT_SECONDS}s;
        proxy_read_timeout {IDLE_TIMEOUT_SECONDS}s;

        # An instance that refuses the connection (it died) is skipped; a request whose
        # body was already sent is never repeated (nginx does not retry POST/PATCH then).
        proxy_next_upstream error timeout;

        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;

        add_header {BACKEND_HEADER} $upstream_addr always;

        location / {{
            proxy_pass http://kura;
        }}
    }}
}}
"""


@dataclass
class Routed:
    """One request as the balancer logged it."""
    method: str
    path: str
    status: int
    backend: int | None  # index into the backend list: the last instance tried, None if none
    cut_by_server: bool = False  # the instance went away mid-request (haproxy's termination state S*)


_HAPROXY_LINE = re.compile(r' kura/(?P<server>\S+) \S+ (?P<status>-?\d+) \d+ \S+ \S+ (?P<termination>\S{4}) '
                           r'.*"(?P<method>[A-Z]+) (?P<path>\S+) HTTP')
_NGINX_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d+) .*upstream=(?P<upstream>.*?) '
                         r'upstream_status=')


@dataclass
class Balancer:
    kind: str  # "haproxy" or "nginx"
    port: int
    folder: Path
    process: subprocess.Popen
    log: Path
    backends: list[int]  # the instances' ports, in config order

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def backend_index(self, header: str) -> int:
        """The backend an `X-Kura-Backend` value names (the last one tried, for nginx's list)."""
        value = header.split(",")[-1].strip()
        if self.kind == "haproxy":
            return int(value.removeprefix("k"))
        return self.backends.index(int(value.rpartition(":")[2]))

    def routed(self) -> list[Routed]:
        """Every request logged so far (a request is logged when it ends)."""
        found = []
        path = self.log if self.kind == "haproxy" else self.folder / "access.log"
        if not path.is_file():
            return found
        for line in path.read_text(errors="replace").splitlines():
            if self.kind == "haproxy":
                match = _HAPROXY_LINE.search(line)
                if match:
                    server = match["server"]
                    backend = int(server[1:]) if re.fullmatch(r"k\d+", server) else None
                    found.append(Routed(match["method"], match["path"], int(match["status"]), backend,
                                        match["termination"].startswith("S")))
            else:
                match = _NGINX_LINE.search(line)
                if match:
                    upstream = match["upstream"].split(",")[-1].strip()
                    port = upstream.rpartition(":")[2]
                    backend = self.backends.index(int(port)) if port.isdigit() and int(port) in self.backends \
                        else None
                    found.append(Routed(match["method"], match["path"], int(match["status"]), backend))
        return found

    def log_tail(self, lines: int = 30) -> str:
        paths = [self.log] + ([self.folder / "error.log"] if self.kind == "nginx" else [])
        out = []
        for path in paths:
            if path.is_file():
                out += [f"[{path.name}] {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def stop(self) -> None:
        if self.process.poll() is None:
            # haproxy's master and nginx's master both stop their workers on SIGTERM.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its session (workers), never anything else
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def __enter__(self) -> "Balancer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_haproxy(folder: Path, backends: list[int]) -> Balancer:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(port, backends, folder / "haproxy.pid"))
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"haproxy refuses {config}:\n{check.stdout}{check.stderr}"
    log = folder / "haproxy.log"
    assert_main_thread("haproxy")
    with open(log, "ab") as out:
        # SIGTERM, also when the test run dies: haproxy's master stops its workers.
        process = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=die_with_parent)
    return _wait_up(Balancer("haproxy", port, folder, process, log, list(backends)))


def start_nginx(folder: Path, backends: list[int]) -> Balancer:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "temp" / name).mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root, nginx's workers would run as `nobody`, which cannot enter pytest's private
    # temp folders: keep them as the user running the tests.
    user = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None
    config = folder / "nginx.conf"
    config.write_text(nginx_config(port, backends, folder, user))
    # -e: the error log before the config is read (else /var/log/nginx/error.log).
    base = ["nginx", "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx refuses {config}:\n{check.stdout}{check.stderr}"
    log = folder / "nginx.out"
    assert_main_thread("nginx")
    with open(log, "ab") as out:
        # SIGTERM, also when the test run dies: nginx's master stops its workers.
        process = subprocess.Popen(base, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=die_with_parent)
    return _wait_up(Balancer("nginx", port, folder, process, log, list(backends)))


START = {"haproxy": start_haproxy, "nginx": start_nginx}


def start(kind: str, folder: Path, backends: list[int]) -> Balancer:
    return START[kind](folder, backends)


def _wait_up(balancer: Balancer, timeout: float = 20.0) -> Balancer:
    """Until the balancer answers `GET /v2/` through a backend (any HTTP status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if balancer.process.poll() is not None:
            raise RuntimeError(f"{balancer.kind} exited with {balancer.process.returncode}:\n{balancer.log_tail()}")
        try:
            with urllib.request.urlopen(balancer.url + "/v2/", timeout=2) as response:
                if response.headers.get(BACKEND_HEADER):
                    return balancer
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and exc.headers.get(BACKEND_HEADER):
                return balancer
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    balancer.stop()
    raise TimeoutError(f"{balancer.kind} on {balancer.url} did not answer within {timeout}s:\n{balancer.log_tail()}")
