"""Run a check in a forked child as another uid:gid (root only): what a pod's fsGroup permissions allow."""

from __future__ import annotations

import os
from typing import Callable


def exit_code_as(uid: int, gid: int, check: Callable[[], int]) -> int:
    """`check()`'s return value as the child's exit code (1 if it raised), run as uid:gid with no other groups."""
    pid = os.fork()
    if pid == 0:  # the child: system calls and the check only, then _exit (no pytest teardown twice)
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = check()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
