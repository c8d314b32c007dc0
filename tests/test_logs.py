"""Logs are one JSON object per line, tracebacks and multi-line messages included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import logging
    from monitor.logs import configure
    configure(logging.INFO, "json")
    log = logging.getLogger("monitor.test")
    log.info("attached to ring %s", "/dev/shm/x.ring", extra={"ring": "/dev/shm/x.ring", "layers": [15]})
    try:
        raise ValueError("bad slot\\nsecond line")
    except ValueError:
        log.exception("scoring failed:\\n  details follow")
""")


def test_every_log_line_is_json_with_fields():
    # A fresh interpreter: threads and handlers left by other tests cannot write into what is checked.
    r = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines()]  # every line parses
    assert len(records) == 2
    assert records[0]["msg"] == "attached to ring /dev/shm/x.ring" and records[0]["layers"] == [15]
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "monitor.test" and records[0]["time"]
    assert "Traceback" in records[1]["exc_info"] and "second line" in records[1]["exc_info"]
