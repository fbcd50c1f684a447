"""Where the files for people (PNGs) go, and the rules that keep them there.

A list file may name `../x.jpg`, `/abs/y.jpg` or a path with many `..`: the PNG of every image
still lies inside `output.png_dir`, two images never share a PNG, and a file the tool did not
write is never replaced or removed. A PNG is the tool's when its text chunks record the
image, the PNG's own path under png_dir and the digest of its pixel data, and all three
still hold (`is_ours`): a copy kept elsewhere in png_dir, a renamed one, or one edited and
saved with its text kept is the user's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import PipelineError, describe_os_error
from .pngencode import encode_png, read_png_record

# Images listed outside the source root (absolute, or climbing out with `..`) are mirrored
# under this folder of png_dir by their absolute path.
OUTSIDE_ROOT = "_outside_root"
PNG_MARKER = "vit-attn"  # tEXt key of every PNG this tool writes: the image it shows
PNG_PLACE = "vit-attn-path"  # the PNG's path relative to png_dir when written
PNG_DIGEST = "vit-attn-sha256"  # the sha256 of its pixel data (IDAT)
SUFFIXES = (".png", ".heads.png")
OWNER_FILE = ".vit-attn-store"  # in png_dir: the store whose PNGs these are
_GLOB_CHARS = frozenset("*?[")


class OutputError(PipelineError, OSError):
    """An output file may not be written where it would go (outside png_dir, not ours, clash)."""


def png_relpath(image_root: str | os.PathLike[str], image_path: str, suffix: str = ".png") -> str:
    """The PNG of one image relative to png_dir: its path under the root, or its absolute path
    under `_outside_root/` when it lies outside the root. Lexically normalised, never `..`.
    A root on object storage is a URL: an image outside it is mirrored under
    `_outside_root/<scheme>/<bucket>/<key>`, the same from any working folder."""
    from .remote import is_url

    if is_url(str(image_root)) or is_url(image_path):
        return _url_png_relpath(str(image_root), image_path) + suffix
    root = os.path.normpath(os.path.abspath(image_root))
    full = os.path.normpath(os.path.join(root, image_path))
    rel = os.path.relpath(full, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        rel = os.path.join(OUTSIDE_ROOT, full.lstrip(os.sep))
    return rel + suffix


def _url_png_relpath(root_url: str, image_path: str) -> str:
    """`png_relpath` for a URL root (or a listed URL), with URL paths, never the local ones."""
    from .remote import is_url

    scheme, _, rest = root_url.partition("://")
    root = posixpath.normpath("/" + rest)
    if is_url(image_path):
        other, _, where = image_path.partition("://")
        full = posixpath.normpath("/" + where)
        if other != scheme:  # another store entirely: outside the root
            return posixpath.join(OUTSIDE_ROOT, other, full.lstrip("/"))
    else:
        full = posixpath.normpath(posixpath.join(root, image_path.lstrip("/")))
    rel = posixpath.relpath(full, root)
    if rel == os.pardir or rel.startswith(os.pardir + "/"):
        return posixpath.join(OUTSIDE_ROOT, scheme, full.lstrip("/"))
    return rel


def png_path(
    png_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    image_path: str,
    suffix: str = ".png",
) -> Path:
    """The absolute PNG path of one image; always inside `png_dir`."""
    base = os.path.normpath(os.path.abspath(png_dir))
    target = os.path.normpath(os.path.join(base, png_relpath(image_root, image_path, suffix)))
    if not _inside(target, base):  # cannot happen by construction; kept as the last word
        raise OutputError(f"PNG for {image_path!r} would leave output.png_dir {base}")
    return Path(target)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def resolved_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether `path` lies in `folder` once every symlink is followed (both may not exist yet)."""
    return _inside(os.path.realpath(path), os.path.realpath(folder))


def check_png_targets(
    png_dir: str | os.PathLike[str],
    image_root: str,
    paths: Iterable[str],
    heads: bool,
    store: Path | str | None = None,
) -> None:
    """Refuse, before anything is written, a run where two images share a PNG, a PNG would
    replace a file that vit-attn did not write, or land in a folder below png_dir that
    another store claimed as its png_dir (`store`: this run's)."""
    seen: dict[Path, str] = {}
    folders: dict[Path, bool] = {}
    base = Path(os.path.normpath(os.path.abspath(png_dir)))
    mine = None if store is None else store_identity(store)
    claimed: dict[Path, str | None] = {}
    suffixes = SUFFIXES if heads else SUFFIXES[:1]
    for image in paths:
        for suffix in suffixes:
            target = png_path(png_dir, image_root, image, suffix)
            if target.parent not in folders:
                folders[target.parent] = resolved_inside(target.parent, png_dir)
                if mine is not None:
                    _check_no_other_claim(target.parent, base, mine, claimed, image)
            if not folders[target.parent]:
                raise OutputError(
                    f"PNG for {image!r}: {target.parent} leads outside output.png_dir {png_dir} "
                    "(a symbolic link?); refusing to write there"
                )
            other = seen.setdefault(target, image)
            if other != image:
                raise OutputError(
                    f"images {other!r} and {image!r} would both write {target}; "
                    "rename one, or list them from one root"
                )
            check_replaceable(target, png_dir)


