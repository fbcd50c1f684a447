"""Image sources: from a folder, glob or list file to an ordered list of image paths.

The order is deterministic (sorted relative paths, or the list file's order), so a resumed
run maps the same image to the same store index.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from .errors import DataSourceError

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "list_images"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ImageList:
    """The ordered images of a data source: ``paths`` as listed, resolved against ``root``.

    Sources other than local files (URLs, WebDataset shards, Parquet) also carry the
    ``reader`` that workers read image bytes with, one ``locators`` entry per image (where
    the image lies: a member's byte range, a row), and ``identity`` (what the fingerprint
    must also hold, e.g. the Parquet image column). ``root`` is then a URL or a folder.
    """

    root: Path | str
    paths: tuple[str, ...]
    reader: Any = None
    locators: tuple[Any, ...] | None = None
    identity: dict[str, Any] | None = None
    # Files a folder listing passed over (not an image extension, or hidden): how many, and
    # the first few by path, so the start line can say so instead of dropping them silently.
    skipped: int = 0
    skipped_examples: tuple[str, ...] = ()
    # Paths a folder or glob listing dropped because they reach, through a symlinked folder, a
    # file already listed by a shorter path (a loop, or a link to a folder listed anyway).
    repeated: int = 0
    repeated_examples: tuple[str, ...] = ()
    # Sources behind a URL: per image, the size and mtime of its object as listed, or, for
    # shards and Parquet, of the file holding it (identity.container_identities), so a
    # resume notices a rewritten object or shard. Local files are identified by the planner.
    identities: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        """The file of image ``i`` (an absolute listed path stays as it is)."""
        return Path(self.root) / self.paths[i]


def list_images(source: str | Path) -> ImageList:
    """List a folder (recursively), a glob pattern, or a ``.txt``/``.csv`` list file.

    Folders and globs are sorted by relative POSIX path so that runs are reproducible; list
    files keep their order, because the user chose it. ``root`` is absolute, so the list
    stays valid in workers with another working directory.

    Raises:
        DataSourceError: the source is missing, of an unknown kind, lists no images, or a
            list file repeats an entry.
    """
    text = os.path.expanduser(os.fspath(source))
    path = Path(text)
    if path.is_dir():
        return _list_folder(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _list_text(path)
        if suffix == ".csv":
            return _list_csv(path)
        raise DataSourceError(
            f"{path}: not a folder, glob or list file; give a folder, a pattern, or a .txt/.csv list"
        )
    if any(c in text for c in _GLOB_CHARS):
        return _list_glob(text)
    raise DataSourceError(f"{path}: no such folder or list file; check data.source")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_files(root: Path) -> Iterator[str]:
    """The relative POSIX paths of the files under `root`, hidden ones included, in sorted
    folder order. Symlinked folders are followed, except around a loop (a link back to a
    folder on the way down would list the same files at ever longer paths, or, with two such
    links, never end); hidden folders are not entered."""
    # The real folders on the way from the root to each folder walked.
    chains: dict[str, frozenset[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath, frozenset()) | {os.path.realpath(dirpath)}
        kept = []
        for d in sorted(dirnames):
            below = os.path.join(dirpath, d)
            if d.startswith(".") or os.path.realpath(below) in chain:
                continue
            chains[below] = chain
            kept.append(d)
        dirnames[:] = kept
        rel = PurePath(os.path.relpath(dirpath, root))
        for name in sorted(filenames):
            yield (rel / name).as_posix()


def _list_folder(folder: Path) -> ImageList:
    """Every image under `folder`, following symlinked folders (`_walk_files`)."""
    root = Path(os.path.abspath(folder))
    found = []
    passed_over: list[str] = []
    n_passed_over = 0
    for rel in _walk_files(root):
        name = rel.rpartition("/")[2]
        if not name.startswith(".") and _is_image_name(name):
            found.append(rel)
        else:
            n_passed_over += 1
            if len(passed_over) < 3:
                passed_over.append(rel)
    nothing = (
        f"{folder}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
        "check data.source"
    )
    return _listing(root, found, n_passed_over, passed_over, nothing)


def _listing(
    root: Path, found: list[str], n_passed_over: int, passed_over: list[str], nothing: str
) -> ImageList:
    """The ImageList of a folder or glob listing: names that are not UTF-8 join what was
    passed over (the start line counts them), each file is listed once (`_once_per_file`),
    and a listing left empty is `nothing`, one line."""
    storable: list[str] = []
    unstorable: list[str] = []
    for rel in found:
        (storable if _is_utf8(rel) else unstorable).append(rel)
    if not storable:
        raise DataSourceError(nothing)
    paths, repeated = _once_per_file(root, storable)
    examples = (passed_over + unstorable)[:3]
    return ImageList(
        root,
        paths,
        skipped=n_passed_over + len(unstorable),
        # shown as text: a name that is not UTF-8 holds surrogate escapes
        skipped_examples=tuple(
            m.encode("utf-8", "surrogateescape").decode(errors="replace") for m in examples
        ),
        repeated=len(repeated),
        repeated_examples=tuple(repeated[:3]),
    )


def _is_utf8(rel: str) -> bool:
    """Whether a listed path can be stored: a name that is not UTF-8 comes from the file
    system with surrogate escapes, which the store's strings (UTF-8) cannot hold."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _matches(parts: list[str], pats: list[str]) -> bool:
    """Whether path segments match pattern segments as `glob` matches them: `**` is any number
    of folders, wildcards do not match a leading dot."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_matches(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    if not parts or (parts[0].startswith(".") and not pats[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pats[0]) and _matches(parts[1:], pats[1:])


def _once_per_file(root: Path, paths: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Each directory entry once: paths that reach the same file name in the same real folder
    (through a symlinked folder) keep one: a path without links before one through a link,
    then the shortest, then the first in sorted order. Returns the kept paths sorted, and the
    dropped ones. Two names for one file (a hard link, a symlinked file) stay two entries:
    the user made them."""
    top = os.path.realpath(root)
    real: dict[str, str] = {}  # one realpath per folder, not per file

    def folder(rel: str) -> str:
        parent = rel.rpartition("/")[0]
        if parent not in real:
            real[parent] = os.path.realpath(root / parent)
        return real[parent]

    def preference(rel: str) -> tuple[bool, int, str]:
        parent = rel.rpartition("/")[0]
        linked = folder(rel) != os.path.normpath(os.path.join(top, parent))
        return (linked, rel.count("/"), rel)

    best: dict[tuple[str, str], str] = {}
    dropped = []
    for rel in sorted(paths, key=preference):
        key = (folder(rel), rel.rpartition("/")[2])
        if key in best:
            dropped.append(rel)
        else:
            best[key] = rel
    return tuple(sorted(best.values())), sorted(dropped)


