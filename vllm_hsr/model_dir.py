"""Model directories built once: a marker names what was built, and a build lands by an atomic rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_built(out: Path, marker_file: str, marker: dict[str, Any], required: Sequence[str]) -> bool:
    """True if out holds a complete build whose marker equals `marker`."""
    try:
        found = json.loads((out / marker_file).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and all((out / name).is_file() for name in required)


def build_atomically(out: Path, marker_file: str, marker: dict[str, Any], required: Sequence[str],
                     build: Callable[[Path], None], *, force: bool = False, builder: str) -> Path:
    """Run build(tmp) in a temporary sibling of out, write the marker, and rename it into place.

    A directory already holding this marker is returned as it is (unless force); a non-empty directory
    that no builder marked is refused rather than replaced. Concurrent builds are safe: the loser's
    copy is dropped.
    """
    out = Path(out).expanduser().resolve()
    if not force and is_built(out, marker_file, marker, required):
        return out
    if out.exists() and not force and not (out / marker_file).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(f"{out} exists and was not built by {builder}; pass force=True (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        write_json(tmp / marker_file, marker)
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if not force and is_built(out, marker_file, marker, required):  # a concurrent build finished first
            shutil.rmtree(tmp)
            return out
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "model")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
