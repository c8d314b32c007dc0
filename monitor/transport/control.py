"""The control channel: verdicts from the sidecar back to vLLM's API servers.

Each API server (one per data-parallel rank under `vllm serve`) listens on a Unix socket beside
the rings, `{directory}/{name}-ctl-{host hash}-{pid}.sock`, with `transport.file_mode`: whoever may
write to it may stop requests, so the pod's filesystem permissions are what authenticates the
sidecar. The sidecar sends each message to every socket it finds; an API server that does not own
the request ignores it, so with several API servers the one that owns it acts.

Why a Unix sequenced-packet socket (standard library only) rather than ZeroMQ: message boundaries
and permission checks (connecting needs write access to the socket file) come with it, a send
never blocks (a full receiver refuses the message, which is dropped and counted: the request is
then served as if unwatched, the fail-open choice), and the sidecar's image need not carry vLLM's
dependencies.

Messages are JSON, one per packet, at most `MAX_BYTES`:

  heartbeat  the sidecar is alive; `actions` lists the actions its detectors take
  verdict    a detector with an action fired on a request (engine's external id, alert id, ...)
  end        the sidecar has seen the request finish: no verdict on it will follow
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSION = 1
MAX_BYTES = 4096
# sockaddr_un.sun_path is 108 bytes with the terminating NUL.
MAX_PATH_BYTES = 107
PID_MAX = 4194304  # Linux's largest pid_max: the longest pid a socket name can carry


class ControlError(ValueError):
    """Bytes that are not a control message of this version."""


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    actions: tuple[str, ...]  # the actions the sidecar's detectors take ("abort", "annotate")
    kind: str = field(default="heartbeat", init=False)


@dataclass(frozen=True)
class Verdict:
    external_id: str  # the engine's request id, as vLLM's `abort` takes it (e.g. chatcmpl-<X-Request-Id>)
    request_id: str
    alert_id: str
    detector: str
    severity: str
    action: str  # "abort" or "annotate"
    score: float
    position: int  # the token whose row fired the detector
    step_time: float | None  # end of that forward pass (wall clock)
    kind: str = field(default="verdict", init=False)


@dataclass(frozen=True)
class End:
    external_id: str
    kind: str = field(default="end", init=False)


Message = Heartbeat | Verdict | End
_KINDS = {"heartbeat": Heartbeat, "verdict": Verdict, "end": End}


def encode(msg: Message) -> bytes:
    data = json.dumps({"v": VERSION, **asdict(msg)}, separators=(",", ":")).encode()
    if len(data) > MAX_BYTES:
        raise ControlError(f"{msg.kind} message of {len(data)} bytes is over {MAX_BYTES}")
    return data


def decode(data: bytes) -> Message:
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.pop("v", None) != VERSION:
            raise ControlError(f"not a version-{VERSION} control message")
        cls = _KINDS[obj.pop("kind")]
        if cls is Heartbeat:
            obj["actions"] = tuple(obj["actions"])
        return cls(**obj)
    except ControlError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ControlError(f"bad control message ({type(e).__name__}: {e})") from e


def socket_glob(directory: str | Path, name: str) -> str:
    return str(Path(directory) / f"{name}-ctl-*.sock")


def socket_path(directory: str | Path, name: str, pid: int | None = None) -> Path:
    # The host is hashed, not spelt out: a pod name alone can take 63 of the 107 bytes a socket path may have.
    host = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
    path = Path(directory) / f"{name}-ctl-{host}-{os.getpid() if pid is None else pid}.sock"
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ControlError(f"control socket path {path} is {len(os.fsencode(path))} bytes, over the "
                           f"{MAX_PATH_BYTES} a Unix socket allows: shorten transport.directory or transport.name")
    return path


class ControlReceiver:
    """An API server's end: a listening socket; each sidecar that connects gets a connection of its own.

    Drive it from an event loop: `accept()` when the listener is readable (returns the new
    connections' file descriptors), `receive(fd)` when a connection is (its messages, and whether it
    is still open).
    """

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.bad = 0  # messages that were not control messages
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.setblocking(False)
        # Bound in a private (0700) folder, given `mode`, then moved into place: no moment where anyone else
        # may connect. (Not a umask change: that is process-wide, and vLLM's API server has other threads.)
        private = Path(tempfile.mkdtemp(prefix=".ctl-", dir=path.parent))
        try:
            self.listener.bind(str(private / "s"))
            os.chmod(private / "s", mode)
            self.listener.listen(16)
            os.replace(private / "s", path)  # over a file left by a process that had our pid and died
        finally:
            shutil.rmtree(private, ignore_errors=True)
        self.conns: dict[int, socket.socket] = {}

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> list[int]:
        new = []
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return new
            conn.setblocking(False)
            self.conns[conn.fileno()] = conn
            new.append(conn.fileno())

    def receive(self, fd: int, limit: int = 1024) -> tuple[list[Message], bool]:
        conn = self.conns.get(fd)
        if conn is None:
            return [], False
        out: list[Message] = []
        for _ in range(limit):
            try:
                data = conn.recv(MAX_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # the sidecar went away (or restarted: it connects again)
                del self.conns[fd]
                conn.close()
                return out, False
            try:
                out.append(decode(data))
            except ControlError:
                self.bad += 1
        return out, True

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.listener.close()
        self.path.unlink(missing_ok=True)


@dataclass
class SenderStats:
    sent: int = 0
    dropped: int = 0  # a receiver's buffer was full, or it went away: that API server never got the message
    receivers: int = 0  # API servers connected


class ControlSender:
    """The sidecar's end: a connection to every API server `discover()` finds; `send` never blocks.

    Connected sequenced packets rather than datagrams: a datagram socket queues only
    `net.unix.max_dgram_qlen` (10) messages per receiver, a connection as many as its buffer holds
    (hundreds of KiB), so an API server whose event loop is busy for a moment loses nothing.
    """

    def __init__(self, directory: str | Path, name: str) -> None:
        self.pattern = socket_glob(directory, name)
        self.conns: dict[str, socket.socket] = {}
        self.denied: dict[str, str] = {}  # sockets we may not connect to, with why (permissions: log it)
        self.stats = SenderStats()

    @property
    def receivers(self) -> list[str]:
        return sorted(self.conns)

    def discover(self) -> list[str]:
        for path in sorted(glob.glob(self.pattern)):
            if path in self.conns:
                continue
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(path)
            except OSError as e:
                s.close()
                if e.errno in (errno.EACCES, errno.EPERM):
                    self.denied[path] = os.strerror(e.errno)
                continue  # no one listening (a dead API server's file), or its backlog is full: next time
            self.conns[path] = s
        self.stats.receivers = len(self.conns)
        return self.receivers

    def send(self, msg: Message) -> int:
        """Send to every connected receiver; returns how many took it."""
        data = encode(msg)
        took = 0
        for path, s in list(self.conns.items()):
            try:
                s.send(data)
            except (BlockingIOError, InterruptedError):
                self.stats.dropped += 1
                continue
            except OSError:  # the API server is gone (EPIPE, ECONNRESET): forgotten, found again if it comes back
                s.close()
                del self.conns[path]
                self.stats.receivers = len(self.conns)
                self.stats.dropped += 1
                continue
            self.stats.sent += 1
            took += 1
        return took

    def close(self) -> None:
        for s in self.conns.values():
            s.close()
        self.conns.clear()
