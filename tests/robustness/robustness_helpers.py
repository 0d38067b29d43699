"""Shared pieces of the robustness suite: paths, a pickle payload, file digests.

Every payload here creates a marker file when it runs; each test asserts the marker does
not exist afterwards (nothing ran) and that the files it handed in are unchanged.
"""

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny" / "hiervl_tiny_16.yaml"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creating the marker proves code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder`` (to prove nothing changed)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
