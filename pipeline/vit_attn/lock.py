"""One writer per store: an exclusive lock held for a whole run.

The lock is a file beside the store, `<store>.lock`, created with O_CREAT | O_EXCL (atomic
on local file systems and on NFS v3+), holding who took it (run id, user, host, pid, start
time). Its mtime is the heartbeat: a thread touches it every `stale_after / 6` seconds.

A lock is stale, and a new run takes it over, when its process is gone (same host, pid not
alive) or its heartbeat is older than `stale_after` seconds (any host: the process may be
stopped, or its node dead). Taking over renames the stale file away first, so of two runs
that find it stale only one gets it. Anything else is refused naming the holder. If a
machine died and you cannot wait, delete the `.lock` file by hand.

A store on object storage gets an `ObjectLease` instead (a `<store url>.lock` object with a
heartbeat, taken by write-then-read-back). Both implement the same small interface:
`acquire()`, `release()` and `lost`; `lock_for` chooses one for a store path.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError, StoreError
from .remote import access_error, is_url, url_fs

DEFAULT_STALE_AFTER = 120.0  # seconds without a heartbeat after which a lock may be taken over
# A heartbeat at least this often, whatever stale_after is (a very long one must not stretch
# the wait past what a thread can sleep).
HEARTBEAT_MAX_SECONDS = 60.0


class StoreLockedError(StoreError):
    """Another live run holds the store."""


class Lock(Protocol):
    """What a run needs from a store lock, whatever holds it."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    @property
    def lost(self) -> bool:
        """True once another run has taken the lock over (this run must stop writing)."""
        ...


def heartbeat_interval(stale_after: float) -> float:
    """How often a holder with this `stale_after` beats."""
    return min(HEARTBEAT_MAX_SECONDS, max(0.05, stale_after / 6))


def stale_limit(own: float, holder: Mapping[str, Any]) -> float:
    """Seconds without heartbeat after which `holder`'s lock may be taken over: this run's
    `stale_after`, but never less than three of the holder's own heartbeat intervals (a run
    that asks 5 s must not take over a live run beating every 20 s), which its record says."""
    theirs = _number(holder, "stale_after", own)
    return max(own, 3 * heartbeat_interval(max(theirs, 0.0)))


# A lock file whose content cannot be read (empty, cut short) is stale once it is older than
# this and than the lock's own stale_after (a live run's heartbeat keeps its mtime fresher).
UNREADABLE_STALE_AFTER = 10.0


def lock_path(store: str | os.PathLike[str]) -> Path:
    """`<store>.lock` beside the store (the store's real path: a symlink shares its lock)."""
    real = Path(os.path.realpath(store))
    if not real.name:  # the file system's root: no folder holds it, nor its lock
        raise ConfigError(
            f"output.store {store}: the root folder cannot be a store; give a folder under it"
        )
    return real.with_name(real.name + ".lock")


def lock_for(
    store: str | os.PathLike[str],
    run_id: str,
    stale_after: float = DEFAULT_STALE_AFTER,
    storage_options: Mapping[str, Any] | None = None,
) -> Lock:
    """The lock of a store: a lock file beside a local store, a lease object beside a store
    on object storage (`<url>.lock`)."""
    if is_url(store):
        return ObjectLease(str(store).rstrip("/") + ".lock", run_id, stale_after, storage_options)
    return FileLock(lock_path(store), run_id, stale_after)


class FileLock:
    """An exclusive lock file with a heartbeat; use as a context manager."""

    def __init__(self, path: Path, run_id: str, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.stale_after = float(stale_after)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    # ----------------------------------------------------------------- public

    @property
    def lost(self) -> bool:
        return self._lost

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise StoreLockedError if a live run has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            if holder is None:
                age = _age(self.path)
                if age is None:  # released (or taken away) between our two looks: try again
                    continue
                if not os.access(self.path, os.R_OK):  # another user's: alive as far as we know
                    raise StoreLockedError(
                        f"{self.path} is held by another user (uid {_owner(self.path)}) and "
                        "cannot be read here; wait for that run, or ask its owner"
                    )
                if age > max(UNREADABLE_STALE_AFTER, self.stale_after):
                    # empty or cut short (a disk that filled, a kill while it was written),
                    # and older than any live run's heartbeat
                    self._take_over({})
                    continue
                time.sleep(0.2)  # being written right now, or a dead run's: not yet stale
                continue
            why = self._stale_reason(holder)
            if why is None:
                limit = stale_limit(self.stale_after, holder)
                raise StoreLockedError(_refusal(self.path, holder, limit))
            self._take_over(holder)
        raise StoreLockedError(
            f"{self.path}: could not take the lock (other runs keep taking it, or its content "
            "cannot be read and it is not stale yet); if no run uses the store, delete it"
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = read_holder(self.path)
        if holder is not None and holder.get("run_id") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ----------------------------------------------------------------- internals

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:  # the lock is ours to name; the user named the store
            store = self.path.with_name(self.path.name.removesuffix(".lock"))
            if exc.errno == errno.ENAMETOOLONG:
                raise StoreError(
                    f"output.store {store}: its name is too long for the lock file beside it "
                    f"({len(self.path.name.encode())} bytes with '.lock'); shorten it"
                ) from None
            hint = (
                "; check that its folder exists and is writable"
                if exc.errno
                in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS)
                else ""
            )
            raise StoreError(
                f"output.store {store}: cannot create its lock file {self.path.name} beside "
                f"it: {exc.strerror or exc}{hint}"
            ) from None
        info = {
            "run_id": self.run_id,
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stale_after": self.stale_after,
        }
        try:
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: leave no empty lock behind to block later runs
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise StoreError(
                f"cannot write the lock file {self.path}: {exc.strerror or exc}"
            ) from None
        return True

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        if _process_gone(holder):
            return "its process is gone"
        age = _age(self.path)
        if age is not None and age > stale_limit(self.stale_after, holder):
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, holder: dict[str, Any]) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first; the next _create decides
        moved = read_holder(aside)
        if moved is not None and moved.get("run_id") != holder.get("run_id"):
            # A fresh lock arrived between our look and the rename: give it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="vit-attn-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = heartbeat_interval(self.stale_after)
        while not self._stop.wait(interval):
            holder = read_holder(self.path)
            if holder is None or holder.get("run_id") != self.run_id:
                self._lost = True
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


