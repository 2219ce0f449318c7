"""Provisioning a new customer database (SOP-103) and choosing its server (SOP-102).

``Provisioner.provision`` does what the SOP's script and checklist do, each step an event:

1. ``names``: the name is not reserved (``core.names``: PostgreSQL's and pgBouncer's own), not a
   role of fleet.toml's DSNs, and the server has no role or database of that name nor a line
   for it in its pgBouncer files that dbops did not write (checked before the job starts and
   again here, once; from then on those names are this job's to finish).
2. ``role``: LOGIN, a generated password stored as a SCRAM-SHA-256 secret computed here (so the
   password itself never reaches the server, its log or a command line), CONNECTION LIMIT
   from the plan.
3. ``database``: owned by the role, from template0.
4. ``privileges``: CONNECT revoked from PUBLIC on it and on ``postgres``, granted to the role,
   the monitoring role and the admin role.
5. ``pgbouncer``: the [databases] entry (and the auth_file secret) and a reload, where configured;
   dbops marks the lines it writes and never rewrites one it did not (``INI_MARK``).
6. ``customer``: the customer row, which puts it in the nightly backups and the health sweep.
7. ``connection_test``: a real login as the customer with the new password.
8. ``first_backup``: so the morning report does not start with a missing backup (not fatal).
9. ``welcome``: SOP-102's email, the ONLY place the password goes.

Running it again after a failure finishes the job (state in ``provision_jobs``): what exists is
kept; the password is set afresh in every run that will send the welcome email, because the
previous run's password was never written anywhere. The email goes once: its state is
recorded before and after sending, and a run that died mid-send is not retried blindly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import posixpath
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col

from core import email as mail
from core.backups import Backups, run_sql, script_error, sql_json
from core.customers import Customer, get_customer, list_customers, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import APP_NAME, Fleet, Plan, Server
from core.names import (
    CHOOSE_ANOTHER,
    NAME_RE,
    refuse_name,
    validate_name,
    validate_new_name,
    validate_server_name,
)
from core.remote import FleetAccess, Runner, RunnerPool
from storage.events import EventLog
from storage.models_billing import ProvisionJob, link_stripe_customer
from storage.spool import RECORD_LATER, caught_up, record

log = logging.getLogger("dbops.provisioning")

STEPS = (
    "names",
    "role",
    "database",
    "privileges",
    "pgbouncer",
    "customer",
    "connection_test",
    "first_backup",
    "welcome",
)
CLAIM_LEASE = timedelta(minutes=30)
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
# SOP-101: alert under 30 % free disk; a plan's storage must fit under that line.
DISK_FILL_LIMIT = 0.70
GB = 1024**3
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
WELCOME = "welcome"


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- passwords --------------------------------------------------------------------------------


def generate_password() -> str:
    """32 URL-safe characters (192 bits): pasteable into a connection URL as it is."""
    return secrets.token_urlsafe(24)


def scram_sha256_secret(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores for ``password`` (RFC 5802/7677, as
    libpq's PQencryptPasswordConn builds it). Given to CREATE/ALTER ROLE ... PASSWORD, the
    server stores it as it is, and the password itself never leaves this process."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


# --- choosing a server ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCapacity:
    """One server's room for a plan: what it has, what its customers' plans have been promised."""

    server: str
    reachable: bool
    customers: int = 0
    mem_total_mb: int | None = None
    disk_total_bytes: int | None = None
    disk_used_bytes: int | None = None
    committed_ram_mb: int = 0
    committed_storage_gb: int = 0
    committed_connections: int = 0
    fits: bool = False
    load_after: float | None = None  # the fuller of RAM and disk after placing the plan, 0..1
    reasons: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "reachable": self.reachable,
            "customers": self.customers,
            "mem_total_mb": self.mem_total_mb,
            "disk_total_bytes": self.disk_total_bytes,
            "disk_used_bytes": self.disk_used_bytes,
            "committed_ram_mb": self.committed_ram_mb,
            "committed_storage_gb": self.committed_storage_gb,
            "committed_connections": self.committed_connections,
            "fits": self.fits,
            "load_after": round(self.load_after, 3) if self.load_after is not None else None,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class ServerProposal:
    plan: str
    server: str | None  # None: no server has room (SOP-102: provision a new VPS)
    candidates: list[ServerCapacity]
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "server": self.server,
            "reason": self.reason,
            "candidates": [c.as_json() for c in self.candidates],
        }


_CAPACITY_SCRIPT = r"""grep '^MemTotal:' /proc/meminfo
df -P -B1 -- "$1" | tail -n 1
"""


def measure_capacity(
    runner: Runner,
    server: Server,
    plans: Mapping[str, Plan],
    customers: Sequence[Customer],
    plan: Plan,
) -> ServerCapacity:
    """RAM and disk of ``server`` (one command) against the plans of its customers plus ``plan``.

    RAM: the plans' RAM together within the machine's memory. Disk: the larger of what is used
    and what the plans promise, plus the new plan, within DISK_FILL_LIMIT of the data disk.
    Connection limits are reported, not enforced: pgBouncer pools them.
    """
    mine = [c for c in customers if c.server == server.name]
    reasons: list[str] = []
    ram = storage = conns = 0
    for c in mine:
        p = plans.get(c.plan or "")
        if p is None:
            reasons.append(f"{c.name} has no known plan; counted as nothing")
            continue
        ram, storage, conns = ram + p.ram_mb, storage + p.storage_gb, conns + p.connection_limit
    try:
        out = runner.run(["bash", "-c", _CAPACITY_SCRIPT, "dbops-capacity", server.data_path])
        if not out.ok:
            raise script_error(out, "reading memory and disk")
        lines = out.stdout.splitlines()
        mem_mb = int(lines[0].split()[1]) // 1024
        df = lines[1].split()
        disk_total, disk_used = int(df[1]), int(df[2])
    except (DbopsError, IndexError, ValueError) as exc:
        why = exc.message if isinstance(exc, DbopsError) else "unreadable /proc/meminfo or df"
        return ServerCapacity(server.name, False, len(mine), reasons=(why[:200],))
    ram_after = (ram + plan.ram_mb) / mem_mb if mem_mb else 1.0
    disk_need = max(storage * GB, disk_used) + plan.storage_gb * GB
    disk_after = disk_need / (disk_total * DISK_FILL_LIMIT) if disk_total else 1.0
    if ram_after > 1:
        reasons.append(f"RAM: {ram} MB promised + {plan.ram_mb} MB > {mem_mb} MB on the machine")
    if disk_after > 1:
        reasons.append(
            f"disk: {disk_need // GB} GB needed > {int(DISK_FILL_LIMIT * 100)} % of "
            f"{disk_total // GB} GB"
        )
    return ServerCapacity(
        server=server.name,
        reachable=True,
        customers=len(mine),
        mem_total_mb=mem_mb,
        disk_total_bytes=disk_total,
        disk_used_bytes=disk_used,
        committed_ram_mb=ram,
        committed_storage_gb=storage,
        committed_connections=conns,
        fits=ram_after <= 1 and disk_after <= 1,
        load_after=max(ram_after, disk_after * DISK_FILL_LIMIT),
        reasons=tuple(reasons),
    )


# --- pgBouncer --------------------------------------------------------------------------------

# How dbops marks the pgBouncer lines it wrote, the only ones it ever rewrites. pgbouncer.ini: the
# comment line ``; dbops: <name>`` right above the [databases] entry (an ini line has no room
# for a comment of its own). The auth_file: ``; dbops`` after the user's two fields, on its line
# (pgBouncer ignores the rest of an auth_file line). Any other line with the customer's name stops
# provisioning; every other byte of both files stays as it was.
INI_MARK = "; dbops: {name}"
USERLIST_MARK = "; dbops"
_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_USERLIST_LINE = re.compile(r'^\s*"((?:[^"]|"")*)"\s*(?:"(?:[^"]|"")*")?(.*)$')
_INCLUDE = re.compile(r"^\s*%include\s+(\S.*?)\s*$")
_MAX_INCLUDES = 8


class ForeignEntry(DbopsError):
    """The customer's name is on a line of a pgBouncer file that dbops did not write."""