def _check_no_other_claim(
    folder: Path, base: Path, mine: str, claimed: dict[Path, str | None], image: str
) -> None:
    """Refuse `folder` (below png_dir `base`) when it or a folder between lies in another
    store's png_dir: that store's PNGs would be replaced and called its own."""
    at = folder
    while at != base and base in at.parents:
        if at not in claimed:
            claimed[at] = _claimant(at)
        owner = claimed[at]
        if owner is not None and owner != mine:
            raise OutputError(
                f"PNG for {image!r} would go in {at}, the png_dir of another store, {owner}; "
                "give each store a folder of its own, side by side"
            )
        at = at.parent


def check_replaceable(target: Path, png_dir: str | os.PathLike[str]) -> None:
    """Raise unless `target` is absent or a PNG vit-attn wrote there, unchanged (`is_ours`)."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_file() or not is_ours(target, png_dir):
        raise OutputError(
            f"{target} exists and is not a PNG vit-attn wrote there (or it was changed "
            "since); refusing to replace it (move it away, or choose another output.png_dir)"
        )


def is_ours(path: Path, png_dir: str | os.PathLike[str]) -> bool:
    """Whether `path` is a PNG this tool wrote at this place in `png_dir`, unchanged since.

    Its text records the image, the PNG's path under png_dir and the sha256 of its pixel
    data: a copy elsewhere, a renamed file, or one edited and saved with the text kept is
    the user's, never replaced nor removed. A file cut short inside its pixel data (a crash
    before the disk had it all) is ours when its place matches: it holds no picture. The
    pixel data is hashed as read, not decoded.
    """
    record = read_png_record(path, PNG_DIGEST)
    if record is None or PNG_MARKER not in record.text:
        return False
    if record.text.get(PNG_PLACE) != _place(path, png_dir):
        return False
    return record.digest_matches or record.truncated


def _place(path: str | os.PathLike[str], png_dir: str | os.PathLike[str]) -> str:
    """`path` relative to png_dir, as a PNG records its place."""
    base = os.path.normpath(os.path.abspath(png_dir))
    return os.path.relpath(os.path.normpath(os.path.abspath(path)), base)


def write_png(
    array_u8: np.ndarray, target: Path, png_dir: str | os.PathLike[str], image: str
) -> None:
    """Write one PNG atomically (temp file, then rename) after checking where it lands.

    The folder is resolved (a symlink inside png_dir must not lead out of it) and an existing
    file is replaced only when it is ours.
    """
    # Encoded before any file exists: bad input fails first.
    text = {PNG_MARKER: image, PNG_PLACE: _place(target, png_dir)}
    data = encode_png(array_u8, text, digest_key=PNG_DIGEST)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not resolved_inside(target.parent, png_dir):
        raise OutputError(
            f"PNG for {image!r}: {target.parent} leads outside output.png_dir {png_dir} "
            "(a symbolic link?); refusing to write there"
        )
    check_replaceable(target, png_dir)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}{_TEMP_END}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            # a full disk names no file: this PNG is where it happened
            raise OSError(exc.errno, exc.strerror, str(target)) from None
        raise


def is_per_image_os_error(exc: OSError) -> bool:
    """OS errors that concern one image's PNG only (its name), not the disk or the folder."""
    return exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL)


