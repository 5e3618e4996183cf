"""Caps on documents Kura reads whole into memory, as other clients have them: a hostile
registry or image could otherwise make any of them as large as it likes."""

MANIFEST_LIMIT = 4 << 20  # distribution's own cap on a pushed manifest; containers/image's MaxManifestBodySize
CONFIG_LIMIT = 4 << 20    # containers/image's MaxConfigBodySize (skopeo, podman, CRI-O); real ones are KBs
