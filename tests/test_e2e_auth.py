"""End to end with skopeo: login and copy against Kura in htpasswd and token modes, and the
reference registry (CNCF distribution) accepting tokens that Kura's issuer signed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from registry.auth import htpasswd
from tests.support.paths import IMAGES, require_shared
from tests.support.servers import start_distribution_trusting, start_kura, stop

pytestmark = pytest.mark.e2e

USERS = {"alice": "alice-pass-1", "bob": "bob-pass-2"}
AUTH_TOML = """
[log]
level = "debug"
access_log = true

[auth]
mode = "{mode}"

[auth.groups]
team = ["alice", "bob"]

[[auth.rules]]
repositories = ["team/**"]
groups = ["team"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["public/**"]
anonymous = true
actions = ["pull"]

[[auth.rules]]
repositories = ["public/**"]
users = ["alice"]
actions = ["*"]
"""
IMAGE = f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64"


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path, monkeypatch):
    """Calls without --authfile are anonymous, whatever logins this machine remembers."""
    empty = tmp_path / "anonymous-auth.json"
    empty.write_text("{}")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(empty))


def skopeo(*args: str, authfile: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = ["skopeo", *args]
    if authfile is not None:
        command.insert(2, f"--authfile={authfile}")
    return subprocess.run(command, capture_output=True, text=True, timeout=180, input=stdin)


def login(host: str, user: str, authfile: Path) -> None:
    result = skopeo("login", "--tls-verify=false", "-u", user, "--password-stdin", host,
                    authfile=authfile, stdin=USERS[user])
    assert result.returncode == 0, result.stderr
    assert json.loads(authfile.read_text())["auths"][host]["auth"]


def start_secured_kura(root: Path, mode: str):
    """`kura serve` with USERS in its htpasswd file and AUTH_TOML's rules in `mode`."""
    for user, password in USERS.items():
        htpasswd.set_user(root / "auth" / "htpasswd", user, password, cost=4)
    config = root.parent / f"{root.name}.toml"
    config.write_text(AUTH_TOML.format(mode=mode))
    return start_kura(root, None, "--config", str(config))


@pytest.fixture(params=["htpasswd", "token"])
def kura(request, tmp_path):
    require_shared()
    server = start_secured_kura(tmp_path / "data", request.param)
    yield server
    stop(server)


def test_skopeo_login_push_pull(kura, tmp_path):
    authfile = tmp_path / "auth.json"
    denied = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{kura.host}/team/busybox:1")
    assert denied.returncode != 0 and ("unauthorized" in denied.stderr.lower() or "401" in denied.stderr)
    login(kura.host, "bob", authfile)
    pushed = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{kura.host}/team/busybox:1",
                    authfile=authfile)
    assert pushed.returncode == 0, pushed.stderr
    pulled = skopeo("copy", "--src-tls-verify=false", f"docker://{kura.host}/team/busybox:1",
                    f"oci:{tmp_path / 'out'}:1", authfile=authfile)
    assert pulled.returncode == 0, pulled.stderr
    anonymous = skopeo("inspect", "--tls-verify=false", f"docker://{kura.host}/team/busybox:1")
    assert anonymous.returncode != 0
    log = "\n".join(p.read_text() for p in tmp_path.glob("kura-*.log"))
    assert '"GET /v2/' in log  # the access log is on, at debug level...
    secrets = [USERS["bob"], json.loads(authfile.read_text())["auths"][kura.host]["auth"], "Bearer ey"]
    assert not [s for s in secrets if s in log]  # ...and shows no password, credential or token


def test_anonymous_pull_only_where_rules_allow(kura, tmp_path):
    authfile = tmp_path / "auth.json"
    login(kura.host, "alice", authfile)
    pushed = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{kura.host}/public/busybox:1",
                    authfile=authfile)
    assert pushed.returncode == 0, pushed.stderr
    anonymous = skopeo("inspect", "--tls-verify=false", f"docker://{kura.host}/public/busybox:1")
    assert anonymous.returncode == 0, anonymous.stderr
    anonymous_push = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{kura.host}/public/busybox:2")
    assert anonymous_push.returncode != 0
    login(kura.host, "bob", authfile)
    bob_push = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{kura.host}/public/busybox:3",
                      authfile=authfile)
    assert bob_push.returncode != 0  # bob may pull public/**, not push to it