def listed_folder(source: str) -> Path | None:
    """The folder a folder or glob source scans (outputs there would be listed next time);
    None for a list file, whose folder is not scanned."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path
    if path.is_file():
        return None
    at = next((i for i, p in enumerate(path.parts) if any(c in p for c in _GLOB_CHARS)), None)
    if at is None:
        return None
    return Path(*path.parts[:at]) if at else Path(".")


def check_output_locations(source: str, store: Path | str, png_dir: Path | None) -> None:
    """Refuse a store or png_dir inside the folder being listed: its files would become inputs
    (PNGs are images) or be replaced by a user's images. Sources and stores behind URLs are
    never the same folder as a local output."""
    from .remote import is_url

    if png_dir is not None and os.path.exists(png_dir) and not os.path.isdir(png_dir):
        raise OutputError(f"output.png_dir {png_dir} is a file; give a folder for the PNGs")
    blocked = None if png_dir is None else file_in_the_way(png_dir)
    if blocked is not None:
        raise OutputError(f"output.png_dir {png_dir}: {blocked} is a file, not a folder")
    if png_dir is not None:
        inside = _store_around(png_dir)
        if inside is not None:
            raise OutputError(
                f"output.png_dir {png_dir} lies in the store {inside}; give the PNGs a folder "
                "of their own (a store's rerun with --overwrite would delete them)"
            )
    if png_dir is not None and not is_url(store):
        a, b = os.path.realpath(png_dir), os.path.realpath(store)
        if _inside(a, b) or _inside(b, a):
            raise OutputError(
                f"output.png_dir {png_dir} and output.store {store} overlap; give each its own "
                "folder (PNGs inside a store are not part of it, and a store inside png_dir "
                "could be replaced by PNGs)"
            )
    folder = None if is_url(source) else listed_folder(source)
    if folder is None:
        return
    for key, path in (("output.store", store), ("output.png_dir", png_dir)):
        if path is not None and not is_url(path) and resolved_inside(Path(path), folder):
            raise OutputError(
                f"{key} {path} lies inside the data folder {folder} that data.source lists; "
                "put outputs outside it"
            )


def _store_around(path: str | os.PathLike[str]) -> Path | None:
    """The vit-attn store that `path` is, or lies in (links resolved), or None."""
    from .store import is_store

    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        if (folder / "zarr.json").is_file() and is_store(folder):
            return folder
    return None


def file_in_the_way(path: str | os.PathLike[str]) -> Path | None:
    """The nearest existing parent of `path` when it is not a folder (so `path` cannot be
    made), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def store_identity(store: Path | str) -> str:
    """How a png_dir names its store: the URL, or the local path fully resolved."""
    from .remote import is_url

    return str(store) if is_url(store) else os.path.realpath(store)


def png_dir_owner(png_dir: Path | str) -> str | None:
    """The store a png_dir's PNGs belong to (its OWNER_FILE), or None when unclaimed."""
    marker = Path(png_dir) / OWNER_FILE
    for _ in range(10):
        try:
            text = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(f"output.png_dir {png_dir}: cannot read {marker}: {exc}") from None
        if text:
            return text
        time.sleep(0.1)  # created and not yet written (the claim without hard links)
    raise OutputError(
        f"output.png_dir {png_dir}: its owner record {marker} is empty (a run stopped while "
        "claiming the folder?); delete it if no other store writes PNGs there"
    )


def check_png_owner(png_dir: Path | str, store: Path | str) -> None:
    """Refuse a png_dir that holds another store's PNGs: the two runs would replace each
    other's pictures under the same names, and each would call them its own on resume."""
    owner = png_dir_owner(png_dir)
    mine = store_identity(store)
    if owner is not None and owner != mine:
        raise OutputError(
            f"output.png_dir {png_dir} holds the PNGs of another store, {owner}; give each "
            f"store its own png_dir (or delete {Path(png_dir) / OWNER_FILE} if that store "
            "is gone or moved here)"
        )
    # Inside another store's png_dir, the two would write under one tree: that store's
    # names could land here, and a new store there clears its tree of vit-attn's PNGs.
    for parent in Path(os.path.realpath(png_dir)).parents:
        other = _claimant(parent)
        if other is not None and other != mine:
            raise OutputError(
                f"output.png_dir {png_dir} lies inside {parent}, the png_dir of another "
                f"store, {other}; give each store a folder of its own, side by side"
            )


def _claimant(folder: Path) -> str | None:
    """The store that claimed `folder` as its png_dir, if any (without creating anything)."""
    return png_dir_owner(folder) if (folder / OWNER_FILE).is_file() else None


def claim_png_dir(png_dir: Path | str, store: Path | str) -> None:
    """Record in png_dir which store its PNGs belong to (once; see check_png_owner).

    The record is created exclusively (a hard link of a complete temporary file, which fails
    if the name exists): of two runs that both found png_dir unclaimed, one wins and the
    other is refused here, before either writes a PNG.
    """
    folder = Path(png_dir)
    if (folder / OWNER_FILE).is_file():  # claimed already: by this store (a resume) or not
        check_png_owner(png_dir, store)
        return
    try:
        _claim(folder, store_identity(store))
    except OSError as exc:
        raise OutputError(
            f"output.png_dir {png_dir} cannot be written ({describe_os_error(exc)}); fix its "
            "permissions or free space, or choose another output.png_dir"
        ) from None
    check_png_owner(png_dir, store)


