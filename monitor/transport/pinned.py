"""Requests that sampling must always score, from the vLLM API server to the sidecar.

Only the API server sees HTTP headers; the rows the sidecar reads carry request ids alone. So the
vLLM middleware checks each request's headers against `sampling.always` and, for a match, appends
its request id to a small file beside the rings, before vLLM sees the request: by the time the
request's rows reach the sidecar, the id is in the file. Nothing else is written (no header values,
no other requests), and only when rules are configured.

One file per API-server process, `{name}-pinned-{pid}.ids`, one id per line, rotated at
`MAX_BYTES` to `.old` (one generation kept): an id is needed only in the milliseconds between the
request's arrival and its first rows.
"""

from __future__ import annotations

import glob
import os
from collections import OrderedDict
from pathlib import Path

MAX_BYTES = 1 << 20


def pinned_path(directory: str | Path, name: str, pid: int | None = None) -> Path:
    return Path(directory) / f"{name}-pinned-{os.getpid() if pid is None else pid}.ids"


class PinnedWriter:
    """The middleware's side: append a request id (one write, O_APPEND, never blocking on the sidecar)."""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None

    def add(self, request_id: str) -> None:
        line = request_id.replace("\n", " ").encode() + b"\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            os.fchmod(self._fd, self.mode)
        os.write(self._fd, line)
        if os.fstat(self._fd).st_size > MAX_BYTES:
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, self.path.with_suffix(".old"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PinnedReader:
    """The sidecar's side: has this request id been pinned? Reads new lines only when asked about an id it
    has not seen, keeps the last `remember` ids."""

    def __init__(self, directory: str | Path, name: str, remember: int = 65536) -> None:
        self.pattern = str(Path(directory) / f"{name}-pinned-*.ids")
        self.remember = remember
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._offsets: dict[str, tuple[int, int]] = {}  # path -> (inode, bytes read)

    def __contains__(self, request_id: str) -> bool:
        if request_id in self._ids:
            return True
        self._read()
        return request_id in self._ids

    def _read(self) -> None:
        for path in glob.glob(self.pattern) + glob.glob(self.pattern[: -len(".ids")] + ".old"):
            try:
                with open(path, "rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    known, offset = self._offsets.get(path, (inode, 0))
                    if known != inode:  # rotated: a new file under this name
                        offset = 0
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            self._offsets[path] = (inode, offset + end)
            for line in data[:end].splitlines():
                self._ids[line.decode(errors="replace")] = None
        while len(self._ids) > self.remember:
            self._ids.popitem(last=False)