def _ini_lines(text: str) -> list[tuple[str | None, str | None, str]]:
    """(section, key, the line with its end) for each line of a pgbouncer.ini; key None for
    section headers, comments, ``%include`` and blank lines."""
    out: list[tuple[str | None, str | None, str]] = []
    section: str | None = None
    for raw in text.splitlines(keepends=True):
        line = raw.strip()
        header = _SECTION.match(line)
        if header:
            section = header.group(1).strip().lower()
            out.append((section, None, raw))
            continue
        key: str | None = None
        if line and not line.startswith((";", "#", "%")):
            name, sep, _ = line.partition("=")
            key = name.strip().strip('"') if sep else None
        out.append((section, key, raw))
    return out


def _ini_value(text: str, section: str, key: str) -> str | None:
    """The value of ``key`` in ``section`` (the last one, as pgBouncer reads them)."""
    found = None
    for name, k, raw in _ini_lines(text):
        if name == section and k is not None and k.lower() == key:
            found = raw.partition("=")[2].strip()
    return found


def _marked(raws: list[str], i: int, name: str) -> bool:
    return i > 0 and raws[i - 1].strip() == INI_MARK.format(name=name)


def _eol(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def pgbouncer_with_database(text: str, database: str, entry: str) -> str | None:
    """``text`` (a pgbouncer.ini) with ``database = entry`` under [databases], marked as dbops's
    (``INI_MARK`` above it); None when it is already there as given. ForeignEntry when the
    section has an entry of that name that dbops did not write: it is never repointed. Every
    other line is kept byte for byte."""
    want = f"{database} = {entry}"
    lines = _ini_lines(text)
    raws = [raw for _, _, raw in lines]
    ours: list[int] = []
    for i, (section, key, _) in enumerate(lines):
        if section == "databases" and key is not None and key.lower() == database.lower():
            if key != database or not _marked(raws, i, database):
                raise ForeignEntry(f"a [databases] entry `{key}` that dbops did not make")
            ours.append(i)
    nl = _eol(text)
    if ours:
        first, out = ours[0], list(raws)
        out[first] = want + (raws[first][len(raws[first].rstrip("\r\n")) :] or nl)
        for i in reversed(ours[1:]):  # a second entry of ours: pgBouncer would take one only
            del out[i - 1 : i + 1]
        changed = "".join(out)
        return None if changed == text else changed
    block = [INI_MARK.format(name=database) + nl, want + nl]
    headers = [(i, s) for i, (s, _, raw) in enumerate(lines) if _SECTION.match(raw.strip())]
    starts = [i for i, section in headers if section == "databases"]
    if starts:
        # After the last entry (or comment) of the last [databases] section, before the blank
        # lines that end it: an entry after a %include could land in another section.
        at = starts[-1] + 1
        for i in range(starts[-1] + 1, len(lines)):
            if lines[i][0] != "databases" or _SECTION.match(raws[i].strip()):
                break
            if raws[i].strip() and not _INCLUDE.match(raws[i]):
                at = i + 1
    else:
        at = next((i for i, raw in enumerate(raws) if _SECTION.match(raw.strip())), len(raws))
        block = [f"[databases]{nl}", *block, nl]
    if at > 0 and not raws[at - 1].endswith("\n"):
        raws[at - 1] += nl
    return "".join(raws[:at] + block + raws[at:])


def _userlist_entry(line: str) -> tuple[str | None, str]:
    """(user, what follows the two fields) of an auth_file line; user None for anything else."""
    found = _USERLIST_LINE.match(line.rstrip("\r\n"))
    if not found:
        return None, ""
    return found.group(1).replace('""', '"'), found.group(2).strip()


def userlist_with(text: str, role: str, secret: str) -> str:
    """A pgBouncer auth_file with ``"role" "secret"``, marked as dbops's (``USERLIST_MARK``),
    in place of the role's own earlier line. ForeignEntry when a line for ``role`` is not
    dbops's: it is never replaced. Every other line is kept byte for byte."""
    want = f'"{role}" "{secret}" {USERLIST_MARK}'
    raws = text.splitlines(keepends=True)
    ours: list[int] = []
    for i, raw in enumerate(raws):
        user, rest = _userlist_entry(raw)
        if user is None or user.lower() != role.lower():
            continue
        if user != role or rest != USERLIST_MARK:
            raise ForeignEntry(f"a line for `{user}` in the auth_file that dbops did not make")
        ours.append(i)
    nl = _eol(text)
    if ours:
        raws[ours[0]] = want + (raws[ours[0]][len(raws[ours[0]].rstrip("\r\n")) :] or nl)
        for i in reversed(ours[1:]):
            del raws[i]
        return "".join(raws)
    if raws and not raws[-1].endswith("\n"):
        raws[-1] += nl
    return "".join([*raws, want + nl])


def pgbouncer_names(
    ini: str, users: str, *, ini_path: str = "pgbouncer.ini", auth_file: str = "the auth_file"
) -> dict[str, str]:
    """Every name in a server's pgBouncer files that dbops did not write, lowercased: [databases]
    aliases and [users] entries, admin_users, stats_users, auth_user, auth_file users; name ->
    what it is, for a refusal. ``ini`` with its ``%include`` files in place."""
    found: dict[str, str] = {}
    lines = _ini_lines(ini)
    raws = [raw for _, _, raw in lines]
    for i, (section, key, raw) in enumerate(lines):
        if key is None:
            continue
        if section == "databases" and key != "*" and not _marked(raws, i, key):
            found.setdefault(key.lower(), f"a [databases] entry in {ini_path}")
        elif section == "users":
            found.setdefault(key.lower(), f"a [users] entry in {ini_path}")
        elif section == "pgbouncer" and key.lower() in ("admin_users", "stats_users", "auth_user"):
            for listed in raw.partition("=")[2].split(","):
                if listed.strip().strip('"'):
                    found.setdefault(
                        listed.strip().strip('"').lower(), f"one of {key.lower()} in {ini_path}"
                    )
    for raw in users.splitlines():
        user, rest = _userlist_entry(raw)
        if user is not None and rest != USERLIST_MARK:
            found.setdefault(user.lower(), f"a user in {auth_file}")
    return {name: f"{what}, not made by dbops" for name, what in found.items()}


def read_pgbouncer_ini(runner: Runner, path: str, text: str | None = None) -> str:
    """pgbouncer.ini (``text`` when it was read already) as pgBouncer reads it: each
    ``%include`` line replaced by the file it names (a relative name taken from the ini's
    directory), up to _MAX_INCLUDES deep."""

    def expand(text: str, where: str, depth: int) -> str:
        out: list[str] = []
        for raw in text.splitlines(keepends=True):
            include = _INCLUDE.match(raw)
            if not include:
                out.append(raw)
                continue
            name = include.group(1).strip('"')
            target = posixpath.join(posixpath.dirname(where), name)
            if depth >= _MAX_INCLUDES:
                raise DbopsError(f"{path} nests %include deeper than {_MAX_INCLUDES} files.")
            try:
                included = read_remote_file(runner, target)
            except DbopsError as exc:
                raise DbopsError(
                    f"cannot read {target}, which {where} includes: {exc.message[:150]}"
                ) from None
            body = expand(included, target, depth + 1)
            out.append(body if body.endswith("\n") or not body else body + "\n")
        return "".join(out)

    return expand(read_remote_file(runner, path) if text is None else text, path, 0)


_REWRITE_SCRIPT = r"""umask 077
if [ -e "$1" ]; then cp -p -- "$1" "$1.dbops-tmp"; fi
cat > "$1.dbops-tmp" && mv -f -- "$1.dbops-tmp" "$1"
"""


def rewrite_remote_file(runner: Runner, path: str, text: str) -> None:
    """Replace a file's content from stdin, keeping its owner and mode, renamed into place."""
    result = runner.run(
        ["bash", "-c", _REWRITE_SCRIPT, "dbops-rewrite", path], stdin=text.encode("utf-8")
    )
    if not result.ok:
        raise script_error(result, f"rewriting {path}")


def read_remote_file(runner: Runner, path: str, *, missing_ok: bool = False) -> str:
    result = runner.run(["cat", "--", path])
    if not result.ok and missing_ok and "No such file" in result.stderr:
        return ""
    return result.check().stdout


# --- the job ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProvisionResult:
    """What provisioning did; never the password (that went only to the customer)."""

    customer: str
    server: str
    plan: str
    database: str
    role: str
    host: str
    port: int
    email: str
    steps: list[str]
    resumed: bool
    already_done: bool
    welcome_sent_at: datetime | None
    warnings: list[str] = field(default_factory=list)
    # False: the event log was down for some of this run's events; they are spooled.
    recorded: bool = True

    @property
    def state(self) -> str:
        """What provisioning reached, in words."""
        said = "already provisioned" if self.already_done else "provisioned"
        return said if self.recorded else f"{said}; {RECORD_LATER}"

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "plan": self.plan,
            "database": self.database,
            "role": self.role,
            "host": self.host,
            "port": self.port,
            "email": self.email,
            "steps": self.steps,
            "resumed": self.resumed,
            "already_done": self.already_done,
            "welcome_sent_at": self.welcome_sent_at.isoformat() if self.welcome_sent_at else None,
            "warnings": self.warnings,
            "recorded": self.recorded,
        }

    def summary(self) -> str:
        if self.already_done:
            return f"{self.customer} was already provisioned on {self.server}; nothing to do."
        how = "finished" if self.resumed else "provisioned"
        text = (
            f"{self.customer} {how} on {self.server} (plan {self.plan}): database "
            f"{self.database}, role {self.role}, {self.host}:{self.port}; welcome email sent to "
            f"{self.email}."
        )
        if not self.recorded:
            text += f" The event log is down: {RECORD_LATER}."
        return text + ("" if not self.warnings else " Warnings: " + "; ".join(self.warnings))


Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class ProvisionPreview:
    """What ``Provisioner.provision`` will do with these arguments, found before it does it."""

    customer: str
    plan: str
    server: str
    email: str
    resumed: bool  # an earlier run stopped part-way: this one finishes it
    why: str  # why this server: the capacity proposal's reason, "" when it was named
    steps_done: tuple[str, ...] = ()
    last_error: str | None = None


