"""A hostile tenant, for the sandbox: code a customer plants to run with someone else's rights.

``plant`` connects as the customer's own role, into its own database, and plants what a tenant
who wants the server would: functions and operators in ``public`` that shadow the ones dbops's
queries call (better-matching signatures, which outrank pg_catalog's wherever ``public`` is on
the search_path, and the database's own search_path set to put ``public`` first), and code that
PostgreSQL runs by itself: a CHECK constraint, a domain constraint, a column default, a
generated column, an index expression, a trigger, a row-security policy and a materialized
view, on a table with rows (so a restore evaluates them on load). It tries the same shadows in
every other database the role can reach.

Every piece calls ``public.dbops_hostile(via)``, which

* records who runs it: a ``RAISE LOG`` line (``dbops-hostile <tag> via=[...] current_user=...
  session_user=... backend=[...] db=...``), in the server log whatever the transaction does
  (a restore test's scratch database is dropped afterwards), and a row in
  ``public.dbops_hostile_log`` whenever it runs as any role but the customer's own;
* tries to become someone else (``RESET ROLE``, ``RESET SESSION AUTHORIZATION``, ``SET ROLE``
  to the admin) and, from wherever it lands, to escalate: the customer's role made
  SUPERUSER/CREATEROLE/CREATEDB/REPLICATION/BYPASSRLS, granted the server-file and monitoring
  roles, the admin's and the monitor's roles; then goes back to where it was, so the caller
  carries on none the wiser.

``heal`` drops what ``plant`` made and puts every role's attributes and memberships back as they
were before (``snapshot_roles``): a tenant that did escalate leaves nothing behind in the sandbox.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from core.backups import PINNED_SEARCH_PATH
from core.names import validate_name

# What every session here pins, as dbops's own do: the tenant's search_path applies to others.
PINNED = PINNED_SEARCH_PATH
LOG_TABLE = "dbops_hostile_log"
DATA_TABLE = "dbops_hostile_data"
DATA_ROWS = 25
ROLE_FLAGS = ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls")
_TAKE_BACK = {
    "rolsuper": "NOSUPERUSER", "rolcreaterole": "NOCREATEROLE", "rolcreatedb": "NOCREATEDB",
    "rolreplication": "NOREPLICATION", "rolbypassrls": "NOBYPASSRLS",
}  # fmt: skip

# The roles a successful escalation would grant the tenant (those missing on an older server
# are simply not there to grant).
_PRIZES = (
    "pg_execute_server_program", "pg_read_server_files", "pg_write_server_files",
    "pg_read_all_data", "pg_write_all_data", "pg_monitor", "pg_signal_backend",
)  # fmt: skip

# Every statement is built from constants with the tag (hex), the customer's role and the admin
# and monitor roles (validated names) put in by _fill; nothing of the tenant's is run here.
_CORE = r"""
CREATE TABLE public.dbops_hostile_log (
  at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  via text, current_role_name name, session_role_name name, backend text, app text, db name
);
GRANT INSERT ON public.dbops_hostile_log TO PUBLIC;

