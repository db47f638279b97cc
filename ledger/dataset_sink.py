"""The `dataset` backend of `market.sink.Sink`: SQLite by default, PostgreSQL at scale.

Writers enqueue batches and wait; one flusher task merges whatever is queued into a
single transaction (group commit), so a round's many small writes cost one fsync.
All database work runs in one dedicated thread: the event loop never blocks, and
SQLite sees a single writer. Rows go in as value tuples on the driver's own connection:
multi-row inserts on SQLite (ledger/sqlite_insert.py), COPY on PostgreSQL (ledger/pg_copy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dataset
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ledger import sqlite_insert
from ledger.batch_rows import Groups, group, rows
from ledger.markets import ensure_schema
from ledger.schema import KEYS, TABLE_MAP, metadata
from market.core.records import TABLES, Batch, Record

log = logging.getLogger(__name__)

_Item = tuple[Batch, "asyncio.Future[None]"]  # a queued batch and its writer's future


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: lock contention, lost connections, pool timeouts.

    OperationalError also covers a few permanent faults (SQLite's "no such table"); the
    bounded attempts turn those into a late failure, never a hang or a silent drop.
    """
    if isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


_CACHE_KIB = 64 * 1024  # SQLite page cache of the writing connection
_FIRST_WAIT = 0.02  # seconds: the longest first wait before a retry (then doubling, jittered)
_RECORD_TYPES: frozenset[type[Record]] = frozenset(TABLES)