@dataclass(frozen=True)
class _PgBouncerFiles:
    ini: str  # pgbouncer.ini as it is (what is rewritten)
    full: str  # with its %include files in place (what is read)
    auth_file: str | None
    users: str
    taken: dict[str, str]  # names dbops did not write -> what they are (pgbouncer_names)


def fleet_roles(fleet: Fleet) -> dict[str, str]:
    """The roles fleet.toml's DSNs log in as (each server's monitoring ``dsn`` and
    ``admin_dsn``): name -> what it is, for a refusal."""
    found: dict[str, str] = {}
    for server in fleet.servers:
        for key, what in (("dsn", "monitoring role"), ("admin_dsn", "admin role")):
            dsn = getattr(server, key)
            user = _dsn_user(dsn) if dsn else None
            if user:
                found.setdefault(user, f"the {what} in {server.name}'s {key} in fleet.toml")
    return found


def _check_resume(job: ProvisionJob, plan: str, server: str | None, email: str) -> None:
    """Running provisioning again finishes the job it started: with the same arguments."""
    if server is not None and server != job.server:
        raise DbopsError(
            f"{job.customer}'s provisioning started on {job.server}, not {server}.",
            hint=f"Run it again on {job.server} to finish it.",
        )
    if plan != job.plan or email != job.email:
        raise DbopsError(
            f"{job.customer}'s provisioning started with plan {job.plan} for "
            f"{job.email}; run it again with those to finish it.",
        )


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


