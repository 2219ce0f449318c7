"""Engines and sessions for SQLite (the default) and PostgreSQL, and work with a deadline.

SQLite runs in WAL mode with a busy timeout and foreign keys on. The driver is put in autocommit
mode so that SQLAlchemy's ``begin`` event can issue the BEGIN itself: ordinary transactions are
deferred, and a connection with the execution option ``sqlite_begin="IMMEDIATE"`` takes the write
lock up front (the event log does, so two writers can never read the same chain head).
PostgreSQL goes through psycopg 3 with a connection pool.

``run_with_deadline`` runs database work on a worker thread for a caller who waits no longer
than the deadline, whatever the database does: a black-holed server (no answer, no reset) would
otherwise hold a pre-ping, a lock wait or a COMMIT for as long as TCP allows. When the deadline
passes, the connection in use is broken from the caller's side (see ``Attempt``) so the worker
is freed too, and nothing commits after the caller was told it failed.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import SingletonThreadPool
from sqlmodel import Session

SQLITE_BUSY_TIMEOUT_MS = 30_000
# PostgreSQL, for every user of the engine. A connect that takes longer than an event append's
# whole deadline (storage.events.APPEND_DEADLINE_S) is of no use to anyone; psycopg counts it
# per address tried and never below 2 s. Keepalives and tcp_user_timeout let the kernel give up on
# a peer that vanished (a dropped route answers nothing, not even a reset): idle pooled
# connections within ~25 s, a connection with unacknowledged data within 10 s.
PG_CONNECT_TIMEOUT_S = 5
PG_CONNECT_ARGS: dict[str, Any] = {
    "application_name": "dbops",
    "connect_timeout": PG_CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

T = TypeVar("T")


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def normalise_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.removeprefix("postgres://")
    return url


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, echo=echo, pool_size=pool_size, connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=dict(PG_CONNECT_ARGS),
    )
    watch_pings(engine)
    event.listen(engine, "do_connect", _pg_connect)
    return engine


def _sqlite_connect(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
    record.info["busy_timeout_ms"] = SQLITE_BUSY_TIMEOUT_MS


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise ValueError(f"bad sqlite_begin mode {mode!r}")
    # BEGIN IMMEDIATE waits for the write lock in SQLite's busy handler, which sqlite3_interrupt
    # does not end: inside an Attempt the wait is cut to the time left instead of 30 s.
    busy = SQLITE_BUSY_TIMEOUT_MS
    attempt = current_attempt()
    if attempt is not None:
        busy = max(1, min(busy, int(attempt.left() * 1000)))
    info = conn.connection.info
    if info.get("busy_timeout_ms") != busy:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={busy}")
        info["busy_timeout_ms"] = busy
    conn.exec_driver_sql(f"BEGIN {mode}")


def _pg_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    attempt = current_attempt()
    if attempt is None:
        return
    attempt.check()  # nobody waits for this connection any more
    left = int(attempt.left()) + 1
    cparams["connect_timeout"] = max(2, min(int(cparams.get("connect_timeout", left)), left))


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# -- work with a deadline --------------------------------------------------------------------


class DeadlineExceeded(TimeoutError):
    """The database did not finish in time; the work was abandoned and its connection broken."""


class Aborted(Exception):
    """Raised inside abandoned work: whoever waited for it has gone."""


_current = threading.local()


def current_attempt() -> Attempt | None:
    """The Attempt the calling thread is working for, if any."""
    attempt: Attempt | None = getattr(_current, "attempt", None)
    return attempt


class Attempt:
    """Database work with a deadline that another thread can abort.

    The worker registers each DBAPI connection it uses (``watch``; pool pre-pings are registered
    by ``watch_pings``). ``abort`` breaks that connection so the blocked call returns at once: a
    PostgreSQL socket is shut down (psycopg wakes with "server closed the connection"; the socket
    is a dup taken while the connection was known to be open, so a descriptor number reused
    meanwhile is never touched), a SQLite statement is interrupted. After ``abort`` the worker's
    next ``check`` or ``watch`` raises ``Aborted``.
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._aborted = False
        self._conn: Any = None
        self._sock: socket.socket | None = None

    @property
    def aborted(self) -> bool:
        return self._aborted

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise Aborted if the work was abandoned or its deadline has passed."""
        if self._aborted or time.monotonic() >= self.deadline:
            raise Aborted("the deadline passed")

    def watch(self, dbapi_conn: Any) -> None:
        with self._lock:
            if self._aborted:
                raise Aborted("the deadline passed")
            if dbapi_conn is self._conn:
                return
            self._unwatch()
            pgconn = getattr(dbapi_conn, "pgconn", None)
            if pgconn is not None:
                self._sock = socket.socket(fileno=os.dup(pgconn.socket))
            self._conn = dbapi_conn

    def release(self) -> None:
        with self._lock:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._conn, self._sock = None, None

    def abort(self) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            if self._sock is not None:
                with suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            elif self._conn is not None and hasattr(self._conn, "interrupt"):
                with suppress(Exception):
                    self._conn.interrupt()


def watch_pings(engine: Engine) -> None:
    """Register pool pre-pings with the thread's Attempt, so a ping into a black hole can be
    aborted too (SQLAlchemy pings inside ``engine.connect()``, before the caller sees the
    connection). An aborted ping raises Aborted rather than a driver error, so the pool does not
    go on to open a new connection for a caller who has left. Idempotent."""
    dialect: Any = engine.dialect
    if getattr(dialect, "_dbops_watched", False):
        return
    ping: Callable[[Any], bool] = dialect.do_ping

    def do_ping(dbapi_conn: Any) -> bool:
        attempt = current_attempt()
        if attempt is None:
            return ping(dbapi_conn)
        attempt.watch(dbapi_conn)
        try:
            return ping(dbapi_conn)
        except Exception:
            if attempt.aborted:
                raise Aborted("the deadline passed") from None
            raise

    dialect.do_ping = do_ping
    dialect._dbops_watched = True


def run_with_deadline(
    work: Callable[[Attempt], T], seconds: float, *, attempt: Attempt | None = None
) -> T:
    """``work(attempt)`` on a worker thread; its result, or DeadlineExceeded after ``seconds``.

    On the deadline the attempt is aborted (its connection broken) before this returns. If the
    work finished just as the deadline passed, its result is returned: it did happen. An abort
    while a COMMIT is on the wire cannot know whether the server committed; the caller is told
    it failed either way.
    """
    attempt = attempt or Attempt(seconds)
    future = _workers.submit(lambda: _work_in(work, attempt))
    try:
        return future.result(timeout=max(0.0, attempt.left()))
    except FutureTimeout:
        attempt.abort()
        if future.done() and future.exception() is None:
            return future.result()
        raise DeadlineExceeded(f"no answer within {seconds:g} s") from None


def run_inline(
    work: Callable[[Attempt], T], seconds: float, *, attempt: Attempt | None = None
) -> T:
    """``work(attempt)`` on the calling thread, for an engine whose connections belong to one
    thread each (an in-memory SQLite database): the deadline bounds lock waits only."""
    attempt = attempt or Attempt(seconds)
    try:
        return _work_in(work, attempt)
    except Aborted:
        raise DeadlineExceeded(f"no answer within {seconds:g} s") from None


def runs_inline(engine: Engine) -> bool:
    """Whether work on this engine must stay on its caller's thread: a SingletonThreadPool (what
    SQLAlchemy gives an in-memory SQLite database) holds a separate database per thread."""
    return isinstance(engine.pool, SingletonThreadPool)


def _work_in(work: Callable[[Attempt], T], attempt: Attempt) -> T:
    attempt.check()  # queued past its deadline: do nothing
    _current.attempt = attempt
    try:
        return work(attempt)
    finally:
        _current.attempt = None
        attempt.release()


class _Workers:
    """Threads reused from call to call, as many as are busy at once; idle ones leave after a
    minute. Unbounded on purpose: a worker stuck in a connect to a dead server (not abortable;
    bounded by connect_timeout) must never make the next caller queue behind it."""

    IDLE_S = 60.0

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # Also in a forked child, where none of the parent's workers exist.
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._idle = 0  # workers waiting for a job, less the jobs queued for them

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._jobs.put((fn, future))
            if self._idle > 0:
                self._idle -= 1
                return future
        threading.Thread(target=self._run, name="dbops-db-deadline", daemon=True).start()
        return future

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            try:
                fn, future = jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if jobs.empty():  # no job was promised to this worker meanwhile
                        self._idle -= 1
                        return
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            del fn, future
            with self._lock:
                self._idle += 1


_workers = _Workers()
