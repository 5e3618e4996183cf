"""Platforms (`os/arch[/variant]`): the host's, parsing, and choosing from an image index."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

_MACHINES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}; expected os/arch[/variant], e.g. linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        arch, variant = _MACHINES.get(_platform.machine().lower(), (_platform.machine().lower(), None))
        return cls("linux", arch, variant)

    @classmethod
    def of(cls, descriptor: dict) -> "Platform | None":
        p = descriptor.get("platform")
        if not isinstance(p, dict) or not p.get("os") or not p.get("architecture"):
            return None
        return cls(p["os"], p["architecture"], p.get("variant") or None)

    @classmethod
    def of_config(cls, config) -> "Platform | None":
        """What an image config says it runs on; None when it does not say (in strings)."""
        if not isinstance(config, dict):
            return None
        os_name, architecture, variant = config.get("os"), config.get("architecture"), config.get("variant")
        if not (isinstance(os_name, str) and os_name and isinstance(architecture, str) and architecture):
            return None
        return cls(os_name, architecture, variant if isinstance(variant, str) and variant else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def well_formed(descriptor: dict) -> bool:
    """The descriptor's platform, if any, has the string fields the image-spec gives it."""
    p = descriptor.get("platform") or {}
    return all(isinstance(p.get(k, ""), str) for k in ("os", "architecture", "variant", "os.version"))


def is_attestation(descriptor: dict) -> bool:
    p = descriptor.get("platform") or {}
    return (ATTESTATION_ANNOTATION in (descriptor.get("annotations") or {})
            or p.get("os") == "unknown" or p.get("architecture") == "unknown")


def runnable_entries(index: dict) -> list[dict]:
    return [d for d in index.get("manifests", []) if not is_attestation(d)]


def matching(index: dict, wanted: Platform) -> list[dict]:
    """The index's entries for `wanted`, the best first (an exact variant before none)."""
    found = [d for d in runnable_entries(index) if (p := Platform.of(d)) and fits(p, wanted)]
    found.sort(key=lambda d: Platform.of(d) != wanted)  # spelled as asked first
    return found


def platforms_in(index: dict) -> set[str]:
    return {str(p) for d in runnable_entries(index) if (p := Platform.of(d))}


def choose(index: dict, wanted: Platform) -> dict:
    """The index entry for `wanted`; the error lists the platforms that exist."""
    found = matching(index, wanted)
    if found:
        return found[0]
    available = sorted(platforms_in(index))
    raise LookupError(f"no image for platform {wanted}; available: {', '.join(available) or 'none'}")


def normalise(p: Platform) -> Platform:
    """The canonical spelling, as containerd normalises: architecture aliases resolved, arm64/v8
    written without its variant, arm without one is arm/v7; amd64 has none (its v2/v3
    micro-architecture levels are not told apart here)."""
    arch, variant = p.architecture.lower(), (p.variant or "").lower() or None
    if arch == "i386":
        arch, variant = "386", None
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch, variant = "amd64", None
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        variant = None if variant in ("8", "v8", "v8.0") else "v9" if variant in ("9", "9.0", "v9.0") else variant
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        variant = "v7" if variant in (None, "7") else f"v{variant}" if variant in ("5", "6", "8") else variant
    os_name = p.os.lower()
    return Platform("darwin" if os_name == "macos" else os_name, arch, variant)


def fits(offered: Platform, wanted: Platform) -> bool:
    """Whether `offered` (an index entry's platform, an image config's) is what `--platform
    wanted` asks for: the one comparison pull, copy and inspect make, on normalised spellings."""
    return normalise(offered) == normalise(wanted)
