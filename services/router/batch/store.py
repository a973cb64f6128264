"""The batch job store: SQLite (WAL, synchronous=FULL), one file, one router at a time.

Contract:
- create_job() stores the job and all its items in one transaction; once it returns, nothing of
  the job can be lost (a crash after that leaves it QUEUED or RUNNING, and the runner resumes it).
  With an idempotency key, a create that repeats a key of the same tenant returns the job the
  first one stored (same items and metadata, else InvalidArgument): a retried create never
  makes a second job.
- A result is keyed by (job, custom_id): put_result() stores the first one and ignores any later
  one, so an item re-run after a crash can never show a second result. It also ignores results of
  a job that is no longer RUNNING (cancelled meanwhile).
- A job is visible to its own tenant only; any other tenant gets NotFound, worded exactly like a
  job that does not exist.
- An exclusive lock on PATH.lock keeps a second router off the same file (two runners would run
  every item twice); the OS drops it when the process dies, kill -9 included.
Calls are thread-safe (one connection behind a lock); AsyncBatchStore runs them off the event loop.
"""

import asyncio
import base64
import concurrent.futures
import fcntl
import hashlib
import json
import os
import pathlib
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 2  # 1: jobs, items, results; 2: jobs.idempotency_key and request_digest
QUEUED, RUNNING, COMPLETED, CANCELLED, FAILED = "queued", "running", "completed", "cancelled", "failed"
ENDED = (COMPLETED, CANCELLED, FAILED)

_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    status TEXT NOT NULL,
    total_items INTEGER NOT NULL,
    completed_items INTEGER NOT NULL DEFAULT 0,
    failed_items INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    started_ms INTEGER NOT NULL DEFAULT 0,
    ended_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, seq);