class ObjectLease:
    """A lease object on object storage: `<store url>.lock`, a JSON record with a heartbeat.

    Object stores have no exclusive create that every S3-compatible service honours, so the
    lease is taken by writing the record and reading it back after a settle delay: of two
    runs that write at once, the last write wins and the other sees a foreign run id and
    refuses. S3 reads are strongly consistent after writes, which this relies on. The record's
    `heartbeat` (epoch seconds) is rewritten every `stale_after / 6` s; a record whose
    heartbeat is older than `stale_after`, or whose process ran on this host and is gone,
    is taken over. A run that finds a foreign record
    at its heartbeat has lost the lease (`lost`) and stops writing.
    """

    SETTLE_SECONDS = 0.5

    def __init__(
        self,
        url: str,
        run_id: str,
        stale_after: float = DEFAULT_STALE_AFTER,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self._store = url.removesuffix(".lock")
        self.run_id = run_id
        self.stale_after = float(stale_after)
        self._fs, self._path = url_fs(url, storage_options)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self._info = {
            "run_id": run_id,
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stale_after": self.stale_after,
        }

    @property
    def lost(self) -> bool:
        return self._lost

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; raise StoreLockedError if a live run has it."""
        holder = self._read()
        if holder is not None and holder.get("run_id") != self.run_id:
            age = time.time() - _number(holder, "heartbeat", 0.0)
            fresh = age <= stale_limit(self.stale_after, holder)
            if fresh and not _process_gone(holder):
                raise StoreLockedError(self._refusal(holder, age))
        self._write()
        time.sleep(self.SETTLE_SECONDS)
        holder = self._read()
        if holder is None or holder.get("run_id") != self.run_id:
            raise StoreLockedError(self._refusal(holder or {}, 0.0))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="vit-attn-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):  # never mask the run's own outcome
            holder = self._read()
            if holder is not None and holder.get("run_id") == self.run_id:
                self._fs.rm(self._path)

    def _read(self) -> dict[str, Any] | None:
        """The lease record; None when there is none (or it is not a record).

        Raises:
            StoreError: the storage cannot be reached or refuses access (one line).
        """
        try:
            data = json.loads(self._fs.cat_file(self._path))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # half-written or foreign content: no valid holder
        except Exception as e:  # botocore and aiohttp errors share no base class
            raise StoreError(access_error(self._store, e, "cannot read the store")) from None
        return data if isinstance(data, dict) else None

    def _write(self) -> None:
        record = json.dumps({**self._info, "heartbeat": time.time()}).encode()
        try:
            self._fs.pipe_file(self._path, record)
        except Exception as e:  # as in _read
            raise StoreError(access_error(self._store, e, "cannot write the store")) from None

    def _beat(self) -> None:
        interval = heartbeat_interval(self.stale_after)
        while not self._stop.wait(interval):
            try:
                holder = self._read()
            except StoreError:
                continue  # a passing network fault is not a lost lease; the next beat retries
            if holder is None or holder.get("run_id") != self.run_id:
                self._lost = True
                return
            with contextlib.suppress(StoreError):
                self._write()

    def _refusal(self, holder: dict[str, Any], age: float) -> str:
        return (
            f"{self._store} is in use by run {holder.get('run_id')} of {holder.get('user')} on "
            f"{holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last heartbeat {age:.0f} s ago); wait for it to finish. A dead run's lease is "
            f"taken over after {stale_limit(self.stale_after, holder):.0f} s "
            f"without heartbeat, or delete {self.url} once you are sure it is not running"
        )


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's content, or None when there is no (complete) lock file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _refusal(path: Path, holder: dict[str, Any], stale_after: float) -> str:
    """`stale_after`: the limit after which this run takes the lock over (`stale_limit`)."""
    age = _age(path)
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    store = path.with_name(path.name.removesuffix(".lock"))
    return (
        f"{store} is in use by run {holder.get('run_id')} of {holder.get('user')} on "
        f"{holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}{beat}); "
        f"wait for it to finish. A dead run's lock is taken over after "
        f"{stale_after:.0f} s without heartbeat, "
        f"or delete {path} once you are sure it is not running"
    )


def _number(holder: Mapping[str, Any], key: str, default: float) -> float:
    """A number the holder's record gives, or `default` where it gives none that is one (a
    record written by hand or by another tool is a refusal's words, not a traceback)."""
    value = holder.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        number = float(value)  # an int of 400 digits: OverflowError
    except OverflowError:
        return default
    return number if math.isfinite(number) else default


def _owner(path: Path) -> str:
    try:
        return str(path.stat().st_uid)
    except OSError:
        return "?"


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def _process_gone(holder: Mapping[str, Any]) -> bool:
    """True when the holder ran on this host and its process no longer exists.

    A run killed with SIGKILL leaves its lock or lease behind with a fresh heartbeat; on the
    same host the missing pid says it is dead, so a rerun need not wait `stale_after`.
    """
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False  # no pid we can ask about: its heartbeat decides
    return holder.get("host") == socket.gethostname() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # beyond any pid: no such process
        return False
    except PermissionError:
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())
