"""What the web app may read from disk: uploads and typed paths (no gradio here; `handlers.py` calls it).

A public app gets paths typed by strangers, so the app (not the command line, which runs on the user's own
machine and stays unrestricted) reads a typed model or dataset path only inside allowed folders:

- the model cache (`$QUAILORA_CACHE`, where the embedded model is converted),
- this session's upload folder (uploads are copied there, see `store_upload`),
- the folders listed in `QUAILORA_ALLOWED_PATHS` (os.pathsep-separated), for local use.

Names that are not paths pass through: `embedded`, `embedded:<name>` and hub ids (`org/name`, `org/name:config`).
A path is compared after resolving `~`, `..` and symlinks, so no spelling of it escapes the allowed folders.

Uploads: only the formats the data reader knows (`ACCEPTED_SUFFIXES`, optionally .gz/.bz2/.xz compressed, not
parquet), at most `QUAILORA_MAX_UPLOAD_MB` megabytes (default 100), copied into a per-session folder under
`upload_root()` named by a hash of the browser's owner key. `remove_session_uploads` deletes it when the session
ends, `sweep_uploads` deletes folders idle for `QUAILORA_UPLOAD_TTL` seconds, and the whole root goes at exit.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from quailora_app.errors import UserError
from quailora_app.runs import write_atomic
from quailora_app.sources.data import COMPRESSION_SUFFIXES, FORMAT_SUFFIXES, HUB_ID, format_of
from quailora_app.sources.models import cache_dir
from quailora_app.units import MIB, format_bytes

ACCEPTED_SUFFIXES = FORMAT_SUFFIXES  # what the data reader takes
COMPRESSED_SUFFIXES = COMPRESSION_SUFFIXES
#: what the browser's file picker offers (it matches the last suffix only; `check_upload_name` is stricter)
PICKER_TYPES = [*ACCEPTED_SUFFIXES, *COMPRESSED_SUFFIXES]
DEFAULT_MAX_UPLOAD_MB = 100
DEFAULT_UPLOAD_TTL_S = 6 * 3600

_SAFE_NAME = re.compile(r"[^\w.-]+")


# ------------------------------------------------------------------------------------------------ limits
def max_upload_bytes() -> int:
    """QUAILORA_MAX_UPLOAD_MB (default 100) in bytes."""
    raw = os.environ.get("QUAILORA_MAX_UPLOAD_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MAX_UPLOAD_MB
    except ValueError:
        mb = DEFAULT_MAX_UPLOAD_MB
    return int(max(mb, 0) * MIB)


def check_upload_name(name: str) -> str:
    """The file's format suffix (e.g. '.csv.gz'), or a UserError naming the accepted ones."""
    fmt, ext, compression, written = format_of(name)
    if fmt is None:
        raise UserError(f"uploads must be {', '.join(ACCEPTED_SUFFIXES)} (text formats optionally .gz/.bz2/.xz "
                        f"compressed); got {(written or 'no extension')[:40]}")
    return ext + (compression or "")


def check_upload(path: str | os.PathLike) -> Path:
    """An uploaded file with an accepted name, not empty and within the size limit; else a UserError."""
    src = Path(str(path))
    check_upload_name(src.name)
    try:
        size = src.stat().st_size
        is_file = src.is_file()
    except (OSError, ValueError):
        raise UserError("the uploaded file could not be read; upload it again") from None
    if not is_file:
        raise UserError("the upload is not a file; upload it again")
    if size == 0:
        raise UserError(f"the uploaded file {src.name[:80]} is empty")
    limit = max_upload_bytes()
    if size > limit:
        raise UserError(f"the uploaded file is {format_bytes(size)}; this app accepts at most {format_bytes(limit)} "
                        "(QUAILORA_MAX_UPLOAD_MB)")
    return src


# ------------------------------------------------------------------------------------------------ upload folders
def upload_root() -> Path:
    """QUAILORA_UPLOADS, else one folder per process in the system temp dir (removed at exit)."""
    if os.environ.get("QUAILORA_UPLOADS"):
        return Path(os.environ["QUAILORA_UPLOADS"]).expanduser()
    return Path(tempfile.gettempdir()) / f"quailora-uploads-{os.getpid()}"