CREATE TABLE items (
    job_id TEXT NOT NULL,
    item_index INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    request BLOB NOT NULL,
    PRIMARY KEY (job_id, item_index),
    UNIQUE (job_id, custom_id)
);
CREATE TABLE results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    item_index INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    error_code INTEGER NOT NULL,
    error_message TEXT NOT NULL,
    text TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    finish_reason INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    completed_ms INTEGER NOT NULL,
    UNIQUE (job_id, custom_id)
);
CREATE INDEX results_by_job ON results (job_id, seq);
"""
_MIGRATIONS = {  # version -> statements that take the previous version to it
    1: _SCHEMA,
    2: """
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN request_digest TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
""",
}


class Job(NamedTuple):
    job_id: str
    tenant_id: str
    status: str
    total_items: int
    completed_items: int
    failed_items: int
    metadata: dict
    error: str
    created_ms: int
    started_ms: int
    ended_ms: int


class ItemResult(NamedTuple):
    custom_id: str
    item_index: int
    error_code: int = 0  # gRPC status code number; 0 = success
    error_message: str = ""
    text: str = ""
    token_ids: tuple = ()
    finish_reason: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    completed_ms: int = 0
    seq: int = 0  # position in the job's result log (set by the store)


class PendingItem(NamedTuple):
    item_index: int
    custom_id: str
    request: bytes  # a serialized pdmesh.v1.GenerateRequest


def now_ms() -> int:
    return int(time.time() * 1000)


class BatchStore:
    def __init__(self, path: str):
        self.path = str(path)
        pathlib.Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _exclusive_lock(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()

    @contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: batch store schema version {version}, this router knows up to "
                               f"{SCHEMA_VERSION}; use a matching router or another --batch-db")
        with self._transaction() as db:  # an older file is upgraded in place, all steps or none
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- jobs ------------------------------------------------------------------------------------

    def create_job(self, tenant_id: str, items: list[tuple[str, bytes]], metadata: dict[str, str],
                   idempotency_key: str = "") -> Job:
        """Stores a QUEUED job; items are (custom_id, serialized request), custom_ids unique. A
        tenant's repeated idempotency_key returns its first job (InvalidArgument if the items or
        metadata differ)."""
        job_id, digest = f"batch_{uuid.uuid4().hex[:20]}", _digest(items, metadata)
        with self._transaction() as db:
            earlier = idempotency_key and self._keyed_job(db, tenant_id, idempotency_key, digest)
            if earlier:
                job_id = earlier
            else:
                db.execute("INSERT INTO jobs (job_id, tenant_id, status, total_items, metadata, created_ms, "
                           "idempotency_key, request_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (job_id, tenant_id, QUEUED, len(items), json.dumps(metadata), now_ms(),
                            idempotency_key or None, digest))
                db.executemany("INSERT INTO items (job_id, item_index, custom_id, request) VALUES (?, ?, ?, ?)",
                               [(job_id, i, custom_id, request) for i, (custom_id, request) in enumerate(items)])
        return self.job(job_id)

    @staticmethod
    def _keyed_job(db, tenant_id: str, key: str, digest: str) -> str:
        """The id of the tenant's job created with `key` ("" if none); InvalidArgument when that
        job was made from other items or metadata."""
        row = db.execute("SELECT job_id, request_digest FROM jobs WHERE tenant_id = ? AND idempotency_key = ?",
                         (tenant_id, key)).fetchone()
        if row is not None and row[1] != digest:
            raise InvalidArgument(f"idempotency_key {key!r} was used for batch job {row[0]} with other items "
                                  "or metadata; use a new key for a new job")
        return row[0] if row is not None else ""

    def job(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"batch job {job_id} not found")
        return _job(row)

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        """The job if it belongs to tenant_id; NotFound otherwise (the same answer as no such job)."""
        try:
            job = self.job(job_id)
        except NotFound:
            job = None
        if job is None or job.tenant_id != tenant_id:
            raise NotFound(f"batch job {job_id!r} not found for tenant {tenant_id or '(default)'!r}")
        return job

    def list_jobs(self, tenant_id: str, limit: int, before_seq: int | None = None) -> tuple[list[Job], int | None]:
        """The tenant's jobs newest first, and the cursor of the next page (None on the last)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS}, seq FROM jobs WHERE tenant_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (tenant_id, before_seq if before_seq is not None else 2 ** 62, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_job(r[:-1]) for r in rows], (rows[-1][-1] if more else None)

    def job_counts(self) -> dict[str, int]:
        """Jobs by status, every tenant (for /metrics; any thread)."""
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def unfinished_jobs(self) -> list[Job]:
        """QUEUED and RUNNING jobs, oldest first (what the runner resumes on start)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                                    (QUEUED, RUNNING)).fetchall()
        return [_job(r) for r in rows]

    def mark_running(self, job_id: str) -> bool:
        """QUEUED -> RUNNING (RUNNING stays); False when the job has ended meanwhile."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, started_ms = CASE started_ms WHEN 0 THEN ? ELSE started_ms END "
                       "WHERE job_id = ? AND status IN (?, ?)", (RUNNING, now_ms(), job_id, QUEUED, RUNNING))
            return db.execute("SELECT changes()").fetchone()[0] == 1

    def finish_job(self, job_id: str, error: str = "") -> Job:
        """RUNNING -> COMPLETED, or FAILED with `error`; a job already ended is left as it is."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, ended_ms = ? WHERE job_id = ? AND status IN (?, ?)",
                       (FAILED if error else COMPLETED, error, now_ms(), job_id, QUEUED, RUNNING))
        return self.job(job_id)

    def cancel_job(self, tenant_id: str, job_id: str) -> Job:
        job = self.get_job(tenant_id, job_id)
        if job.status in (COMPLETED, FAILED):
            raise FailedPrecondition(f"batch job {job_id} has already ended ({job.status}); nothing to cancel")
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, ended_ms = ? WHERE job_id = ? AND status IN (?, ?)",
                       (CANCELLED, now_ms(), job_id, QUEUED, RUNNING))
        return self.job(job_id)

    # --- items and results -------------------------------------------------------------------------

    def pending_items(self, job_id: str) -> list[PendingItem]:
        """Items with no stored result, in item order (an item in flight at a crash is pending again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.item_index, i.custom_id, i.request FROM items i LEFT JOIN results r "
                "ON r.job_id = i.job_id AND r.custom_id = i.custom_id WHERE i.job_id = ? AND r.seq IS NULL "
                "ORDER BY i.item_index", (job_id,)).fetchall()
        return [PendingItem(*r) for r in rows]

    def put_result(self, job_id: str, result: ItemResult) -> bool:
        """Stores the item's result unless it has one or the job is not RUNNING; True when stored."""
        with self._transaction() as db:
            status = db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if status is None or status[0] != RUNNING:
                return False
            db.execute(
                "INSERT OR IGNORE INTO results (job_id, item_index, custom_id, error_code, error_message, text, "
                "token_ids, finish_reason, prompt_tokens, completion_tokens, cached_prompt_tokens, completed_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, result.item_index, result.custom_id, result.error_code, result.error_message, result.text,
                 json.dumps(list(result.token_ids)), result.finish_reason, result.prompt_tokens,
                 result.completion_tokens, result.cached_prompt_tokens, result.completed_ms or now_ms()))
            if db.execute("SELECT changes()").fetchone()[0] != 1:
                return False
            counter = "completed_items" if result.error_code == 0 else "failed_items"
            db.execute(f"UPDATE jobs SET {counter} = {counter} + 1 WHERE job_id = ?", (job_id,))
            return True

    def results(self, tenant_id: str, job_id: str, after_seq: int = 0, limit: int = 100) -> list[ItemResult]:
        """The job's results stored after `after_seq`, in the order they were stored."""
        self.get_job(tenant_id, job_id)
        with self._lock:
            rows = self._db.execute(
                "SELECT custom_id, item_index, error_code, error_message, text, token_ids, finish_reason, "
                "prompt_tokens, completion_tokens, cached_prompt_tokens, completed_ms, seq FROM results "
                "WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, after_seq, limit)).fetchall()
        return [ItemResult(*r[:5], tuple(json.loads(r[5])), *r[6:]) for r in rows]


_JOB_COLUMNS = ("job_id, tenant_id, status, total_items, completed_items, failed_items, metadata, error, "
                "created_ms, started_ms, ended_ms")


def _digest(items: list[tuple[str, bytes]], metadata: dict[str, str]) -> str:
    """What a job was made from, to tell a retried create from another job under the same key."""
    h = hashlib.sha256(json.dumps(sorted(metadata.items())).encode())
    for custom_id, request in items:
        h.update(len(custom_id.encode()).to_bytes(4, "big") + custom_id.encode())
        h.update(len(request).to_bytes(4, "big") + request)
    return h.hexdigest()


def _job(row) -> Job:
    values = list(row)
    values[6] = json.loads(values[6])
    return Job(*values)


def _exclusive_lock(path: str):
    lock = open(f"{path}.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"batch store {path} is in use by another router (lock {path}.lock held); "
                           "give this router its own --batch-db") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def encode_cursor(kind: str, value: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, token: str) -> int:
    """The position in a page token this service issued; InvalidArgument for anything else."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, value = text.split(":")
        if prefix == kind and int(value) >= 0:
            return int(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument(f"page_token {token!r} is not one this service issued: pass next_page_token "
                          "(or resume_token) from an earlier response, or empty for the start")


class AsyncBatchStore:
    """BatchStore's methods as coroutines, run one at a time on a dedicated thread, so SQLite calls
    and fsyncs never stall the event loop's streams."""

    def __init__(self, store: BatchStore):
        self.store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-store")

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        async def call(*args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(self._executor, partial(method, *args, **kwargs))
        return call

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