class Provisioner(FleetAccess):
    """Server proposals and provisioning; one per process.

    ``failpoints``: a test seam, names like ``after:role`` at which a run stops with an error.
    """

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        runners: RunnerPool | None = None,
        *,
        smtp_url: str | None,
        smtp_sender: str | None = None,
        public_host: Callable[[Server], str] | None = None,
        backups: Backups | None = None,
        clock: Callable[[], datetime] = utcnow,
        send_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        # The welcome email speaks for the business in fleet.toml: none, no sender.
        mail.require_branding(smtp_url, self.fleet.business)
        self.smtp_url = smtp_url
        self.smtp_sender = smtp_sender
        self.public_host = public_host or (lambda server: server.host)
        self._backups = backups
        self.clock = clock
        self.send_options = dict(send_options or {})
        self.failpoints: set[str] = set()
        self._lock = threading.Lock()

    @property
    def backups(self) -> Backups:
        with self._lock:
            if self._backups is None:
                self._backups = Backups(self.engine, self.events, self._fleet, self._runners)
            return self._backups

    # -- choosing a server ---------------------------------------------------------------------

    def propose_server(self, plan: str) -> ServerProposal:
        """The server with the most room left after placing ``plan`` (SOP-102: verify capacity);
        ``server`` None with the reasons when none has room."""
        fleet = self.fleet
        chosen = fleet.plan(plan)
        customers = list_customers(self.engine)

        def one(server: Server) -> ServerCapacity:
            try:
                runner = self.runners.get(server.name)
            except DbopsError as exc:
                return ServerCapacity(server.name, False, reasons=(exc.message[:200],))
            return measure_capacity(runner, server, fleet.plans, customers, chosen)

        with ThreadPoolExecutor(max_workers=max(1, min(8, len(fleet.servers)))) as pool:
            found = list(pool.map(one, fleet.servers))
        fitting = sorted(
            (c for c in found if c.fits),
            key=lambda c: (c.load_after or 0.0, c.customers, c.server),
        )
        ranked = fitting + [c for c in found if not c.fits]
        if not fitting:
            why = "; ".join(f"{c.server}: {', '.join(c.reasons) or 'full'}" for c in found)
            return ServerProposal(plan, None, ranked, f"no server has room for {plan}: {why}")
        best = fitting[0]
        return ServerProposal(
            plan,
            best.server,
            ranked,
            f"{best.server} has the most room after placing {plan} "
            f"({round((best.load_after or 0) * 100)} % of its RAM or disk line used)",
        )

    # -- provisioning --------------------------------------------------------------------------

    def job(self, customer: str) -> ProvisionJob | None:
        with Session(self.engine) as session:
            return session.get(ProvisionJob, validate_name(customer))

    def provision(
        self,
        customer: str,
        plan: str,
        server: str | None = None,
        *,
        email: str,
        actor: str,
        stripe_customer: str | None = None,
        stripe_subscription: str | None = None,
        resend_welcome: bool = False,
        progress: Progress | None = None,
    ) -> ProvisionResult:
        """Provision ``customer`` (SOP-103), or finish an earlier run that failed.

        ``server`` None: the one ``propose_server`` picks (on a first run). Any failure settles
        the job as failed and is a DbopsError saying where it stopped, what was done (kept) and
        that running it again finishes the job; it never holds the password.

        The events are written best-effort (storage.spool): an event log that is down never
        stops provisioning half-way; ``recorded`` on the result says whether all are stored.
        """
        plan_cfg = self._check_arguments(customer, plan, server, email)
        if self.job(customer) is None:
            # A new customer: its names are checked on the server before anything is made
            # (the job's first step checks them again, and from then on they are the job's).
            server, _ = self._place(customer, plan, server)
        job, resumed = self._open_job(customer, plan, server, email, actor, stripe_customer)
        if job.status == "done":
            return self._result(job, [], resumed=True, already_done=True)
        owner = f"{uuid.uuid4().hex}"
        self._claim(job, owner, actor)
        target = self.fleet.server(job.server)
        runner = self.runners.get(target.name)
        done: list[str] = list(job.steps)
        warnings: list[str] = []
        password: str | None = None
        current = "start"
        kept: list[str] = []  # events of this run the log could not take yet (spooled)

        def note(kind: str, payload: dict[str, Any]) -> None:
            if not record(self.events, kind, customer, payload, actor=actor):
                kept.append(kind)

        def mark(step: str, **payload: Any) -> None:
            if step not in done:
                done.append(step)
            self._update(customer, steps=list(done))
            note("provision.step", {"server": target.name, "step": step, **payload})
            if progress is not None:
                try:
                    progress(step, payload.get("detail", ""))
                except Exception:  # a progress message that cannot be posted stops nothing
                    log.warning("provisioning %s: progress for %s not delivered", customer, step)
            if f"after:{step}" in self.failpoints:
                raise DbopsError(f"failpoint after:{step} (a test stopped here on purpose).")

        try:
            note(
                "provision.started",
                {
                    "server": target.name,
                    "plan": plan,
                    "email": email,
                    "resumed": resumed,
                    "steps_done": list(done),
                },
            )
            if job.welcome == "sending" and not resend_welcome:
                raise DbopsError(
                    f"an earlier run stopped while sending {customer}'s welcome email to "
                    f"{job.email}; it may have been delivered.",
                    hint="Check with the customer; to send a new password anyway, run again "
                    "with resend_welcome.",
                )
            current = "names"
            if not job.names_claimed:
                self._claim_names(runner, target, customer)
                self._update(customer, names_claimed=True)
            mark("names")
            current = "role"
            need_password = job.welcome != "sent"
            if need_password:
                password = generate_password()
            created = self._role(runner, target, customer, plan_cfg, password)
            mark("role", detail="created" if created else "password set again")
            current = "database"
            made = self._database(runner, target, customer)
            mark("database", detail="created" if made else "already there")
            current = "privileges"
            self._privileges(runner, target, customer)
            mark("privileges")
            current = "pgbouncer"
            port = self._pgbouncer(runner, target, customer, password)
            mark("pgbouncer", detail="registered" if target.pgbouncer_ini else "not configured")
            current = "customer"
            upsert_customers(
                self.engine,
                [Customer(customer, target.name, customer, customer, plan, email, "active")],
            )
            if stripe_customer:
                try:
                    link_stripe_customer(
                        self.engine,
                        customer,
                        stripe_customer,
                        subscription=stripe_subscription,
                        email=email,
                    )
                except ValueError as exc:
                    raise DbopsError(str(exc)) from None
            mark("customer", detail="backups and monitoring on")
            current = "connection_test"
            host, port, ssl = self._connection_test(target, customer, password, port)
            mark("connection_test", detail=f"logged in as {customer} at {host}:{port}")
            current = "first_backup"
            try:
                first_backup = self.backups.take_backup(customer, actor).stamp
            except Exception as exc:  # not worth holding back a paying customer for
                why = exc.message if isinstance(exc, DbopsError) else type(exc).__name__
                warnings.append(f"first backup failed ({why[:120]}); the nightly run retries")
                first_backup = "failed; the nightly run will take it"
            mark("first_backup", detail=first_backup)
            current = "welcome"
            if job.welcome != "sent":
                assert password is not None and ssl is not None
                self._welcome(job, target, customer, password, host, port, ssl, actor)
            mark("welcome", detail=f"sent to {email}")
        except BaseException as exc:
            # Whatever stopped it: the job settles as failed (a run again finishes it, keeping
            # what was done), the failure is recorded, and the message says how far it got.
            if isinstance(exc, DbopsError):
                message = exc.message
            else:
                message = f"an unexpected error ({type(exc).__name__})"
                log.error("provisioning %s failed at %s", customer, current, exc_info=exc)
            message = _scrub(message, password)
            try:
                self._update(customer, status="failed", last_error=message[:300], owner=None,
                             lease_until=None)  # fmt: skip
            except Exception as error:  # dbops' own database: the claim's lease ends it
                log.warning(
                    "provisioning %s: the job could not be marked failed (%s); its claim ends "
                    "with its lease (%s)",
                    customer,
                    type(error).__name__,
                    CLAIM_LEASE,
                )
            failed = {"server": target.name, "step": current, "error": message[:300]}
            note("provision.failed", {**failed, "steps_done": list(done)})
            if not isinstance(exc, Exception):
                raise
            so_far = ", ".join(done) if done else "nothing"
            later = (
                ""
                if not kept or caught_up(self.events)
                else f" The event log is down: {RECORD_LATER}."
            )
            raise DbopsError(
                f"provisioning {customer} stopped at {current}: {message} Done so far "
                f"(kept): {so_far}.{later}",
                hint=_scrub(exc.hint, password)
                if isinstance(exc, DbopsError) and exc.hint
                else "Fix the cause and run it again: it finishes the job, keeping what was done.",
            ) from (None if isinstance(exc, DbopsError) else exc)
        finally:
            password = None
        now = self.clock()
        self._update(
            customer, status="done", finished_at=now, owner=None, lease_until=None, last_error=None
        )
        final = self.job(customer)
        assert final is not None
        result = self._result(final, done, resumed=resumed, already_done=False, host=host,
                              port=port, warnings=warnings)  # fmt: skip
        finished = result.as_json()
        del finished["recorded"]  # known only once this event is written or kept
        note("provision.done", finished)
        return replace(result, recorded=not kept or caught_up(self.events))

    def preview(
        self, customer: str, plan: str, server: str | None = None, *, email: str
    ) -> ProvisionPreview:
        """What ``provision`` with these arguments would do, found without changing anything:
        the server (chosen by capacity unless named, or where an earlier run started), and
        every refusal ``provision`` would make before creating anything (names included)."""
        self._check_arguments(customer, plan, server, email)
        job = self.job(customer)
        if job is not None:
            _check_resume(job, plan, server, email)
            if job.status == "done":
                raise DbopsError(
                    f"{customer} was already provisioned on {job.server}; nothing to do.",
                    hint=f"`/db status {customer}` shows it.",
                )
            return ProvisionPreview(
                customer, plan, job.server, email, resumed=True, why="where it started",
                steps_done=tuple(job.steps), last_error=job.last_error,
            )  # fmt: skip
        chosen, why = self._place(customer, plan, server)
        return ProvisionPreview(customer, plan, chosen, email, resumed=False, why=why)

    def check_name(self, customer: str, server: str | None = None) -> None:
        """Refuse ``customer`` as a new customer's name (its role and database): reserved on
        every server (core.names), a role fleet.toml's DSNs log in as, and with ``server``
        what that server has: a PostgreSQL role or database, a name in its pgBouncer files."""
        validate_new_name(customer)
        why = fleet_roles(self.fleet).get(customer)
        if why is not None:
            raise refuse_name(customer, why)
        if server is not None:
            target = self.fleet.server(server)
            self._claim_names(self.runners.get(target.name), target, customer)

    def _check_arguments(self, customer: str, plan: str, server: str | None, email: str) -> Plan:
        validate_new_name(customer)
        plan_cfg = self.fleet.plan(plan)
        if not _ADDRESS.fullmatch(email or ""):
            raise DbopsError(f"{(email or '')[:60]!r} is not an email address.")
        if server is not None:
            validate_server_name(server)
            self.fleet.server(server)
        return plan_cfg

    def _place(self, customer: str, plan: str, server: str | None) -> tuple[str, str]:
        """For a new customer: the server (``server``, else the one with the most room) and why,
        once the name is known to be free there."""
        self._refuse_known(customer)
        self.check_name(customer)  # what needs no server first: no capacity measured for it
        why = ""
        if server is None:
            proposal = self.propose_server(plan)
            if proposal.server is None:
                raise DbopsError(proposal.reason, hint="Add a server to the fleet (SOP-102).")
            server, why = proposal.server, proposal.reason
        self.check_name(customer, server)
        return server, why

    def _refuse_known(self, customer: str) -> None:
        try:
            known = get_customer(self.engine, customer)
        except NotFound:
            return
        raise DbopsError(
            f"{customer} is already a customer (on {known.server}).",
            hint="Pick another name for a new customer.",
        )

    def _open_job(
        self,
        customer: str,
        plan: str,
        server: str | None,
        email: str,
        actor: str,
        stripe_customer: str | None,
    ) -> tuple[ProvisionJob, bool]:
        existing = self.job(customer)
        if existing is not None:
            _check_resume(existing, plan, server, email)
            return existing, True
        self._refuse_known(customer)
        chosen = server
        if chosen is None:
            proposal = self.propose_server(plan)
            if proposal.server is None:
                raise DbopsError(proposal.reason, hint="Add a server to the fleet (SOP-102).")
            chosen = proposal.server
        now = self.clock()
        with Session(self.engine) as session:
            session.add(
                ProvisionJob(
                    customer=customer,
                    server=chosen,
                    plan=plan,
                    email=email,
                    actor=actor,
                    stripe_customer=stripe_customer,
                    created_at=now,
                    updated_at=now,
                )
            )
            try:
                session.commit()
            except Exception:
                session.rollback()
                again = self.job(customer)
                if again is None:
                    raise
                return again, True
        job = self.job(customer)
        assert job is not None
        return job, False

    def _claim(self, job: ProvisionJob, owner: str, actor: str) -> None:
        now = self.clock()
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(ProvisionJob)
                .where(
                    col(ProvisionJob.customer) == job.customer,
                    or_(col(ProvisionJob.owner).is_(None), col(ProvisionJob.lease_until) < now),
                )
                .values(
                    owner=owner,
                    lease_until=now + CLAIM_LEASE,
                    status="running",
                    attempts=col(ProvisionJob.attempts) + 1,
                    updated_at=now,
                )
            )
        if taken.rowcount != 1:
            raise DbopsError(
                f"provisioning of {job.customer} is already running.",
                hint="Wait for it to finish; `/db log " + job.customer + "` shows its steps.",
            )

    def _update(self, customer: str, **values: Any) -> None:
        values.setdefault("updated_at", self.clock())
        with self.engine.begin() as conn:
            conn.execute(
                update(ProvisionJob).where(col(ProvisionJob.customer) == customer).values(**values)
            )

    def _result(
        self,
        job: ProvisionJob,
        steps: list[str],
        *,
        resumed: bool,
        already_done: bool,
        host: str | None = None,
        port: int | None = None,
        warnings: list[str] | None = None,
    ) -> ProvisionResult:
        server = self.fleet.server(job.server)
        if host is None or port is None:
            # Where customers connect: pgBouncer where the server has it (the email said so).
            port = server.pgbouncer_port if server.pgbouncer_ini else _pg_port(server)
            host = self.public_host(server)
        return ProvisionResult(
            customer=job.customer,
            server=job.server,
            plan=job.plan,
            database=job.customer,
            role=job.customer,
            host=host,
            port=port,
            email=job.email,
            steps=steps or list(job.steps),
            resumed=resumed,
            already_done=already_done,
            welcome_sent_at=_aware(job.welcome_sent_at),
            warnings=warnings or [],
        )

    # -- the steps -----------------------------------------------------------------------------

    @staticmethod
    def _exists(runner: Runner, server: Server, customer: str) -> tuple[bool, bool]:
        found = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT json_build_array("
                "EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {n}), "
                "EXISTS (SELECT 1 FROM pg_database WHERE datname = {n}))"
            ).format(n=sql.Literal(customer)),
        )
        return bool(found[0]), bool(found[1])

    def _claim_names(self, runner: Runner, server: Server, customer: str) -> None:
        role, database = self._exists(runner, server, customer)
        if role or database:
            what = " and ".join(
                w for w, there in (("a role", role), ("a database", database)) if there
            )
            raise DbopsError(
                f"{server.name} already has {what} named {customer}, not made by dbops; "
                "nothing was changed.",
                hint="Pick another customer name, or remove the old one by hand first.",
            )
        why = self._pgbouncer_files(runner, server).taken.get(customer)
        if why is not None:
            raise refuse_name(
                customer,
                why,
                status=f"taken on {server.name}",
                hint=f"{CHOOSE_ANOTHER} Nothing was changed; dbops never rewrites a pgBouncer "
                "entry it did not make.",
            )

    @staticmethod
    def _pgbouncer_files(runner: Runner, server: Server) -> _PgBouncerFiles:
        """The server's pgbouncer.ini (its includes in place, for reading) and auth_file."""
        if not server.pgbouncer_ini:
            return _PgBouncerFiles("", "", None, "", {})
        ini = read_remote_file(runner, server.pgbouncer_ini)
        full = read_pgbouncer_ini(runner, server.pgbouncer_ini, ini)
        auth_file = _ini_value(full, "pgbouncer", "auth_file")
        users = read_remote_file(runner, auth_file, missing_ok=True) if auth_file else ""
        taken = pgbouncer_names(
            full, users, ini_path=server.pgbouncer_ini, auth_file=f"the auth_file {auth_file}"
        )
        return _PgBouncerFiles(ini, full, auth_file, users, taken)

    def _role(
        self, runner: Runner, server: Server, customer: str, plan: Plan, password: str | None
    ) -> bool:
        """Create the role, or set its password and limit again; True when created."""
        role, _ = self._exists(runner, server, customer)
        ident = sql.Identifier(customer)
        limit = sql.Literal(plan.connection_limit)
        secret = sql.Literal(scram_sha256_secret(password)) if password is not None else None
        if not role:
            if secret is None:  # pragma: no cover - a welcome sent implies the role exists
                raise DbopsError(f"the role {customer} is gone from {server.name}.")
            stmt = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} CONNECTION LIMIT {}").format(
                ident, secret, limit
            )
        elif secret is not None:
            stmt = sql.SQL("ALTER ROLE {} LOGIN PASSWORD {} CONNECTION LIMIT {}").format(
                ident, secret, limit
            )
        else:
            stmt = sql.SQL("ALTER ROLE {} LOGIN CONNECTION LIMIT {}").format(ident, limit)
        # Keep the statement (and so the secret) out of the server log even when it fails or
        # log_statement is set; best effort for an admin role that may not change these.
        quiet = (
            "DO $q$ BEGIN PERFORM set_config('log_statement', 'none', false); "
            "PERFORM set_config('log_min_error_statement', 'panic', false); "
            "EXCEPTION WHEN insufficient_privilege THEN NULL; END $q$"
        )
        run_sql(runner, server, [quiet, stmt])
        return not role

    @staticmethod
    def _database(runner: Runner, server: Server, customer: str) -> bool:
        _, exists = Provisioner._exists(runner, server, customer)
        if exists:
            return False
        ident = sql.Identifier(customer)
        run_sql(
            runner,
            server,
            [
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8'").format(
                    ident, ident
                ),
                # At once, before anything else can connect to it.
                sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident),
            ],
        )
        return True

    @staticmethod
    def _privileges(runner: Runner, server: Server, customer: str) -> None:
        ident = sql.Identifier(customer)
        users = {_dsn_user(server.dsn), _dsn_user(server.admin_dsn or server.dsn)}
        helpers = [
            sql.Identifier(u) for u in sorted(u for u in users if u and NAME_RE.fullmatch(u))
        ]
        grantees = sql.SQL(", ").join([ident, *helpers])
        statements: list[str | sql.Composable] = [
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident),
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident, grantees),
        ]
        if helpers:
            # Before PUBLIC loses it: the health checks and dbops itself connect to postgres.
            statements.append(
                sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(
                    sql.SQL(", ").join(helpers)
                )
            )
        statements.append("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        run_sql(runner, server, statements)

    def _pgbouncer(
        self, runner: Runner, server: Server, customer: str, password: str | None
    ) -> int:
        """Register the database in pgbouncer.ini (and the role's SCRAM secret in its auth_file
        when it has one), reload; the port customers connect to. Only lines dbops wrote are
        rewritten: a line for the customer that it did not write stops the step with both files
        as they were (checked for both before either is written)."""
        if not server.pgbouncer_ini:
            return _pg_port(server)
        files = self._pgbouncer_files(runner, server)
        params = conninfo_to_dict(server.admin_dsn or server.dsn)
        host = str(params.get("host") or "127.0.0.1")
        entry = f"host={host} port={params.get('port') or 5432} dbname={customer}"
        try:
            if customer in files.taken:
                raise ForeignEntry(files.taken[customer])
            changed = pgbouncer_with_database(files.ini, customer, entry)
            users = (
                userlist_with(files.users, customer, scram_sha256_secret(password))
                if files.auth_file and password is not None
                else None
            )
        except ForeignEntry as exc:
            raise DbopsError(
                f"`{customer}` is taken on {server.name} ({exc.message}); nothing in pgBouncer "
                "was changed.",
                hint="dbops rewrites only the pgBouncer entries it made (marked `; dbops`). Move "
                "that line out of the way by hand if it may go, then run provisioning again: it "
                "finishes the job.",
            ) from None
        if changed is not None:
            rewrite_remote_file(runner, server.pgbouncer_ini, changed)
        if files.auth_file and users is not None:
            rewrite_remote_file(runner, files.auth_file, users)
        runner.run(server.argv(server.pgbouncer_reload_command)).check()
        listen = _ini_value(files.full, "pgbouncer", "listen_port")
        return int(listen) if listen and listen.isdigit() else 6432

    def _connection_test(
        self, server: Server, customer: str, password: str | None, port: int
    ) -> tuple[str, int, str | None]:
        """Log in as the customer, as their application will (the host the bot reaches the
        server's PostgreSQL on, the customer-facing port); (host for the email, port, what the
        email says of SSL: ``ssl_policy``; None when there was no password to log in with)."""
        params = conninfo_to_dict(server.dsn)
        host = str(params.get("host") or server.host)
        if password is None:
            return self.public_host(server), port, None
        keep = {k: str(v) for k, v in params.items() if k in ("sslmode", "sslrootcert", "hostaddr")}
        # Ask for SSL the way libpq's default does, so the answer says whether it is offered
        # on this path (pgBouncer's own TLS when it is in front); a stricter mode stays.
        if keep.get("sslmode") not in ("require", "verify-ca", "verify-full"):
            keep["sslmode"] = "prefer"
        conninfo = make_conninfo(
            host=host,
            port=str(port),
            dbname=customer,
            user=customer,
            password=password,
            connect_timeout="5",
            application_name=APP_NAME,
            **keep,
        )
        try:
            with psycopg.connect(conninfo) as conn:
                row = conn.execute("SELECT current_user, current_database()").fetchone()
                encrypted = bool(conn.pgconn.ssl_in_use)
        except psycopg.Error as exc:
            last = _scrub(str(exc).strip().splitlines()[-1] if str(exc).strip() else "", password)
            raise DbopsError(
                f"the connection test as {customer} on {server.name} failed: {last[:200]}"
            ) from None
        if row != (customer, customer):
            raise DbopsError(f"the connection test as {customer} landed in {row!r}.")
        return self.public_host(server), port, ssl_policy(server, encrypted, port)

    def _welcome(
        self,
        job: ProvisionJob,
        server: Server,
        customer: str,
        password: str,
        host: str,
        port: int,
        ssl: str,
        actor: str,
    ) -> None:
        # sslmode=require where SSL is there to ask for; libpq's default where it is not.
        query = "?sslmode=require" if ssl in ("require", "prefer") else ""
        context = {
            **mail.branding(self.fleet.business),
            "customer": customer,
            "host": host,
            "port": port,
            "database": customer,
            "user": customer,
            "password": password,
            "ssl": ssl,
            "connection_string": f"postgresql://{customer}:{password}@{host}:{port}/{customer}{query}",
        }
        message = mail.render(WELCOME, context, to=[job.email], secret=True)
        self._update(customer, welcome="sending")
        try:
            mail.send(
                message,
                self.smtp_url,
                events=self.events,
                actor=actor,
                subject=customer,
                sender=self.smtp_sender,
                **self.send_options,
            )
        except DbopsError:
            # The server refused or was not there: nothing was delivered, a retry is safe.
            self._update(customer, welcome="failed")
            raise
        self._update(customer, welcome="sent", welcome_sent_at=self.clock())


def ssl_policy(server: Server, encrypted: bool, port: int | None = None) -> str:
    """What the welcome email states of SSL ("require", "prefer", "off"): the server's ``ssl`` in
    fleet.toml, else what the customer's connection test negotiated asking as libpq's default
    does ("prefer" when it was encrypted, "off" when not). "require" comes only from the file:
    whether a hostssl-only rule applies cannot be read without superuser. A file that says
    SSL is there when the connection found none, or the reverse, is an error: the email must
    not promise what the server does not do."""
    if server.ssl is None:
        return "prefer" if encrypted else "off"
    if (server.ssl != "off") != encrypted:
        where = f" on port {port}" if port else ""
        seen = "was encrypted" if encrypted else "was not encrypted (SSL not offered)"
        raise DbopsError(
            f"fleet.toml says ssl = {server.ssl!r} for {server.name}, but the customer's "
            f"connection{where} {seen}.",
            hint="Fix the server's SSL (ssl in postgresql.conf, client_tls_* in pgbouncer.ini) "
            f"or the ssl field of {server.name} in fleet.toml (or leave it out), and run "
            "provisioning again: it finishes the job.",
        )
    return server.ssl


def _dsn_user(dsn: str) -> str | None:
    try:
        user = conninfo_to_dict(dsn).get("user")
    except psycopg.ProgrammingError:
        return None
    return str(user) if user else None


def _pg_port(server: Server) -> int:
    port = conninfo_to_dict(server.dsn).get("port")
    return int(port) if port and str(port).isdigit() else 5432


__all__ = [
    "INI_MARK",
    "STEPS",
    "USERLIST_MARK",
    "ForeignEntry",
    "ProvisionPreview",
    "ProvisionResult",
    "Provisioner",
    "ServerCapacity",
    "ServerProposal",
    "fleet_roles",
    "generate_password",
    "measure_capacity",
    "pgbouncer_names",
    "pgbouncer_with_database",
    "read_pgbouncer_ini",
    "scram_sha256_secret",
    "ssl_policy",
    "userlist_with",
]