def _claim(folder: Path, identity: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{OWNER_FILE}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(identity + "\n", encoding="utf-8")
        try:
            os.link(tmp, folder / OWNER_FILE)
        except FileExistsError:
            pass  # claimed meanwhile: by this store, or by another (refused by the caller)
        except OSError:  # a file system without hard links: an exclusive create instead
            with contextlib.suppress(FileExistsError):
                fd = os.open(folder / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(identity + "\n")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# `write_png`'s temporary name: ".<name>.<pid>.<thread>.vit-attn.tmp" beside the PNG it
# becomes: a name no other program picks by chance.
_TEMP_END = ".vit-attn.tmp"
_TEMP_PNG = re.compile(r"\..+\.png\.\d+\.\d+" + re.escape(_TEMP_END))


def _own_tree(
    png_dir: Path | str, inputs: Iterable[str | os.PathLike[str]]
) -> Iterator[tuple[str, list[str]]]:
    """(folder, names of PNGs and PNG temporary files) of png_dir's tree that this store's
    PNGs may occupy: without a folder inside that holds its own owner file (another store's
    png_dir, whose run may be writing), symlinked folders (not followed), and `inputs` (the
    run's images, or folders of them)."""
    keep = {os.path.realpath(p) for p in inputs}
    for dirpath, dirnames, filenames in os.walk(png_dir):
        dirnames[:] = [
            d
            for d in dirnames
            if not (Path(dirpath) / d / OWNER_FILE).exists()
            and os.path.realpath(os.path.join(dirpath, d)) not in keep
        ]
        yield (
            dirpath,
            [
                f
                for f in filenames
                if (f.endswith(".png") or f.endswith(_TEMP_END))
                and (not keep or os.path.realpath(os.path.join(dirpath, f)) not in keep)
            ],
        )


def remove_temp_pngs(png_dir: Path | str, inputs: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Delete the temporary files of PNGs a killed run was writing (it never renamed them).
    Called when a run resumes, under the store's lock: no other run writes into this png_dir
    (one store per png_dir), and a folder claimed by another store is not entered.
    Returns how many were removed."""
    return _remove_in_tree(png_dir, inputs, lambda path: _is_temp_png(path.name))


def _is_temp_png(name: str) -> bool:
    return _TEMP_PNG.fullmatch(name) is not None


def _remove_in_tree(
    png_dir: Path | str, inputs: Iterable[str | os.PathLike[str]], doomed: Callable[[Path], bool]
) -> int:
    """Delete the files of `_own_tree` that `doomed` picks, in one walk; returns how many."""
    removed = 0
    for dirpath, filenames in _own_tree(png_dir, inputs):
        for name in filenames:
            path = Path(dirpath) / name
            if doomed(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    return removed


def remove_our_pngs(png_dir: Path | str, inputs: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Delete every PNG vit-attn wrote under `png_dir` for its store (and unfinished ones),
    leaving other files. Called when a store is made anew for this png_dir (a first run,
    `--overwrite`): PNGs of the run it replaced would otherwise stay beside the new ones
    (images since removed, images the new run fails, another layer). Under the store's lock
    and the png_dir claim.

    Never touched: a folder inside that holds its own owner file (another store's png_dir),
    symlinked folders, `inputs` (the run's own images, or folders of them: earlier
    overlays being analysed may lie under png_dir), and any PNG that is not the tool's at
    its place, unchanged (`is_ours`). Returns how many were removed."""

    def doomed(path: Path) -> bool:
        if _is_temp_png(path.name):
            return True
        return path.name.endswith(".png") and not path.is_symlink() and is_ours(path, png_dir)

    return _remove_in_tree(png_dir, inputs, doomed)


def remove_pngs_of(png_dir: Path | str, image_root: str, paths: Iterable[str], heads: bool) -> int:
    """Delete the PNGs (ours only) of images about to be redone: if the redo fails, no PNG of
    the old picture stays for them. Returns how many were removed."""
    suffixes = SUFFIXES if heads else SUFFIXES[:1]
    removed = 0
    for image in paths:
        for suffix in suffixes:
            target = png_path(png_dir, image_root, image, suffix)
            if target.is_file() and not target.is_symlink() and is_ours(target, png_dir):
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                    removed += 1
    return removed


def batches_missing_pngs(
    status: np.ndarray,
    batch_size: int,
    png_dir: str | os.PathLike[str],
    image_root: str,
    paths: Iterable[str],
    heads: bool,
) -> list[int]:
    """Batches with an image at status 1 whose PNG is not there (deleted, or png_dir added
    after the run): redoing them rewrites the PNGs, so a finished run has every PNG."""
    suffixes = SUFFIXES if heads else SUFFIXES[:1]
    missing = set()
    for i, image in enumerate(paths):
        if status[i] != 1 or i // batch_size in missing:
            continue
        if not all(png_path(png_dir, image_root, image, s).is_file() for s in suffixes):
            missing.add(i // batch_size)
    return sorted(missing)