class DatasetSink:
    """Durable ledger over `dataset`/SQLAlchemy; `write()` returns once committed."""

    def __init__(
        self,
        url: str,
        *,
        max_queue: int = 1024,
        retry_attempts: int = 8,
        busy_timeout: float = 5.0,
        retry_wait_max: float = 2.0,
        checkpoint_every: float = 0.5,
        bulk: bool = True,
    ) -> None:
        self.url = url
        # Bulk writes (multi-row inserts on SQLite, COPY on PostgreSQL); False keeps the
        # row-at-a-time statements they replaced, the reference tests and bench compare with.
        self.bulk = bulk
        self.max_queue = max_queue
        self.retry_attempts = retry_attempts
        self.busy_timeout = busy_timeout  # SQLite: how long one attempt waits for a lock
        self.retry_wait_max = retry_wait_max
        self.checkpoint_every = checkpoint_every  # SQLite: seconds between WAL checkpoints
        self.commits = 0  # transactions committed (one per flush)
        self.retries = 0  # transient failures that were retried
        self._db: dataset.Database | None = None
        self._engine: sa.Engine | None = None
        self._inserts: dict[str, Any] = {}  # dialect insert ... on conflict do nothing
        self._raw_sql: dict[str, str] = {}  # SQLite: the same inserts as driver SQL
        self._raw: Any = None  # SQLite: the ledger thread's own driver connection
        self._pg: Any = None  # PostgreSQL, bulk: the same, a pooled psycopg connection
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._entering = 0  # writers blocked on a full queue (close() waits for them)
        self._accepting = False
        self._closed = False
        self._close_lock = asyncio.Lock()
        self._checkpointer: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # one flush at a time: the flusher's or a writer's own

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._closed or self._executor is not None:
            raise RuntimeError("DatasetSink.start() may be called once, before close()")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        loop = asyncio.get_running_loop()
        try:
            # A database still starting up (or locked) is worth the same retries.
            async for attempt in self._retrying():
                with attempt:
                    await loop.run_in_executor(self._executor, self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flusher")
        if self._raw is not None:
            self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="ledger-checkpoint")
        self._accepting = True

    async def write(self, batch: Batch) -> None:
        if not self._accepting or self._queue is None:
            raise RuntimeError("ledger sink is not open (call start(), not after close())")
        # Exactly the record types of market.core.records: the columns follow their fields.
        unknown = {type(r) for r in batch.records} - _RECORD_TYPES
        if unknown:
            names = sorted(t.__qualname__ for t in unknown)
            raise ValueError(f"no ledger table for records of type {names}")
        if not batch.records:
            return
        if self._queue.empty() and not self._flushing.locked():
            # Nothing queued or in flight: flush here rather than wake the flusher (one hop
            # less for every acknowledgement that waits on this write).
            async with self._flushing:
                await self._flush([batch])
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._entering += 1
        try:
            await self._queue.put((batch, future))
        finally:
            self._entering -= 1
        # Shielded: a cancelled writer must not cancel a flush shared with others; its
        # batch may still be committed, which a retried (idempotent) write tolerates.
        await asyncio.shield(future)

    async def read(self, table: str, after: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        """Rows of `table` ordered by key (only where `after[0]` > `after[1]`), read in the
        ledger thread after everything queued before the call."""
        if self._executor is None or self._engine is None:
            raise RuntimeError("ledger sink is not open")
        t = TABLE_MAP[table]
        key: sa.ColumnElement[Any] = t.c[KEYS[table]]
        if self._engine.dialect.name == "postgresql":
            # Byte order, as SQLite's BINARY collation (and ledger_digest): a server's
            # locale collation (en_US...) would order the keys differently.
            key = key.collate("C")
        query = sa.select(t).order_by(key)
        if after is not None:
            query = query.where(t.c[after[0]] > after[1])

        def run() -> list[dict[str, Any]]:
            assert self._engine is not None
            with self._engine.connect() as conn:
                return [{str(k): v for k, v in r._mapping.items()} for r in conn.execute(query)]

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def close(self) -> None:
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._accepting = False
            if self._queue is not None and self._flusher is not None:
                # Drain: wait until every enqueued batch is flushed, including writers
                # that were blocked on a full queue when close() began.
                while True:
                    await self._queue.join()
                    if self._entering == 0:
                        break
                    await asyncio.sleep(0)
                async with self._flushing:  # and for a writer's own flush in flight
                    self._flusher.cancel()
                await asyncio.gather(self._flusher, return_exceptions=True)
            if self._checkpointer is not None:
                self._checkpointer.cancel()
                await asyncio.gather(self._checkpointer, return_exceptions=True)
            if self._executor is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._dispose)
                self._executor.shutdown(wait=True)

    # -- worker thread ---------------------------------------------------------------

    def _open(self) -> None:
        is_sqlite = sa.make_url(self.url).get_backend_name() == "sqlite"
        ensure_schema(self.url)  # a market's own schema in a shared PostgreSQL database (ledger/markets.py)
        engine_kwargs: dict[str, Any] = {}
        statements: list[str] = []
        if is_sqlite:
            # WAL + synchronous=FULL: a commit is on disk before write() returns, and
            # survives kill -9 or power loss. Set on every new pooled connection.
            engine_kwargs["connect_args"] = {"timeout": self.busy_timeout}
            statements = ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL"]
        self._db = dataset.connect(
            self.url,
            engine_kwargs=engine_kwargs,
            sqlite_wal_mode=False,  # we add it ourselves, with synchronous=FULL
            on_connect_statements=statements,
        )
        try:
            self._prepare()
        except BaseException:
            self._dispose()
            raise

    def _prepare(self) -> None:
        assert self._db is not None and self._db.engine is not None
        engine = self._engine = self._db.engine
        dialect = engine.dialect.name
        if dialect == "sqlite":
            ins: Any = sqlite.insert
        elif dialect == "postgresql":
            ins = postgresql.insert
        else:
            raise ValueError(f"unsupported ledger database dialect {dialect!r}")
        with engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)
        # Idempotent inserts: re-writing a record (a retried round) is a no-op.
        self._inserts = {
            name: ins(table).on_conflict_do_nothing(index_elements=[KEYS[name]]) for name, table in TABLE_MAP.items()
        }
        if dialect == "sqlite":
            # SQLAlchemy's per-row parameter processing costs twice the insert itself;
            # SQLite takes the value tuples as they are (qmark, column order).
            for name, stmt in self._inserts.items():
                compiled = stmt.compile(dialect=engine.dialect)
                if compiled.positiontup != [c.name for c in TABLE_MAP[name].columns]:
                    raise RuntimeError(f"unexpected parameter order in {compiled}")
                self._raw_sql[name] = str(compiled)
            self._raw = engine.raw_connection()
            # Checkpoints move the WAL into the database file and fsync it: done on every
            # 1,000th page by the committing writer, they put 5-20 ms into the commit that
            # every pending acknowledgement waits on. `_checkpoint_loop` does them instead,
            # on another connection, concurrently with the writes (PASSIVE).
            self._raw.cursor().execute("PRAGMA wal_autocheckpoint=0").close()
            if self.bulk:
                # A round's flush (~4 MB at 10,000 participants) no longer spills dirty
                # pages into the WAL before its commit: memory only, durability unchanged.
                self._raw.cursor().execute(f"PRAGMA cache_size=-{_CACHE_KIB}").close()

    def _commit(self, groups: Groups) -> None:
        if self._raw is not None:
            self._commit_raw(self._raw, groups)
            return
        assert self._engine is not None
        if self.bulk:
            self._commit_copy(groups)
            return
        with self._engine.begin() as conn:
            for name, records in groups:  # executemany, one statement per table
                # PostgreSQL, bulk=False: SQLAlchemy batches rows into multi-VALUES statements.
                names = [c.name for c in TABLE_MAP[name].columns]
                conn.execute(self._inserts[name], [dict(zip(names, r, strict=True)) for r in rows(name, records)])

    def _commit_raw(self, raw: Any, groups: Groups) -> None:
        """SQLite: the driver's own transaction on one connection kept by the ledger thread.
        SQLAlchemy's `Engine.begin()` per write cost 4-5x the commit itself, in Python that
        holds the GIL against the event loop; this is the path every `ack` waits on."""
        cur = raw.cursor()
        try:
            for name, records in groups:
                if self.bulk:
                    sqlite_insert.insert(cur, name, records)
                else:
                    cur.executemany(self._raw_sql[name], rows(name, records))
            raw.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the error that matters is the write's
                raw.rollback()
            # Retries see SQLAlchemy's exception types, as on the engine path.
            if isinstance(exc, sqlite3.Error):
                raise sa_exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
            raise
        finally:
            cur.close()

    def _commit_copy(self, groups: Groups) -> None:
        """PostgreSQL: COPY on a connection kept by the ledger thread (ledger/pg_copy.py)."""
        import psycopg  # here: a SQLite ledger does without its 40 ms of imports

        from ledger import pg_copy

        assert self._engine is not None
        if self._pg is None:
            self._pg = self._engine.raw_connection()
        conn = self._pg.driver_connection
        try:
            pg_copy.write(conn, groups)
        except psycopg.Error as exc:
            lost = conn.closed or conn.broken
            if lost:  # the next attempt takes a new connection from the pool
                with contextlib.suppress(Exception):
                    self._pg.invalidate()
                self._pg = None
            raise sa_exc.DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=lost) from exc

    def _group_commit(self, batches: list[Batch], grouped: list[Groups]) -> None:
        """Group (first attempt only), convert and commit, in one hop to the ledger thread:
        the conversion is CPU work proportional to the flush, kept off the loop, and every
        hop waits for a busy loop to wake up."""
        if not grouped:
            grouped.append(group(batches))
        self._commit(grouped[0])

    def _dispose(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None
        if self._raw is not None:
            self._raw.close()  # back to the pool, which the database's close disposes
            self._raw = None
        if self._db is not None:
            self._db.close()  # closes its connections and disposes the engine
        self._db = None
        self._engine = None

    # -- flusher ---------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            try:
                async with self._flushing:
                    await self._settle(items)
            except BaseException:
                # Cancelled mid-flush (loop shutdown): never leave a writer waiting.
                for _, future in items:
                    if not future.done():
                        future.cancel()
                raise
            finally:
                for _ in items:
                    queue.task_done()

    async def _settle(self, items: list[_Item]) -> None:
        """Flush `items` and resolve their futures, with the exception if it failed."""
        try:
            await self._flush([b for b, _ in items])
        except Exception as exc:
            if len(items) > 1 and not is_transient(exc):
                # One bad batch (e.g. a constraint violation) must not fail the batches
                # merged with it: find it by flushing them one by one.
                for item in items:
                    await self._settle([item])
                return
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
        else:
            for _, future in items:
                if not future.done():
                    future.set_result(None)

    async def _flush(self, batches: list[Batch]) -> None:
        loop = asyncio.get_running_loop()
        grouped: list[Groups] = []  # the records per table, grouped once for every attempt
        try:
            # The first attempt outside tenacity: its bookkeeping per write cost ~8 % of the
            # event loop under `ack` load, for writes that nearly always succeed at once.
            await loop.run_in_executor(self._executor, self._group_commit, batches, grouped)
        except Exception as exc:
            if not is_transient(exc) or self.retry_attempts <= 1:
                raise
            self.retries += 1
            log.warning("ledger write failed (attempt 1), retrying: %s", exc)
            # The first wait of wait_random_exponential below, then its remaining attempts.
            await asyncio.sleep(random.uniform(0, min(_FIRST_WAIT, self.retry_wait_max)))
            async for attempt in self._retrying(self.retry_attempts - 1):
                with attempt:
                    await loop.run_in_executor(self._executor, self._group_commit, batches, grouped)
        self.commits += 1

    async def _checkpoint_loop(self) -> None:
        """SQLite: checkpoint the WAL every `checkpoint_every` s while writes were made, in a
        thread of its own (a checkpoint never waits for, nor holds up, the ledger thread)."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-checkpoint")
        done = self.commits
        try:
            while True:
                await asyncio.sleep(self.checkpoint_every)
                if self.commits == done:
                    continue
                done = self.commits
                try:
                    await loop.run_in_executor(pool, self._checkpoint)
                except Exception as exc:  # a busy or failing checkpoint is retried next time
                    log.debug("WAL checkpoint failed: %s", exc)
        finally:
            pool.shutdown(wait=True)

    def _checkpoint(self) -> None:
        assert self._engine is not None
        with self._engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def _retrying(self, attempts: int | None = None) -> AsyncRetrying:
        # Full jitter: writers of several processes sharing one file do not retry in step.
        return AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts if attempts is None else attempts),
            wait=wait_random_exponential(multiplier=_FIRST_WAIT, max=self.retry_wait_max),
            retry=retry_if_exception(is_transient),
            before_sleep=self._on_retry,
            reraise=True,
        )

    def _on_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning("ledger write failed (attempt %d), retrying: %s", state.attempt_number, exc)