def _list_glob(pattern: str) -> ImageList:
    """Every regular file the pattern matches: the pattern is the user's filter."""
    parts = PurePath(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    prefix = Path(*parts[:fixed]) if fixed else Path(".")
    if not prefix.is_dir():
        raise DataSourceError(f"{pattern}: folder {prefix} does not exist; check data.source")
    root = Path(os.path.abspath(prefix))
    rest = str(PurePath(*parts[fixed:]))
    if "**" in parts[fixed:]:  # glob.glob would follow symlink loops (exponentially, with two)
        pats = list(parts[fixed:])
        found = [m for m in _walk_files(root) if _matches(m.split("/"), pats)]
    else:
        matches = glob.glob(rest, root_dir=root)
        # Folders are not images; a dangling link is listed, and fails alone with its reason.
        found = [PurePath(m).as_posix() for m in matches if not (root / m).is_dir()]
    nothing = f"{pattern}: pattern matches no files; check data.source"
    return _listing(root, found, 0, [], nothing)


def _list_text(path: Path) -> ImageList:
    """One path a line; blank lines and lines starting with ``#`` are skipped (a file whose
    name starts with ``#`` is listed as ``./#name``)."""
    with _utf8(path) as f:
        entries = text_entries(f)
    return _list_entries(path, entries)


def text_entries(lines: Iterable[str]) -> list[tuple[int, str]]:
    """(line number, path) of a text list: one path a line, blanks and ``#`` lines skipped."""
    return [(no, s) for no, line in enumerate(lines, 1) if (s := line.strip()) and s[0] != "#"]


def csv_entries(
    source: object, lines: Iterable[str], is_header: Callable[[str], bool]
) -> list[tuple[int, str]]:
    """(line number, path) of a CSV list: the column headed ``path``, else the first, whose
    first row is a header when `is_header` says so of its first cell. A row without a path,
    or a path spanning lines (an unbalanced quote took in the rows after it), is refused: its
    images would vanish, or become one image named by several lines, without a word."""
    reader = csv.reader(lines)
    rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    column, body = 0, rows
    if "path" in header:
        column, body = header.index("path"), rows[1:]
    elif is_header(rows[0][1][0].strip()):
        body = rows[1:]
    entries = [(no, row[column].strip() if len(row) > column else "") for no, row in body]
    for no, entry in entries:
        if not entry:
            raise DataSourceError(
                f"{source}: line {no} has no path in column {column + 1}; fill it in or "
                "remove the row"
            )
        if "\n" in entry or "\r" in entry:
            raise DataSourceError(
                f"{source}: the path ending on line {no} spans several lines (a quote left "
                "open?); close the quote"
            )
    return entries


@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[Any]:
    """The list file as UTF-8 text (a BOM allowed); other bytes are one clear line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError:
        raise DataSourceError(f"{path}: the list is not UTF-8 text; save it as UTF-8") from None


def _list_csv(path: Path) -> ImageList:
    """The column headed ``path``, else the first column.

    Without a ``path`` header, a first row whose first cell has no image extension and is
    no existing file is taken as a header (``filename,label``) rather than a missing image.
    """
    with _utf8(path) as f:
        entries = csv_entries(path, f, lambda cell: _is_header_cell(cell, path.parent))
    return _list_entries(path, entries)


def _is_header_cell(cell: str, folder: Path) -> bool:
    return not _is_image_name(cell) and not (folder / cell).exists()


def _list_entries(list_file: Path, entries: list[tuple[int, str]]) -> ImageList:
    """Keep the listed order and missing files (they fail per image later); refuse repeats."""
    if not entries:
        raise DataSourceError(f"{list_file}: list file names no images; add one path a line")
    root = Path(os.path.abspath(list_file.parent))
    first_line: dict[str, int] = {}
    for no, entry in entries:
        if "://" in entry:
            raise DataSourceError(
                f"{list_file}: line {no} is a URL ({entry[:80]}); a local list names local "
                "files: put a list of URLs on the object storage, or list them there"
            )
        key = os.path.normpath(root / entry)
        if key in first_line:
            raise DataSourceError(
                f"{list_file}: line {no} repeats {entry!r} (first on line {first_line[key]}); "
                "remove the duplicate"
            )
        first_line[key] = no
    return ImageList(root, tuple(entry for _, entry in entries))
