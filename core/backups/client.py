"""Which pg_dump, pg_restore and friends a server's backups and restores run: at least as new as
the server.

pg_dump refuses a server newer than itself ("aborting because of server version mismatch"), and
pg_restore an archive written by a newer pg_dump; both read every older major. So a server's
dumps, restore tests and restores all use one directory of client programs, chosen here:

* ``client_bin`` in the server's fleet entry, when the operator pinned one;
* else the newest client installed on the server, found by the backup's own probe: the server's
  ``pg_bin`` and every ``/usr/lib/postgresql/*/bin`` (where Debian and Ubuntu put each major's
  client; ``apt install postgresql-client-17`` adds one), ranked by ``pg_dump --version``.
  In the sandbox ``pg_bin`` is the major's build, whose client tools (18.x) are linked in.

The same probe asks the server its version; a client older than the server is a DbopsError that
says what was found and what to install, before anything is written. A probe is kept for a few
minutes per server (a nightly run backs up every customer of a server with one probe).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from core.backups.server import admin_conninfo
from core.errors import DbopsError
from core.fleet import Server
from core.remote import Runner

# pg_restore's SQL, without the preamble's SET transaction_timeout (Client.restores_via_sql), into
# psql in one transaction that stops at the first error: what pg_restore --single-transaction
# --exit-on-error does. $1 the client's bin, $2 the target conninfo, $3 the dump.
RESTORE_VIA_SQL_SCRIPT = r"""set -u -o pipefail
"$1/pg_restore" --no-owner -f - "$3" | sed '1,60{/^SET transaction_timeout = 0;$/d;}' |
  "$1/psql" -X -q -v ON_ERROR_STOP=1 --single-transaction -d "$2" -f - >/dev/null
