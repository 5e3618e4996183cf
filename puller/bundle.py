"""An OCI runtime bundle from a stored image: `rootfs/` from its layers, `config.json` from
its config, so that `runc run -b BUNDLE NAME` runs the image's command."""

from __future__ import annotations

import json
import os
import stat
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


def _lookup(table: str, name: str) -> tuple[int, int] | None:
    for line in table.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name and fields[2].isdigit():
            return int(fields[2]), int(fields[3]) if fields[3].isdigit() else 0
    return None


def resolve_user(user: str, rootfs: Path) -> tuple[int, int, list[int]]:
    """`uid`, `name`, `uid:gid`, `name:group` -> (uid, gid, additional gids) via the image's files."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _read_inside(rootfs, "etc/passwd")
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in (_lookup_by_uid(passwd, uid),) if e), None)
        gid = entry if entry is not None else 0
    else:
        found = _lookup(passwd, name)
        if found is None:
            raise BundleError(f"user {name!r} of the image config is not in the image's /etc/passwd")
        uid, gid = found
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = _lookup(_read_inside(rootfs, "etc/group"), group)
            if found is None:
                raise BundleError(f"group {group!r} of the image config is not in the image's /etc/group")
            gid = found[0]
    return uid, gid, []


def _lookup_by_uid(passwd: str, uid: int) -> int | None:
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2] == str(uid) and fields[3].isdigit():
            return int(fields[3])
    return None


def runtime_config(image: dict, rootfs: Path) -> dict:
    """The OCI runtime-spec config for an image config (as Docker/containerd derive it)."""
    args = list(image.get("Entrypoint") or []) + list(image.get("Cmd") or [])
    if not args:
        raise BundleError("the image has neither Entrypoint nor Cmd: nothing to run")
    env = list(image.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    uid, gid, extra = resolve_user(image.get("User") or "", rootfs)
    capabilities = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})},
            "args": args,
            "env": env,
            "cwd": image.get("WorkingDir") or "/",
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
        "annotations": {k: v for k, v in (image.get("Labels") or {}).items()},
    }
