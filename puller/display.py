"""What the client shows a person: sizes, command lines, and `kura inspect`'s text. Everything
here may come from a registry or an image, so it goes through `printable()` on its way out."""

from __future__ import annotations

import shlex

from .errors import printable

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_size(size: int) -> str:
    """Decimal units and three significant digits, as docker shows them (77.3 MB)."""
    value = float(size)
    for unit in _UNITS[:-1]:
        if float(f"{value:.3g}") < 1000:
            break
        value /= 1000
    else:
        unit = _UNITS[-1]
        if float(f"{value:.3g}") >= 1000:  # beyond the last unit: whole ones, not "1e+03 PB"
            return f"{value:.0f} {unit}"
    return f"{value:.3g} {unit}"


def command_line(value) -> str:
    """An image's Entrypoint or Cmd as one would type it in a shell."""
    if isinstance(value, list):
        return shlex.join(str(part) for part in value)
    return str(value)


def inspect_lines(info: dict) -> list[str]:
    """`kura inspect`'s text: one `Label:     value` per line, lists continued beneath."""
    lines: list[str] = []

    def show(label: str, values) -> None:
        for n, value in enumerate(values):
            lines.append(f"{(label + ':') if n == 0 else '':11} {printable(str(value))}")

    show("Reference", [info["reference"]])
    show("Source", ["local store" if info["source"] == "local" else f"registry {info['registry']}"])
    if "index" in info:
        show("Index", [info["index"]])
    show("Digest", [info["digest"]])
    show("Media type", [info["mediaType"]])
    if "platforms" in info:
        show("Platforms", [", ".join(info["platforms"])])
    for label, key in (("Platform", "platform"), ("Created", "created")):
        if info.get(key) is not None:
            show(label, [info[key]])
    for label, key in (("Entrypoint", "entrypoint"), ("Cmd", "cmd")):
        if info.get(key) is not None:
            show(label, [command_line(info[key])])
    if info.get("workingDir"):
        show("WorkingDir", [info["workingDir"]])
    show("Env", info.get("env") or [])
    if info.get("exposedPorts"):
        show("Ports", [", ".join(info["exposedPorts"])])
    show("Labels", [f"{key}={value}" for key, value in sorted((info.get("labels") or {}).items())])
    for layer in info.get("layers", []):
        show("Layer", [f"{layer['digest']} ({human_size(layer['size'])})"])
    return lines