CREATE FUNCTION public.dbops_hostile_note(via text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $f$
DECLARE
  key pg_catalog.text := via || '/' || current_user || '/' || session_user;
  seen pg_catalog.text := pg_catalog.current_setting('dbops_hostile.seen', true);
  backend pg_catalog.text;
  app pg_catalog.text := pg_catalog.current_setting('application_name', true);
BEGIN
  IF seen IS NOT NULL AND pg_catalog.strpos(seen, '|' || key || '|') OPERATOR(pg_catalog.>) 0
  THEN
    RETURN;  -- once per session and identity: a per-row call must not flood the log
  END IF;
  BEGIN
    PERFORM pg_catalog.set_config('dbops_hostile.seen',
                                  COALESCE(seen, '') || '|' || key || '|', false);
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    SELECT a.backend_type INTO backend FROM pg_catalog.pg_stat_activity a
     WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid();
  EXCEPTION WHEN OTHERS THEN backend := '?';
  END;
  RAISE LOG 'dbops-hostile % via=[%] current_user=% session_user=% backend=[%] app=[%] db=%',
    '@TAG@', via, current_user, session_user, backend, app, pg_catalog.current_database();
  IF current_user OPERATOR(pg_catalog.<>) '@ROLE@'::pg_catalog.name
     OR session_user OPERATOR(pg_catalog.<>) '@ROLE@'::pg_catalog.name THEN
    BEGIN
      INSERT INTO public.dbops_hostile_log (via, current_role_name, session_role_name, backend,
                                            app, db)
      VALUES (via, current_user, session_user, backend, app, pg_catalog.current_database());
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
  END IF;
  -- From wherever it stands: take the server.
  BEGIN
    EXECUTE 'ALTER ROLE @ROLE@ SUPERUSER CREATEROLE CREATEDB REPLICATION BYPASSRLS';
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  FOREACH key IN ARRAY ARRAY[@PRIZES@]::pg_catalog.text[] LOOP
    BEGIN
      EXECUTE pg_catalog.format('GRANT %I TO @ROLE@', key);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
  END LOOP;
END
$f$;

CREATE FUNCTION public.dbops_hostile(via text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $f$
DECLARE
  was_current pg_catalog.name := current_user;
  was_session pg_catalog.name := session_user;
BEGIN
  PERFORM public.dbops_hostile_note(via);
  -- Every way out of this identity, each noted (and escalated from) where it works.
  BEGIN
    EXECUTE 'RESET ROLE';
    PERFORM public.dbops_hostile_note(via || ', then RESET ROLE');
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    EXECUTE 'RESET SESSION AUTHORIZATION';
    PERFORM public.dbops_hostile_note(via || ', then RESET SESSION AUTHORIZATION');
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    EXECUTE 'SET ROLE @ADMIN@';
    PERFORM public.dbops_hostile_note(via || ', then SET ROLE @ADMIN@');
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    EXECUTE 'SET SESSION AUTHORIZATION @ADMIN@';
    PERFORM public.dbops_hostile_note(via || ', then SET SESSION AUTHORIZATION @ADMIN@');
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  -- Back where it was, so whoever called carries on none the wiser.
  BEGIN
    EXECUTE pg_catalog.format('SET SESSION AUTHORIZATION %I', was_session);
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    IF was_current OPERATOR(pg_catalog.=) was_session THEN
      EXECUTE 'RESET ROLE';
    ELSE
      EXECUTE pg_catalog.format('SET ROLE %I', was_current);
    END IF;
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  RETURN true;
END
$f$;
GRANT EXECUTE ON FUNCTION public.dbops_hostile(text), public.dbops_hostile_note(text) TO PUBLIC;

-- Declared IMMUTABLE (a lie) so that index expressions and generated columns may call it.
CREATE FUNCTION public.dbops_hostile_same(v integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN PERFORM public.dbops_hostile('index expression or generated column'); RETURN v; END
$f$;
CREATE FUNCTION public.dbops_hostile_check(v text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN RETURN public.dbops_hostile('check constraint, domain or policy'); END
$f$;
CREATE FUNCTION public.dbops_hostile_default() RETURNS text
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN PERFORM public.dbops_hostile('column default'); RETURN 'default'; END
$f$;
CREATE FUNCTION public.dbops_hostile_trigger() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN PERFORM public.dbops_hostile('trigger'); RETURN COALESCE(NEW, OLD); END
$f$;
CREATE DOMAIN public.dbops_hostile_text AS text CHECK (public.dbops_hostile_check(VALUE));
CREATE TABLE public.dbops_hostile_data (
  id integer PRIMARY KEY,
  v text CHECK (public.dbops_hostile_check(v)),
  d text DEFAULT public.dbops_hostile_default(),
  g integer GENERATED ALWAYS AS (public.dbops_hostile_same(id)) STORED,
  t public.dbops_hostile_text
);
CREATE INDEX dbops_hostile_data_expr ON public.dbops_hostile_data (public.dbops_hostile_same(id));
CREATE TRIGGER dbops_hostile_trigger BEFORE INSERT OR UPDATE OR DELETE
  ON public.dbops_hostile_data FOR EACH ROW EXECUTE FUNCTION public.dbops_hostile_trigger();
INSERT INTO public.dbops_hostile_data (id, v, t)
  SELECT g, 'row ' || g, 'text ' || g FROM pg_catalog.generate_series(1, @ROWS@) AS g;
CREATE POLICY dbops_hostile_policy ON public.dbops_hostile_data
  USING (public.dbops_hostile_check(v));
ALTER TABLE public.dbops_hostile_data ENABLE ROW LEVEL SECURITY;
CREATE MATERIALIZED VIEW public.dbops_hostile_view AS
  SELECT public.dbops_hostile_same(1) AS one;
-- A type named like pg_catalog's: casts to "text" find it wherever public comes first.
CREATE DOMAIN public.text AS pg_catalog.text CHECK (public.dbops_hostile_check(VALUE));
"""
# What the shadows need in another database: the log, the note and the way out.
_SHARED = _CORE.split("-- Declared IMMUTABLE")[0]

# Shadows of what dbops's queries call, and more: each better-matching than pg_catalog's (wins
# wherever public is on the search_path) or the same signature (wins where the database's
# search_path puts public first, which the tenant sets too). Each notes itself and returns
# what the real one would, so nothing looks amiss.
_SHADOWS: tuple[tuple[str, str, str], ...] = (
    # (signature, returns, body expression over $1.. using pg_catalog's own)
    ("quote_ident(name)", "text", "pg_catalog.quote_ident($1::pg_catalog.text)"),
    ("format(text, name, name)", "text", "pg_catalog.format($1, $2, $3)"),
    ("format(text, text)", "text", "pg_catalog.format($1, $2)"),
    ("format(text, name)", "text", "pg_catalog.format($1, $2)"),
    ("version()", "text", "pg_catalog.version()"),
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("current_database()", "name", "pg_catalog.current_database()"),
    ("lower(text)", "text", "pg_catalog.lower($1)"),
    ("pg_size_pretty(bigint)", "text", "pg_catalog.pg_size_pretty($1)"),
    ("pg_database_size(oid)", "bigint", "pg_catalog.pg_database_size($1)"),
    ("pg_backend_pid()", "integer", "pg_catalog.pg_backend_pid()"),
    ("age(xid)", "integer", "pg_catalog.age($1)"),
    (
        "pg_stat_get_last_vacuum_time(oid)",
        "timestamptz",
        "pg_catalog.pg_stat_get_last_vacuum_time($1)",
    ),
    (
        "query_to_xml(text, boolean, boolean, text)",
        "xml",
        "pg_catalog.query_to_xml($1, $2, $3, $4)",
    ),
    ("hostile_eq_text(text, text)", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
    (
        "hostile_eq_oid_regclass(oid, regclass)",
        "boolean",
        "$1 OPERATOR(pg_catalog.=) $2::pg_catalog.oid",
    ),
    ("hostile_count_step(bigint)", "bigint", "$1 OPERATOR(pg_catalog.+) 1"),
)
_OPERATORS = (
    # = on text (same signature: wins where public comes first); = (oid, regclass): an exact
    # match where pg_catalog has only (oid, oid), so it wins wherever public is on the path.
    "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.hostile_eq_text)",
    "CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, "
    "FUNCTION = public.hostile_eq_oid_regclass)",
    "CREATE AGGREGATE public.count(*) (SFUNC = public.hostile_count_step, STYPE = bigint, "
    "INITCOND = '0')",
)
_DROP_OPERATORS = (
    "DROP OPERATOR IF EXISTS public.= (text, text)",
    "DROP OPERATOR IF EXISTS public.= (oid, regclass)",
    "DROP AGGREGATE IF EXISTS public.count(*)",
)
_DROP_CORE = (
    "DROP DOMAIN IF EXISTS public.text",
    "DROP MATERIALIZED VIEW IF EXISTS public.dbops_hostile_view",
    "DROP TABLE IF EXISTS public.dbops_hostile_data",
    "DROP DOMAIN IF EXISTS public.dbops_hostile_text",
    "DROP TABLE IF EXISTS public.dbops_hostile_log",
    *(
        f"DROP FUNCTION IF EXISTS public.{f}"
        for f in (
            "dbops_hostile_same(integer)",
            "dbops_hostile_check(text)",
            "dbops_hostile_default()",
            "dbops_hostile_trigger()",
            "dbops_hostile(text)",
            "dbops_hostile_note(text)",
        )
    ),
)


def _fill(text: str, tag: str, role: str, admin: str, monitor: str) -> str:
    prizes = ", ".join(f"'{p}'" for p in (*_PRIZES, admin, monitor))
    return (
        text.replace("@PRIZES@", prizes)
        .replace("@TAG@", tag)
        .replace("@ROLE@", role)
        .replace("@ADMIN@", admin)
        .replace("@ROWS@", str(DATA_ROWS))
    )


# What the log says ran, for the functions behind an operator or an aggregate.
_BEHIND = {
    "hostile_eq_text": "operator public.= (text, text)",
    "hostile_eq_oid_regclass": "operator public.= (oid, regclass)",
    "hostile_count_step": "aggregate public.count(*)",
}


def _shadow_statements() -> list[str]:
    out = []
    for signature, returns, body in _SHADOWS:
        via = _BEHIND.get(signature.split("(", 1)[0], f"public.{signature}")
        out.append(
            f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql VOLATILE "
            f"AS $f$ BEGIN PERFORM public.dbops_hostile('{via}'); RETURN {body}; END $f$"
        )
    return [*out, *_OPERATORS]


def _drop_shadows() -> list[str]:
    return [
        *_DROP_OPERATORS,
        *(f"DROP FUNCTION IF EXISTS public.{sig}" for sig, _, _ in _SHADOWS),
    ]


def _statements(text: str) -> list[str]:
    """The script split on the semicolons that end statements (not those in $f$ bodies)."""
    parts, current, inside = [], [], False
    for line in text.strip().splitlines():
        if line.count("$f$") % 2:
            inside = not inside
        current.append(line)
        if not inside and line.rstrip().endswith(";"):
            parts.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    if current and "".join(current).strip():
        parts.append("\n".join(current))
    return parts


def pinned(conninfo: str) -> str:
    return make_conninfo(conninfo, options=PINNED)


@dataclass(frozen=True)
class Planted:
    tag: str
    databases: list[str]  # where the shadows went (the tenant's own first)

    def as_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "databases": self.databases}


def plant(conninfo: str, role: str, admin: str, monitor: str) -> Planted:
    """As the tenant (``conninfo``: its role, its database), plant everything; then the shadows
    in every other database it can connect to and create in (none, on a server set up right)."""
    for name in (role, admin, monitor):
        validate_name(name, "role")
    tag = secrets.token_hex(4)

    def fill(text: str) -> str:
        return _fill(text, tag, role, admin, monitor)

    with psycopg.connect(pinned(conninfo), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_catalog.current_database()").fetchone()
        own = str(row[0]) if row else ""
        with conn.transaction():
            for statement in _statements(fill(_CORE)) + _shadow_statements():
                conn.execute(statement)
            # The whole database's search_path, for every role that connects without pinning it.
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(
                    sql.Identifier(own)
                )
            )
        others = [
            str(r[0])
            for r in conn.execute(
                "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn"
                " AND datname OPERATOR(pg_catalog.<>) pg_catalog.current_database()"
                " AND pg_catalog.has_database_privilege(oid, 'CONNECT')"
            ).fetchall()
        ]
    planted = [own]
    for other in others:
        with contextlib.suppress(psycopg.Error):
            target = make_conninfo(pinned(conninfo), dbname=other)
            with psycopg.connect(target, autocommit=True, connect_timeout=5) as conn:
                allowed = conn.execute(
                    "SELECT pg_catalog.has_schema_privilege('public', 'CREATE')"
                ).fetchone()
                if not allowed or not allowed[0]:
                    continue
                with conn.transaction():
                    for statement in _statements(fill(_SHARED)) + _shadow_statements():
                        conn.execute(statement)
                planted.append(other)
    return Planted(tag, planted)


def remove(conninfo: str, databases: Iterable[str]) -> None:
    """As the tenant: drop what ``plant`` made in each of ``databases`` (``Planted.databases``,
    its own first), and the search_path it set on its own."""
    for index, database in enumerate(databases):
        target = make_conninfo(pinned(conninfo), dbname=database)
        try:
            conn = psycopg.connect(target, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            continue  # gone or closed: nothing of it runs anywhere
        with conn, conn.transaction():
            if index == 0:
                reset = sql.SQL("ALTER DATABASE {} RESET search_path")
                conn.execute(reset.format(sql.Identifier(database)))
            for statement in (*_DROP_CORE, *_drop_shadows()):
                conn.execute(statement)


# --- roles: what a tenant might have gained --------------------------------------------------

RoleSnapshot = dict[str, dict[str, Any]]


def snapshot_roles(conn: psycopg.Connection[Any]) -> RoleSnapshot:
    """Every role but PostgreSQL's own (pg_*): its attributes and the roles it is a member of."""
    rows = conn.execute(
        "SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication,"
        " r.rolbypassrls, COALESCE((SELECT pg_catalog.array_agg(DISTINCT g.rolname)"
        "   FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid"
        "  WHERE m.member = r.oid), '{}')"
        " FROM pg_catalog.pg_roles r WHERE r.rolname !~ '^pg_' ORDER BY 1"
    ).fetchall()
    return {
        str(r[0]): {**dict(zip(ROLE_FLAGS, r[1:6], strict=True)), "member_of": sorted(r[6])}
        for r in rows
    }


def gained(before: RoleSnapshot, after: RoleSnapshot) -> list[str]:
    """What any role of ``before`` has now that it had not: attributes and memberships."""
    out = []
    for role, was in sorted(before.items()):
        now = after.get(role)
        if now is None:
            continue
        out += [f"{role}: {flag}" for flag in ROLE_FLAGS if now[flag] and not was[flag]]
        out += [f"{role}: member of {g}" for g in now["member_of"] if g not in was["member_of"]]
    return out


def restore_roles(conn: psycopg.Connection[Any], before: RoleSnapshot) -> list[str]:
    """As the admin: take back whatever ``gained`` finds. Returns what was taken back."""
    taken = gained(before, snapshot_roles(conn))
    for item in taken:
        role, _, what = item.partition(": ")
        ident = sql.Identifier(role)
        if what.startswith("member of "):
            group = sql.Identifier(what.removeprefix("member of "))
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(group, ident))
        else:
            conn.execute(sql.SQL("ALTER ROLE {} {}").format(ident, sql.SQL(_TAKE_BACK[what])))
    return taken


# --- reading what it recorded ----------------------------------------------------------------

_RUN = re.compile(
    r"dbops-hostile (?P<tag>[0-9a-f]+) via=\[(?P<via>[^\]]*)\] current_user=(?P<current>\S+) "
    r"session_user=(?P<session>\S+) backend=\[(?P<backend>[^\]]*)\] app=\[(?P<app>[^\]]*)\] "
    r"db=(?P<db>\S+)"
)


@dataclass(frozen=True)
class Run:
    """One time (per session and identity) the tenant's code ran, as the server log has it."""

    via: str
    current_user: str
    session_user: str
    backend: str
    app: str
    database: str


def runs_in_log(text: str, tag: str) -> list[Run]:
    out = []
    for match in _RUN.finditer(text):
        if match["tag"] == tag:
            out.append(
                Run(
                    match["via"], match["current"], match["session"], match["backend"],
                    match["app"], match["db"],
                )
            )  # fmt: skip
    return out
