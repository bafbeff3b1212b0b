"""Artifact directories: model file(s), tokenizer, manifest.json, report.json — written atomically.

Every backend writes the same manifest, so `qgraph eval` / `qgraph bench` open any artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qgraph.errors import QGraphError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse an output path that exists and is not an artifact: never overwrite a user's files."""
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise QGraphError(
            f"output {str(out)!r} exists and is not a qgraph artifact",
            "choose a new -o OUT_DIR (an existing artifact directory is replaced)",
        )
    return out


def write_atomically(out_dir: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory, then move it to out_dir: never a half-written artifact."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary directory
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "a")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an artifact directory, checked for a known format version."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise QGraphError(f"{str(directory)!r} is not a qgraph artifact (no {MANIFEST})",
                          "pass a directory written by `qgraph compile`") from None
    except json.JSONDecodeError as exc:
        raise QGraphError(f"{path}: manifest is not valid JSON ({exc.msg})", "recompile the artifact") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QGraphError(
            f"{path}: artifact format version {manifest.get('format_version')!r} is not {FORMAT_VERSION}",
            "recompile it with this qgraph",
        )
    return manifest


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