def owner_tag(owner: str) -> str:
    """A stable, path-safe name for an owner key (the key itself never reaches the disk)."""
    return hashlib.sha256(str(owner).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def session_upload_dir(owner: str) -> Path:
    return upload_root() / owner_tag(owner)


def store_upload(path: str | os.PathLike, owner: str, *, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Copy an uploaded file into the owner's session folder; returns the copy's path.

    `sources`: folders the upload may come from (the web framework's upload cache); the session folder itself
    is always allowed, so a file already stored is returned as is."""
    if not owner:
        raise UserError("an upload needs a session; reload the page")
    src = check_upload(path)
    session = session_upload_dir(owner)
    resolved = src.resolve()
    if _inside(resolved, [session]):
        return resolved
    roots = [Path(s) for s in sources]
    if roots and not _inside(resolved, roots):
        raise UserError("the upload is not in the upload folder; upload the file again")
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    name = _SAFE_NAME.sub("_", src.name)[-120:] or "upload.txt"
    dest = session / digest / name
    if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
        write_atomic(dest, lambda tmp: shutil.copyfile(resolved, tmp))
    os.utime(session)  # the session is alive: `sweep_uploads` goes by this time
    return dest


def remove_session_uploads(owner: str) -> bool:
    """Delete the owner's upload folder; True if there was one."""
    folder = session_upload_dir(owner)
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        return True
    return False


def sweep_uploads(keep: Iterable[str] = (), max_age_s: float | None = None) -> int:
    """Delete session folders idle for longer than `max_age_s` (QUAILORA_UPLOAD_TTL, default 6 h), except those
    of the owners in `keep` (for instance the owners of queued or running jobs). Returns how many went."""
    if max_age_s is None:
        try:
            max_age_s = float(os.environ.get("QUAILORA_UPLOAD_TTL") or DEFAULT_UPLOAD_TTL_S)
        except ValueError:
            max_age_s = DEFAULT_UPLOAD_TTL_S
    root = upload_root()
    if not root.is_dir():
        return 0
    kept = {owner_tag(o) for o in keep}
    now, removed = time.time(), 0
    for folder in root.iterdir():
        try:
            idle = now - folder.stat().st_mtime
        except OSError:
            continue
        if folder.is_dir() and folder.name not in kept and idle > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _remove_root_at_exit() -> None:
    if not os.environ.get("QUAILORA_UPLOADS"):  # an operator-chosen folder is theirs to keep
        shutil.rmtree(upload_root(), ignore_errors=True)


atexit.register(_remove_root_at_exit)


# ------------------------------------------------------------------------------------------------ typed paths
def env_allowed_paths() -> list[Path]:
    """QUAILORA_ALLOWED_PATHS: folders (os.pathsep-separated) the app may read typed paths from."""
    raw = os.environ.get("QUAILORA_ALLOWED_PATHS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def allowed_roots(owner: str | None = None) -> list[Path]:
    """The folders a typed path may point into, for this owner's session."""
    roots = [cache_dir()]
    if owner:
        roots.append(session_upload_dir(owner))
    return roots + env_allowed_paths()


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    for root in roots:
        try:
            if path.is_relative_to(root.expanduser().resolve()):
                return True
        except (OSError, ValueError, RuntimeError):
            continue
    return False


def is_hub_id(name: str) -> bool:
    """`org/name` or `org/name:config` (or a bare legacy id) that is not also a path on this disk."""
    if not HUB_ID.match(name) or any(part in (".", "..") for part in re.split(r"[/:]", name)):
        return False
    try:
        return not Path(name).exists()
    except (OSError, ValueError):
        return False


def check_user_path(text: str | None, kind: str = "dataset", owner: str | None = None) -> str:
    """The name to hand to the engine for what the user typed in the model or dataset box.

    Embedded names and hub ids come back unchanged; a path comes back resolved if it lies inside
    `allowed_roots(owner)`, else a UserError in one line (the same whether or not the path exists)."""
    name = str(text or "").strip()
    if kind == "model" and name in ("", "embedded"):
        return "embedded"
    if kind != "model" and (name in ("", "embedded") or name.startswith("embedded:")):
        return name or "embedded"
    if is_hub_id(name):
        return name
    shown = name if len(name) <= 80 else name[:77] + "..."
    shown = shown.encode("unicode_escape").decode("ascii")
    refusal = UserError(
        f"{kind} path '{shown}' is outside the folders this app reads (the model cache, this session's uploads"
        f"{', QUAILORA_ALLOWED_PATHS' if env_allowed_paths() else ''}): upload the file instead, or start the app "
        "with QUAILORA_ALLOWED_PATHS=<folder> on your own machine")
    try:
        resolved = Path(name).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        raise refusal from None
    if not _inside(resolved, allowed_roots(owner)):
        raise refusal
    return str(resolved)
