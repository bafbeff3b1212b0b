"""Artifact directories: model file(s), tokenizer, manifest.json, report.json — written atomically.

Every backend writes the same manifest, so `qgraph eval` / `qgraph bench` open any artifact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from qgraph.errors import QGraphError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


EXPORT_MANIFEST = "qgraph_manifest.json"  # marks a checkpoint folder `qgraph export-weights` wrote (replaceable)


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse an output path that cannot become an artifact: never overwrite a user's files, fail before a long compile."""
    out = Path(out_dir).resolve()
    fix = "choose a new -o OUT_DIR (an existing artifact directory is replaced)"
    if out.exists() and not out.is_dir():
        raise QGraphError(f"output {str(out)!r} is a file, not a directory", fix)
    try:
        foreign = out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in (MANIFEST, EXPORT_MANIFEST))
    except OSError as exc:
        raise QGraphError(f"output {str(out)!r} cannot be read ({exc.strerror})", fix) from None
    if foreign:
        raise QGraphError(f"output {str(out)!r} exists and is not a qgraph artifact", fix)
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise QGraphError(f"output {str(out)!r} cannot be created: {str(parent)!r} is a file, not a directory",
                          "choose -o OUT_DIR inside a directory")
    try:  # a real write: permission bits say nothing to root, nor about read-only or special filesystems
        os.rmdir(tempfile.mkdtemp(prefix=".qgraph-write-check.", dir=parent))
    except OSError as exc:
        raise QGraphError(f"output {str(out)!r} cannot be created: directory {str(parent)!r} is not writable "
                          f"({exc.strerror})", "choose -o OUT_DIR in a directory you can write to") from None
    return out


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C while directories are created, renamed or removed, then deliver it.

    An interrupt in the middle of those steps would leave a temporary sibling or lose the old artifact.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda *frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])


def write_atomically(out_dir: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory, then move it to out_dir: never a half-written artifact.

    On any error or Ctrl-C the temporary directory is removed and an artifact already at out_dir
    is left as it was.
    """
    out = check_output_dir(out_dir)
    tmp: Path | None = None
    try:
        with _sigint_held():  # a Ctrl-C held here arrives inside the try, so the new directory is removed
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary directory
        fill(tmp)
    except BaseException as exc:
        if tmp is not None:
            with _sigint_held():
                shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (tmp is None or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
            raise QGraphError(f"cannot write the artifact {str(out)!r}: {exc.strerror}",
                              "free disk space, or choose -o OUT_DIR in a directory you can write to") from None
        raise
    with _sigint_held():
        _replace(tmp, out)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; an existing out is swapped aside first and put back if the move fails."""
    if not out.exists():
        try:
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    try:
        os.replace(out, old / "a")
        os.replace(tmp, out)
    except BaseException:
        if (old / "a").exists() and not out.exists():
            os.replace(old / "a", out)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (old / "a").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
