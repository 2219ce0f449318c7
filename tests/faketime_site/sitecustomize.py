"""Loaded by every Python process of ``make test-later``, which puts this directory on PYTHONPATH.

The target runs the suite under Debian 12's libfaketime (0.9.10) with the wall clock a year
ahead and the monotonic clock left real (``FAKETIME_DONT_FAKE_MONOTONIC=1``, so timeouts and
lock waits keep their length). Two faults of that version are worked around here, nothing else:

* It converts an absolute ``clock_nanosleep`` on CLOCK_MONOTONIC as if that clock were faked
  too, hands the kernel a negative time, and ``time.sleep`` (which sleeps that way since Python
  3.11) fails with EINVAL (wolfcw/libfaketime#426, fixed after 0.9.10). ``time.sleep`` waits in
  ``select`` instead, whose relative timeout libfaketime passes through.
* The first faked process creates a semaphore and shared memory (named in FAKETIME_SHARED) with
  mode 0600, and a child that runs as another user (the sandbox runs PostgreSQL, pgBouncer and
  its scripts as ``postgres`` through runuser) cannot open them and exits with "sem_open failed".
  The process that created them opens them to every user.
"""

from __future__ import annotations

import contextlib
import os
import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select((), (), (), seconds)


def _share_with_other_users() -> None:
    names = os.environ.get("FAKETIME_SHARED", "").split()
    if len(names) != 2:
        return
    sem, shm = (name.lstrip("/") for name in names)
    for path in (f"/dev/shm/sem.{sem}", f"/dev/shm/{shm}"):
        with contextlib.suppress(OSError):
            if os.stat(path).st_uid == os.geteuid():
                os.chmod(path, 0o666)


if "libfaketime" in os.environ.get("LD_PRELOAD", ""):
    _share_with_other_users()
    if os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC"):
        time.sleep = _sleep
