"""Where the shared test material lives (../shared beside the repository, as in CI)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KURA_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "images"
PEER_REGISTRY_SCRIPT = SHARED / "tools" / "peer-registry.sh"


def require_shared() -> None:
    # Never skip: CI lays shared/ beside the clone, so its absence is a broken set-up.
    if not IMAGES.is_dir():
        raise RuntimeError(f"test images not found at {IMAGES}; set KURA_SHARED to the shared/ folder")
