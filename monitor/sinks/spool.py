"""The Kafka sink's write-ahead spool: every accepted event is on disk, fsynced, before it is sent.

SQLite (the standard library's) rather than a file per event: appends and deletes are transactions
that survive a power cut or a SIGKILL whole or not at all; a batch of events costs one fsync; the
head of the queue is an index lookup, so draining 100,000 events is linear (listing a folder of one
file per event before every send was quadratic); and the disk it uses is the file's size. One
sidecar owns a spool folder: the folder is private (0700) and locked, so a second sidecar given the
same folder refuses to start instead of overwriting the first one's events.

What cannot be read is moved to `quarantine/` and counted, never allowed to stop delivery: a
database file SQLite cannot open, and files left by the previous spool format (one `<seq>.json`
per event) that do not parse; those that parse are imported, in order, at start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("monitor.kafka")

DB_NAME = "spool.sqlite3"
LOCK_NAME = "lock"
QUARANTINE = "quarantine"


class SpoolError(RuntimeError):
    """The spool folder cannot be used (owned by someone else, or in use by another sidecar)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    topic: str
    key: str
    event: bytes  # the CloudEvent as sent (JSON)


class Spool:
    """FIFO of events on disk, bounded by the disk its files use."""

    def __init__(self, directory: str | Path, max_bytes: int, default_topic: str = "") -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.quarantined = 0  # events (or files of unknown content, counted as one) moved aside
        self._lock = threading.Lock()
        _private_dir(self.dir)
        self._lock_fd = _take_lock(self.dir / LOCK_NAME)
        self._db = self._open()
        self._import_legacy(default_topic)
        self.count = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        self.last_seq = self._db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    # ---- opening ----
    def _open(self) -> sqlite3.Connection:
        path = self.dir / DB_NAME
        try:
            return _connect(path)
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                # A full disk or a permission problem: the events are fine, they must not be moved aside.
                raise SpoolError(f"kafka spool {path} cannot be opened: {e} (free space on its disk, or check "
                                 "that this process owns it)") from e
            moved = self._quarantine(path, f"{e}")
            for suffix in ("-wal", "-shm"):
                self._quarantine(Path(f"{path}{suffix}"), "belongs to the damaged spool")
            log.error("kafka spool %s could not be opened (%s); moved to %s, starting an empty spool", path, e, moved,
                      extra={"spool": str(path), "quarantined": str(moved)})
            self.quarantined += 1
            return _connect(path)

    def _quarantine(self, path: Path, why: str) -> Path | None:
        if not path.exists():
            return None
        qdir = self.dir / QUARANTINE
        qdir.mkdir(mode=0o700, exist_ok=True)
        dest = qdir / f"{path.name}.{time.time_ns()}"
        os.replace(path, dest)
        (qdir / f"{dest.name}.why").write_text(why + "\n")
        return dest

    def _import_legacy(self, default_topic: str) -> None:
        """`<seq>.json` files of the previous format: imported in order; unreadable ones quarantined."""
        files = sorted(self.dir.glob("*.json"))
        for f in files:
            try:
                doc = json.loads(f.read_bytes())
                entry = (doc.get("topic") or default_topic, str(doc["key"]),
                         json.dumps(doc["event"], separators=(",", ":")).encode())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self._quarantine(f, f"not a spooled event: {type(e).__name__}: {e}")
                self.quarantined += 1
                log.error("kafka spool file %s is not a readable event (%s); quarantined", f, e,
                          extra={"spool_file": str(f)})
                continue
            with self._db:
                self._db.execute("INSERT INTO events(topic, key, event) VALUES (?, ?, ?)", entry)
            f.unlink()
        for stray in self.dir.glob("*.tmp"):  # a write the previous format never finished: not an event
            stray.unlink()

    # ---- the sender thread ----
    def __len__(self) -> int:
        return self.count

    def disk_bytes(self) -> int:
        """What the spool's files take on disk (allocated blocks, not their apparent size)."""
        total = 0
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            try:
                total += os.stat(self.dir / name).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def append(self, entries: list[tuple[str, str, bytes]]) -> tuple[int, str | None]:
        """Persist events (topic, key, event) in order, fsynced: one transaction, or (when the disk fills)
        as many halving ones as it takes to keep what still fits.

        Returns how many (from the first) are on disk, and why the rest are not: "spool_full" (over
        `max_bytes` of disk use) or "disk_full" (ENOSPC)."""
        room = self.max_bytes - self.disk_bytes()
        n = 0
        for topic, key, event in entries:
            # A row is written twice before a checkpoint (the log, then the database), plus its page's overhead.
            room -= 2 * (len(topic) + len(key) + len(event)) + 128
            if room < 0:
                break
            n += 1
        done, chunk = 0, n
        with self._lock:
            while done < n and chunk:
                try:
                    with self._db:
                        self._db.executemany("INSERT INTO events(topic, key, event) VALUES (?, ?, ?)",
                                             entries[done : done + chunk])
                        self.last_seq = self._db.execute("SELECT max(seq) FROM events").fetchone()[0]
                except sqlite3.OperationalError as e:
                    if not _disk_full(e):
                        raise
                    chunk //= 2  # the disk is full: keep as many as still fit, in order
                    continue
                done += chunk
                self.count += chunk
                chunk = min(chunk, n - done)
        if done < n:
            return done, "disk_full"
        return done, (None if done == len(entries) else "spool_full")

    def head(self, n: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, key, event FROM events ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [Entry(seq, topic, key, bytes(event)) for seq, topic, key, event in rows]

    def remove_through(self, seq: int) -> None:
        """Forget every event up to `seq` (delivered)."""
        with self._lock:
            with self._db:
                removed = self._db.execute("DELETE FROM events WHERE seq <= ?", (seq,)).rowcount
            self.count -= removed
            if self.count == 0:
                # Give the pages back: a spool that emptied after an outage should not keep its peak size.
                self._db.execute("PRAGMA incremental_vacuum")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new database: before any table
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync at every commit: an event counted as spooled is on disk
        # Checkpoint the log every 256 pages and cut it back to 1 MiB: its size counts against the cap.
        db.execute("PRAGMA wal_autocheckpoint=256")
        db.execute("PRAGMA journal_size_limit=1048576")
        db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                   "key TEXT NOT NULL, event BLOB NOT NULL)")
        db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError:
        db.close()
        raise
    os.chmod(path, 0o600)
    db.isolation_level = "DEFERRED"  # `with db:` is then one transaction
    return db


def _disk_full(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)


def _private_dir(d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.geteuid():
        raise SpoolError(f"kafka spool_dir {d} belongs to uid {st.st_uid}, not this process (uid {os.geteuid()}): "
                         "give each sidecar a folder of its own (sinks.kafka.spool_dir)")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)  # events may carry request ids and scores: nobody else reads them
        log.info("kafka spool %s made private (0700)", d, extra={"spool": str(d)})


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SpoolError(f"kafka spool_dir {path.parent} is in use by another sidecar (pid {holder}): give each "
                             "sidecar a folder of its own (sinks.kafka.spool_dir)") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