def test_reference_registry_accepts_kura_tokens(tmp_path):
    """CNCF distribution, configured with auth.token trusting Kura's issuer certificate."""
    require_shared()
    root = tmp_path / "kura"
    issuer = start_secured_kura(root, "token")
    try:
        certificate = root / "auth" / "token-signing.crt"
        assert certificate.exists()
        assert oct((root / "auth" / "token-signing.key").stat().st_mode & 0o777) == "0o600"
        distribution = start_distribution_trusting(tmp_path / "distribution", f"{issuer.url}/auth/token",
                                                   "kura", "kura", certificate)
        try:
            authfile = tmp_path / "auth.json"
            login(distribution.host, "bob", authfile)
            pushed = skopeo("copy", "--dest-tls-verify=false", IMAGE,
                            f"docker://{distribution.host}/team/busybox:1", authfile=authfile)
            assert pushed.returncode == 0, pushed.stderr
            pulled = skopeo("copy", "--src-tls-verify=false", f"docker://{distribution.host}/team/busybox:1",
                            f"oci:{tmp_path / 'out'}:1", authfile=authfile)
            assert pulled.returncode == 0, pulled.stderr
            # Kura dropped the scope bob may not have; distribution enforces what the token says.
            refused = skopeo("copy", "--dest-tls-verify=false", IMAGE,
                             f"docker://{distribution.host}/public/busybox:1", authfile=authfile)
            assert refused.returncode != 0
        finally:
            stop(distribution)
    finally:
        stop(issuer)


def test_token_auth_behind_https_reverse_proxy_with_path_prefix(tmp_path):
    """Clients see only https://proxy: /v2/ at the root, Kura's issuer under /kura/auth/token."""
    from tests.support.proxy import ReverseProxy
    from tests.support.servers import free_port
    from tests.test_serve_options import self_signed

    require_shared()
    kura = start_secured_kura(tmp_path / "data", "token")
    cert, key = self_signed(tmp_path)
    port = free_port()
    try:
        with ReverseProxy(kura.url, "/kura", port, cert, key):
            host = f"127.0.0.1:{port}"
            import ssl
            import urllib.error
            import urllib.request
            context = ssl.create_default_context(cafile=str(cert))
            with pytest.raises(urllib.error.HTTPError) as challenge:
                urllib.request.urlopen(f"https://{host}/v2/", context=context)
            assert challenge.value.headers["WWW-Authenticate"] == \
                f'Bearer realm="https://{host}/kura/auth/token",service="kura"'
            authfile = tmp_path / "auth.json"
            login(host, "bob", authfile)
            pushed = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{host}/team/busybox:1",
                            authfile=authfile)
            assert pushed.returncode == 0, pushed.stderr
            pulled = skopeo("copy", "--src-tls-verify=false", f"docker://{host}/team/busybox:1",
                            f"oci:{tmp_path / 'out'}:1", authfile=authfile)
            assert pulled.returncode == 0, pulled.stderr
    finally:
        stop(kura)


def test_kura_trusting_an_external_issuer(tmp_path):
    """A second Kura with [auth.external] accepts tokens from the first one's issuer only."""
    require_shared()
    issuer_root = tmp_path / "issuer"
    issuer = start_secured_kura(issuer_root, "token")
    try:
        registry_config = tmp_path / "registry.toml"
        registry_config.write_text(f"""
[auth]
mode = "token"
[auth.external]
realm = "{issuer.url}/auth/token"
service = "kura"
issuer = "kura"
certificate = "{issuer_root / 'auth' / 'token-signing.crt'}"
""")
        registry = start_kura(tmp_path / "registry", None, "--config", str(registry_config))
        try:
            assert not (tmp_path / "registry" / "auth" / "token-signing.key").exists()
            authfile = tmp_path / "auth.json"
            login(registry.host, "bob", authfile)
            pushed = skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{registry.host}/team/busybox:1",
                            authfile=authfile)
            assert pushed.returncode == 0, pushed.stderr
        finally:
            stop(registry)
    finally:
        stop(issuer)


def test_challenge_driven_client_can_mount(tmp_path):
    """A client that asks the issuer for exactly what the challenge names (python-dxf,
    containerd) gets pull on a mount's source too, so the blob is mounted, not uploaded."""
    import base64
    import hashlib
    import re
    import urllib.error
    import urllib.parse
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the env says

    def challenge_driven(method: str, url: str, user: str, data: bytes | None = None) -> int:
        try:
            return opener.open(urllib.request.Request(url, data=data, method=method)).status
        except urllib.error.HTTPError as refused:
            if refused.code != 401:
                return refused.code
            params = dict(re.findall(r'(\w+)="([^"]*)"', refused.headers["WWW-Authenticate"]))
        query = urllib.parse.urlencode({"service": params["service"], "scope": params["scope"]})
        login = base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()
        with opener.open(urllib.request.Request(f"{params['realm']}?{query}",
                                                headers={"Authorization": f"Basic {login}"})) as r:
            token = json.loads(r.read())["token"]
        request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
        try:
            return opener.open(request).status
        except urllib.error.HTTPError as failed:
            return failed.code

    require_shared()
    server = start_secured_kura(tmp_path / "data", "token")
    try:
        layer = b"a layer alice pushed to team/app"
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        base = f"http://{server.host}/v2"
        assert challenge_driven("POST", f"{base}/team/app/blobs/uploads/?digest={digest}", "alice", layer) == 201
        assert challenge_driven("POST", f"{base}/public/lib/blobs/uploads/?mount={digest}&from=team/app",
                                "alice") == 201
    finally:
        stop(server)