"""

# Where Debian and Ubuntu install each major's programs (postgresql-client-N).
DEBIAN_BINS = "/usr/lib/postgresql/*/bin"
PROBE_TTL_S = 300.0

# Each candidate directory with an executable pg_dump: "client\t<dir>\t<pg_dump --version>";
# then the server's version, asked with the server's own psql (pg_bin) or else a candidate's:
# "server\t<num>\t<version>", or "error\t<why>". $1 is the admin conninfo, $2 pg_bin, $3
# "probe" (add Debian's directories) or "pinned", then the candidate directories.
_PROBE_SCRIPT = r"""set -u
cd / || true  # psql as run_as from the SSH user's home says it cannot enter it, on stderr
conninfo=$1; pgbin=$2; mode=$3; shift 3
dirs=("$@")
if [ "$mode" = probe ]; then
  for d in /usr/lib/postgresql/*/bin; do [ -d "$d" ] && dirs+=("$d"); done
fi
psqls=("$pgbin/psql")
for d in "${dirs[@]}"; do
  [ -x "$d/pg_dump" ] || continue
  v=$("$d/pg_dump" --version 2>/dev/null) || continue
  printf 'client\t%s\t%s\n' "$d" "$v"
  psqls+=("$d/psql")
done
why="no psql in $pgbin"
for psql in "${psqls[@]}"; do
  [ -x "$psql" ] || continue
  if out=$("$psql" -X -q -A -t -v ON_ERROR_STOP=1 -d "$conninfo" \
           -c 'SHOW server_version_num' -c 'SHOW server_version' 2>&1); then
    printf 'server\t%s\n' "$(printf '%s' "$out" | tr '\n' '\t')"
    exit 0
  fi
  why=$(printf '%s' "$out" | head -n 1)
done
printf 'error\t%s\n' "$why"
"""
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Client:
    """The client programs a server's backups and restores use."""

    bin: str  # the directory of pg_dump, pg_restore, pg_dumpall, psql, createdb, dropdb
    version: str  # pg_dump's, e.g. "18.1"
    major: int
    server_version: str = ""  # e.g. "17.10"
    server_major: int = 0

    def program(self, name: str) -> str:
        return f"{self.bin.rstrip('/')}/{name}"

    def restore_argv(self, conninfo: str, dump: str) -> list[str]:
        """pg_restore of ``dump`` into ``conninfo`` as one transaction, stopping at the first
        error, without owners (see restores_via_sql for when it goes through psql)."""
        if self.restores_via_sql:
            script = RESTORE_VIA_SQL_SCRIPT
            return ["bash", "-c", script, "dbops-restore", self.bin.rstrip("/"), conninfo, dump]
        return [
            self.program("pg_restore"), "--exit-on-error", "--single-transaction", "--no-owner",
            "-d", conninfo, dump,
        ]  # fmt: skip

    @property
    def restores_via_sql(self) -> bool:
        """pg_restore 17 and later starts every restore with ``SET transaction_timeout = 0``,
        a setting servers before 17 reject ("unrecognized configuration parameter"), and an
        older pg_restore cannot read what a newer pg_dump wrote. Into such a server a dump is
        restored as SQL (pg_restore -f -) with that one line left out, through psql."""
        return self.major >= 17 > self.server_major

    @property
    def label(self) -> str:
        """What a backup's record says wrote it: "pg_dump 18.1"."""
        return f"pg_dump {self.version}"


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a "pg_dump (PostgreSQL) 18.1 (Debian ...)" line."""
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def choose(server: Server, probe_out: str) -> Client:
    """The newest client the probe found (the first listed on a tie: ``pg_bin`` before
    Debian's), checked against the server's major."""
    found: list[tuple[tuple[int, int], str]] = []
    server_num, server_version, error = 0, "", ""
    for line in probe_out.splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "client":
            directory, _, said = rest.partition("\t")
            version = parse_version(said)
            if version is not None:
                found.append((version, directory))
        elif kind == "server":  # psql's two answers, after whatever it said on stderr
            parts = [part.strip() for part in rest.split("\t") if part.strip()]
            at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            if at is not None and at + 1 < len(parts):
                server_num, server_version = int(parts[at]), parts[at + 1].split()[0]
        elif kind == "error":
            error = " ".join(rest.split())[:200]
    where = server.client_bin or f"{server.pg_bin} or {DEBIAN_BINS}"
    if not found:
        raise DbopsError(
            f"no pg_dump on {server.name} in {where}.",
            hint="Install PostgreSQL's client there (postgresql-client-N), or set client_bin.",
        )
    best = found[0]
    for candidate in found[1:]:
        if candidate[0] > best[0]:
            best = candidate
    (major, minor), directory = best
    server_major = server_num // 10000
    if not server_num:
        raise DbopsError(
            f"cannot ask PostgreSQL on {server.name} its version" + (f": {error}" if error else ".")
        )
    if major < server_major:
        raise DbopsError(
            f"the newest pg_dump on {server.name} is {major}.{minor} ({directory}), older than "
            f"its PostgreSQL {server_version}: pg_dump cannot dump a newer server.",
            hint=f"Install postgresql-client-{server_major} (or newer) on {server.name}"
            + (", or point client_bin at one." if server.client_bin else "."),
        )
    return Client(directory, f"{major}.{minor}", major, server_version, server_major)


_cache: dict[tuple[str, str, str, str], tuple[float, Client]] = {}
_cache_lock = threading.Lock()


def client_for(runner: Runner, server: Server, *, fresh: bool = False) -> Client:
    """The client programs for ``server``'s backups and restores (see the module's doc)."""
    key = (server.name, server.pg_bin, server.client_bin or "", server.admin_dsn or server.dsn)
    now = time.monotonic()
    with _cache_lock:
        kept = _cache.get(key)
    if kept is not None and not fresh and now - kept[0] < PROBE_TTL_S:
        return kept[1]
    dirs = [server.client_bin] if server.client_bin else [server.pg_bin]
    mode = "pinned" if server.client_bin else "probe"
    argv = [
        "bash", "-c", _PROBE_SCRIPT, "dbops-client", admin_conninfo(server),
        server.pg_bin.rstrip("/"), mode, *dirs,
    ]  # fmt: skip
    out = runner.run(argv).check().stdout
    client = choose(server, out)
    with _cache_lock:
        _cache[key] = (now, client)
    return client
