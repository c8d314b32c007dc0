"""Fixtures of the chaos suite: small filesystems that fill up for real."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture()
def tmpfs(tmp_path):
    """`tmpfs("256k")`: a real tmpfs of that size (a full disk, or a /dev/shm too small, without filling
    the machine's). Mounting needs root, which CI's container has; elsewhere the test is skipped."""
    mounted = []

    def make(size: str):
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
