"""The web UI's session cookie: who is signed in, and the token its forms must carry.

Every visitor gets a signed cookie (anonymous ones too), holding the user (None when
anonymous), a random nonce, an expiry and a fingerprint of the user's password hash, so that
changing or removing the password ends the session. The forms' CSRF token is an HMAC of the
nonce: a page of another site can neither read it nor, with SameSite=Strict, send the cookie.

The HMAC key is derived from the token signing key in token mode (instances sharing that key
share sessions), else kept in `<root>/auth/ui-session.key` (created on first use, 0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

COOKIE = "kura_ui_session"
LIFETIME_SECONDS = 12 * 3600
KEY_BYTES = 32


@dataclass(frozen=True)
class Session:
    user: str | None
    nonce: str
    expires: int
    fingerprint: str | None = None

    @classmethod
    def start(cls, user: str | None = None, fingerprint: str | None = None) -> "Session":
        """A new session (a new nonce: signing in never keeps a nonce someone else may know)."""
        return cls(user, secrets.token_urlsafe(16), int(time.time()) + LIFETIME_SECONDS, fingerprint)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signs and checks session cookies and CSRF tokens with the UI's key."""

    def __init__(self, config: Config):
        self.config = config
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_key(self.config)
        return self._key

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self.key, purpose + b"\0" + data, hashlib.sha256).digest()

    def encode(self, session: Session) -> str:
        payload = _b64(json.dumps([session.user, session.nonce, session.expires, session.fingerprint]).encode())
        return f"{payload}.{_b64(self._mac(b'session', payload.encode()))}"

    def decode(self, value: str | None) -> Session | None:
        """The session a cookie holds; None when it is missing, forged, malformed or expired."""
        if not value or value.count(".") != 1 or len(value) > 4096:
            return None
        payload, mac = value.split(".")
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(b"session", payload.encode())):
                return None
            user, nonce, expires, fingerprint = json.loads(_unb64(payload))
        except (ValueError, TypeError, binascii.Error):
            return None
        if not (isinstance(user, (str, type(None))) and isinstance(nonce, str) and isinstance(expires, int)
                and isinstance(fingerprint, (str, type(None)))) or expires <= time.time():
            return None
        return Session(user, nonce, expires, fingerprint)

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.nonce.encode()))

    def csrf_ok(self, session: Session, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.csrf_token(session).encode())


def load_key(config: Config) -> bytes:
    auth = config.auth
    root = Path(config.root)
    if auth.mode == "token" and auth.external is None:
        key_path, _ = auth.key_paths(root)
        return hmac.new(b"kura web UI sessions", key_path.read_bytes(), hashlib.sha256).digest()
    path = root / "auth" / "ui-session.key"
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    return _create_key(path)


def _create_key(path: Path) -> bytes:
    """A new random key at `path`; when another process made one first, theirs (os.link never
    replaces a file, so every process ends up with the same key)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise OSError(f"{path}: not a web UI session key ({len(key)} bytes; remove it to make a new one)")
    return key
