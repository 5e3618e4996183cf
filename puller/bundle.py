"""An OCI runtime bundle from a stored image: `rootfs/` from its layers, `config.json` from
its config, so that `runc run -b BUNDLE NAME` runs the image's command."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ocispec import mediatypes as mt
from ocispec.digest import Digest, new_hasher

from .layers import DEFAULT_MAX_LAYER_BYTES, DecompressedLayer
from .limits import CONFIG_LIMIT, MANIFEST_LIMIT
from .store import Store
from .unpack import Root, UnpackOptions, UnsafeLayer, apply_layer

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BundleError(ValueError):
    pass


def verify_blob(store: Store, digest: Digest) -> None:
    """Re-hash a stored blob: nothing is unpacked that does not match its digest now."""
    hasher = new_hasher(digest.algorithm)
    with open(store.blob_path(digest), "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    if hasher.hexdigest() != digest.encoded:
        raise BundleError(f"stored blob {digest} is corrupt; pull the image again")


def check_config(config: dict) -> None:
    """The image config fields a bundle is made from have the types the image-spec gives them."""
    def fail(field: str, kind: str):
        raise BundleError(f"the image config's {field} is not {kind}")

    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    rootfs = config.get("rootfs")
    if rootfs is not None and not (isinstance(rootfs, dict) and strings(rootfs.get("diff_ids") or [])):
        fail("rootfs", "an object with a list of diff_ids")
    runtime = config.get("config")
    if runtime is None:
        return
    if not isinstance(runtime, dict):
        fail("config", "an object")
    for field in ("Entrypoint", "Cmd", "Env"):
        if runtime.get(field) is not None and not strings(runtime[field]):
            fail(f"config.{field}", "a list of strings")
    for field in ("User", "WorkingDir"):
        if runtime.get(field) is not None and not isinstance(runtime[field], str):
            fail(f"config.{field}", "a string")
    labels = runtime.get("Labels")
    if labels is not None and not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        fail("config.Labels", "an object of strings")


def unpack_image(store: Store, manifest_digest: Digest, bundle: Path, *, allow_devices: bool = False,
                 max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> UnpackOptions:
    rootfs = bundle / "rootfs"
    config, options = unpack_layers(store, manifest_digest, rootfs, allow_devices=allow_devices,
                                    max_layer_bytes=max_layer_bytes)
    spec = runtime_config(config.get("config") or {}, rootfs)
    _write(bundle / "config.json", json.dumps(spec, indent=2).encode())
    return options


def read_image_config(store: Store, manifest_digest: Digest) -> tuple[dict, dict]:
    """A stored image's (verified) manifest and config, the config's fields type-checked."""
    verify_blob(store, manifest_digest)
    manifest = store.read_json(manifest_digest, MANIFEST_LIMIT, "manifest")
    if manifest.get("mediaType") in mt.INDEXES or "manifests" in manifest:
        raise BundleError("that reference is an index; pull one platform to unpack it")
    config_digest = Digest.parse(manifest["config"]["digest"])
    verify_blob(store, config_digest)
    config = store.read_json(config_digest, CONFIG_LIMIT, "image config")
    check_config(config)
    return manifest, config


def unpack_layers(store: Store, manifest_digest: Digest, rootfs: Path, *, allow_devices: bool = False,
                  max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> tuple[dict, UnpackOptions]:
    """Apply a stored image's layers, each verified, into `rootfs` (absent or empty); returns
    the image config and the unpack options (with their notes)."""
    manifest, config = read_image_config(store, manifest_digest)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if rootfs.exists() and any(rootfs.iterdir()):
        raise BundleError(f"{rootfs} already exists and is not empty")
    options = UnpackOptions(allow_devices=allow_devices)
    root = Root(str(rootfs))
    try:
        for index, layer in enumerate(manifest.get("layers", [])):
            digest = Digest.parse(layer["digest"])
            verify_blob(store, digest)
            with open(store.blob_path(digest), "rb") as raw, \
                    DecompressedLayer(raw, layer["mediaType"], max_layer_bytes, read_ahead=True) as stream:
                try:
                    apply_layer(root, stream, options)
                except UnsafeLayer as exc:
                    raise UnsafeLayer(f"layer {digest}: {exc}") from None
            if index < len(diff_ids) and diff_ids[index] != stream.diff_id:
                raise BundleError(f"layer {digest} does not match the diff_id {diff_ids[index]} in its config")
    finally:
        root.close()
    return config, options


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_inside(rootfs: Path, relative: str) -> str:
    """Read a file of the image (e.g. etc/passwd) without following links out of the rootfs."""
    root = Root(str(rootfs))
    try:
        parts = relative.split("/")
        parent = root.walk(parts[:-1], create=False, entry=relative)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
        finally:
            os.close(parent)
        with os.fdopen(fd, "r", errors="replace") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""  # a FIFO or device named etc/passwd would block or worse
            return f.read(1 << 20)
    except (FileNotFoundError, NotADirectoryError, OSError, UnsafeLayer):
        return ""
    finally:
        root.close()


MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class ExecUser:
    """A user spec resolved as Docker (runc's libcontainer/user) resolves it."""
    uid: int
    gid: int
    additional_gids: tuple[int, ...]  # the /etc/group entries listing the user, when no group was named
    home: str


class UnknownUser(BundleError):
    def __init__(self, kind: str, name: str):
        self.kind, self.name, self.file = kind, name, "passwd" if kind == "user" else "group"
        super().__init__(f"unable to find {kind} {name}: no matching entries in the image's /etc/{self.file}")


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def _table(text: str, fields: int) -> list[list[str]]:
    """The lines of /etc/passwd (7 fields) or /etc/group (4) with at least the ids, numeric."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) >= (4 if fields == 7 else 3) and _number(parts[2]) is not None:
            rows.append(parts + [""] * (fields - len(parts)))
    return rows


def _checked(number: int, kind: str) -> int:
    if number > MAX_ID:
        raise BundleError(f"{kind} {number} is out of range")
    return number


def exec_user(spec: str, rootfs: Path) -> ExecUser:
    """`name`, `uid`, `name:group`, `uid:gid` (or empty: root) through the image's /etc/passwd and
    /etc/group: the first matching line wins; a number not in the files stands for itself; without
    a group, the additional groups are those whose member list names the user."""
    name, _, group = spec.partition(":")
    uid_arg = _number(name) if name else 0
    passwd = _table(_read_inside(rootfs, "etc/passwd"), 7)
    entry = next((p for p in passwd if (int(p[2]) == uid_arg if uid_arg is not None else p[0] == name)), None)
    if entry is not None:
        username, uid, home = entry[0], int(entry[2]), entry[5] or "/"
        gid = _number(entry[3]) or 0
    elif uid_arg is None:
        raise UnknownUser("user", name)
    else:
        username, uid, gid, home = None, _checked(uid_arg, "uid"), 0, "/"
    additional: tuple[int, ...] = ()
    if group or username is not None:
        groups = _table(_read_inside(rootfs, "etc/group"), 4)
        if group:
            gid_arg = _number(group)
            found = next((g for g in groups if (int(g[2]) == gid_arg if gid_arg is not None else g[0] == group)),
                         None)
            if found is not None:
                gid = int(found[2])
            elif gid_arg is not None:
                gid = _checked(gid_arg, "gid")
            else:
                raise UnknownUser("group", group)
        else:
            additional = tuple(int(g[2]) for g in groups if username in g[3].split(","))
    return ExecUser(uid, gid, additional, home)


def resolve_user(user: str, rootfs: Path) -> tuple[int, int, list[int]]:
    """The image config's User -> (uid, gid, []) for `kura unpack`'s config.json, which names no
    additional groups."""
    if not user:
        return 0, 0, []
    try:
        found = exec_user(user, rootfs)
    except UnknownUser as exc:
        raise BundleError(f"{exc.kind} {exc.name!r} of the image config is not in the image's /etc/{exc.file}") \
            from None
    return found.uid, found.gid, []


CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")  # runc's (and Docker's) default set


def runtime_config(image: dict, rootfs: Path) -> dict:
    """The OCI runtime-spec config for an image config (as Docker/containerd derive it)."""
    args = list(image.get("Entrypoint") or []) + list(image.get("Cmd") or [])
    if not args:
        raise BundleError("the image has neither Entrypoint nor Cmd: nothing to run")
    env = list(image.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    uid, gid, extra = resolve_user(image.get("User") or "", rootfs)
    user = {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})}
    return oci_config(args, env, image.get("WorkingDir") or "/", user, image.get("Labels") or {})


def oci_config(args: list[str], env: list[str], cwd: str, user: dict, labels: dict) -> dict:
    """The runtime config around a process: runc's default capabilities, mounts and namespaces."""
    capabilities = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: capabilities for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "kura",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
        "annotations": dict(labels),
    }
