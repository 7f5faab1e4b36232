"""ScannerClient: one scanner's Connect stream to the handler, kept up until drained or stopped.

A session is one stream: register, answer ``registered`` with ``Ready(free_slots=slots)``, then
run each assigned job as an asyncio task and send back its progress and its result or failure;
heartbeats go both ways. When the stream breaks, the session's running jobs are cancelled (the
handler has already put them back in the queue) and the client registers again on a new stream
after an exponential backoff with full jitter, and never sooner than the handler's retry hint
(``google.rpc.RetryInfo`` on a refusal that time lifts, such as a scanner id whose old stream
has not timed out yet). A refused registration is final: :meth:`ScannerClient.run` raises
:class:`ScannerRejected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import grpc
import grpc.aio
import structlog
from structlog.typing import FilteringBoundLogger

from imagehandler.channel import bearer_metadata
from imagehandler.rpc import read_rpc_error, remote_error
from imagehandler.v1 import common_pb2, scanner_service_pb2, scanner_service_pb2_grpc
from scanner_client import protocol
from scanner_client.backoff import Backoff
from scanner_client.engine import Engine, Job, Kind, Policy, ScanFailure, ScannerBroken
from scanner_client.errors import REGISTRATION_CODES, ScannerRejected
from scanner_client.outbox import MAX_BATCH_RESULTS, Outbox

ConnectCall = grpc.aio.StreamStreamCall[
    scanner_service_pb2.ConnectRequest, scanner_service_pb2.ConnectResponse
]

# A session that stayed registered this long resets the reconnect backoff; one that breaks
# sooner (a handler that accepts and then drops us) keeps backing off.
STABLE_SESSION_SECONDS: Final = 1.0

# A token the handler does not know, or one without the scanner role: final, like a refused
# registration (reconnecting cannot fix it).
_REFUSED_STATUSES: Final = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)


def package_version() -> str:
    try:
        return importlib.metadata.version("image-handler")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def default_scanner_id() -> str:
    """``hostname-pid``: unique per process, stable for the process's life."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ClientConfig:
    scanner_id: str = field(default_factory=default_scanner_id)
    # Jobs run at once.
    slots: int = 1
    # Kinds to register; None means the engine's kinds. Must be among the engine's kinds.
    kinds: frozenset[Kind] | None = None
    proxy_url: str = ""
    # Policies this scanner applies; empty means all.
    policies: tuple[Policy, ...] = ()
    version: str = field(default_factory=package_version)
    # Reconnect backoff (seconds): full jitter, doubling from initial up to max.
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    # How long the handler may take to answer the registration.
    register_timeout: float = 10.0
    # Used when the handler's Registered leaves them unset.
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    # After a drain, how long to wait for the handler to end the half-closed stream.
    drain_close_timeout: float = 5.0
    # How long cancelled scans may take to unwind before the client goes on without them.
    cancel_grace: float = 5.0
    # Most results in one Results message.
    max_batch: int = MAX_BATCH_RESULTS

    def check(self) -> None:
        problems = []
        if not self.scanner_id:
            problems.append("scanner_id is required")
        if self.slots < 1:
            problems.append(f"slots must be at least 1, got {self.slots}")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            problems.append(
                f"backoff must satisfy 0 < initial <= max, got {self.backoff_initial} and "
                f"{self.backoff_max}"
            )
        for name in ("register_timeout", "heartbeat_interval", "heartbeat_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Registration:
    """What the handler said when it accepted the current session."""

    session_id: str
    heartbeat_interval: float
    heartbeat_timeout: float


@dataclass
class ClientStats:
    """Counters over the client's life, for tests and operators."""

    connect_attempts: int = 0
    registrations: int = 0
    disconnects: int = 0
    jobs_assigned: int = 0
    # Results and failures written to the stream.
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    # Cancelled by the handler, or dropped because their stream broke.
    jobs_cancelled: int = 0
    # Refused messages (Rejected after registration).
    rejections: int = 0
    messages_sent: int = 0
    results_messages: int = 0
    # DatabasesChanged messages written (live database updates told to the handler).
    databases_changes: int = 0

    @property
    def jobs_done(self) -> int:
        return self.jobs_succeeded + self.jobs_failed


@dataclass(frozen=True)
class _Broken:
    reason: str
    # Seconds the session was registered; None when it never was.
    registered_for: float | None = None
    # Seconds the handler asked to wait before reconnecting (its RetryInfo), if it said.
    retry_after: float | None = None


class _Drained:
    pass


_DRAINED: Final = _Drained()
_Outcome = _Broken | _Drained


@dataclass(eq=False, slots=True)
class _RunningJob:
    job: Job
    # The deadline on the loop's clock; None when the handler set none.
    when: float | None
    task: asyncio.Task[None] = field(init=False)
    # The run's timeout, once its task has entered it. It starts unarmed: _arm_deadlines arms
    # it after the scan's first step, and most short scans are over by then.
    timeout: asyncio.Timeout | None = None
    # Set once _arm_deadlines has run: a timeout entered after that is armed at once.
    armed: bool = False


@dataclass(eq=False)
class _Session:
    call: ConnectCall
    outbox: Outbox
    registration: Registration
    databases: tuple[common_pb2.DatabaseVersion, ...]
    log: FilteringBoundLogger
    registered_at: float
    jobs: dict[str, _RunningJob] = field(default_factory=dict)
    # Set while no job runs.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    drain_queued: bool = False
    # Drain done: the client half-closed the stream and reports nothing more.
    closing: bool = False
    reader: asyncio.Task[_Outcome] | None = None
    # Whether log.info writes anything: known once, as the logger's level is fixed when bound.
    info: bool = field(init=False)

    def __post_init__(self) -> None:
        self.idle.set()
        self.info = _info_enabled(self.log)


def _info_enabled(log: FilteringBoundLogger) -> bool:
    """Whether ``log.info`` writes anything (True when the logger cannot tell)."""
    check = getattr(log, "is_enabled_for", None)
    return True if check is None else bool(check(logging.INFO))


def _job_log(session: _Session, job: Job) -> FilteringBoundLogger:
    """The session's logger bound to one run (made only when something is logged)."""
    return session.log.bind(job_id=job.job_id, run=job.run)


class _StreamProgress:
    """A job's progress reporter: goes to the outbox while the job is still running."""

    __slots__ = ("_job_id", "_running", "_session")

    def __init__(self, session: _Session, running: _RunningJob) -> None:
        self._session = session
        self._running = running
        self._job_id = running.job.job_id

    def report(self, stage: str, percent: int, message: str = "") -> None:
        session = self._session
        if session.jobs.get(self._job_id) is not self._running or session.closing:
            return
        session.outbox.progress(self._job_id, stage, percent, message)


class ScannerClient:
    """Runs ``engine`` for the handler at ``handler`` ("host:port") until drained or stopped.

    ``await run()`` returns after :meth:`drain` or :meth:`stop` and raises
    :class:`ScannerRejected` when the handler refuses the registration. ``registered`` is set
    while a session is registered; :meth:`wait_for` waits for a condition on :attr:`stats`.
    """

    def __init__(
        self,
        handler: str,
        engine: Engine,
        config: ClientConfig | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: tuple[tuple[str, Any], ...] = (),
        token: str = "",
    ) -> None:
        self.handler = handler
        self.engine = engine
        self.config = config or ClientConfig()
        self.config.check()
        if self.config.kinds is not None and engine.kinds and not self.config.kinds <= engine.kinds:
            extra = ", ".join(sorted(self.config.kinds - engine.kinds))
            raise ValueError(f"engine {engine.name!r} cannot scan {extra}")
        self.kinds: frozenset[Kind] = (
            self.config.kinds if self.config.kinds is not None else engine.kinds
        )
        self._credentials = credentials
        self._channel_options = channel_options
        # A handler with --token-file needs a token with the scanner role on the stream.
        self._call_metadata = bearer_metadata(token) or None
        self.log: FilteringBoundLogger = structlog.get_logger("scanner_client").bind(
            scanner_id=self.config.scanner_id
        )
        self.stats = ClientStats()
        # Set while a session is registered.
        self.registered = asyncio.Event()
        # time.monotonic() of the last connect attempt or message from the handler: the
        # liveness probe (scanner_client.health) reads it.
        self.last_activity = time.monotonic()
        self.registration: Registration | None = None
        # Set once a Drain message has been written.
        self.drain_sent = asyncio.Event()
        self._changed = asyncio.Event()
        # wait_for calls waiting on _changed: with none, a change needs no new Event.
        self._watchers = 0
        self._drain_requested = asyncio.Event()
        self._stop_requested = asyncio.Event()
        # Ends a reconnect wait early.
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._started = False
        self._stub: scanner_service_pb2_grpc.ScannerServiceAsyncStub | None = None
        # Cancelled job tasks still unwinding.
        self._unwinding: set[asyncio.Task[None]] = set()
        # What the engine said when it found this scanner cannot work (run() raises it).
        self.broken: ScannerBroken | None = None
        # The registered session, while there is one (live database updates go to it).
        self._live: _Session | None = None
        engine.databases_changed_callback = self._databases_changed

    # ---- control ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, register and serve jobs, reconnecting when the stream breaks.

        Returns after :meth:`drain` or :meth:`stop`; raises :class:`ScannerRejected` when the
        handler refuses the registration (without reconnecting), and the engine's
        :class:`ScannerBroken` once the scanner has drained after the engine raised it.
        """
        if self._started:
            raise RuntimeError("a ScannerClient runs once; make a new one")
        self._started = True
        await self._serve()
        if self.broken is not None:
            raise self.broken

    async def _serve(self) -> None:
        channel = self._channel()
        self._stub = scanner_service_pb2_grpc.ScannerServiceStub(channel)
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        background = asyncio.create_task(self._engine_background(), name="engine background")
        try:
            while not self._drain_requested.is_set() and not self._stop_requested.is_set():
                outcome = await self._until_stopped(self._session)
                if outcome is None:
                    self.log.info("scanner stopped")
                    return
                if isinstance(outcome, _Drained):
                    self.log.info("scanner drained")
                    return
                self.stats.disconnects += 1
                self._notify()
                if (
                    outcome.registered_for is not None
                    and outcome.registered_for >= STABLE_SESSION_SECONDS
                ):
                    backoff.reset()
                if self._drain_requested.is_set() or self._stop_requested.is_set():
                    self.log.info("disconnected", reason=outcome.reason)
                    return
                delay = backoff.next_delay()
                if outcome.retry_after is not None:
                    # Sooner cannot work (an old stream of this id is still live): the handler
                    # said when. The backoff goes on from there.
                    delay = max(delay, outcome.retry_after)
                self.log.warning(
                    "disconnected", reason=outcome.reason, reconnect_in=round(delay, 3)
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        except ScannerRejected as rejected:
            self.log.error("registration refused", code=rejected.code, error=rejected.message)
            raise
        finally:
            background.cancel()
            await asyncio.wait({background})
            self.registered.clear()
            await channel.close(None)
            self._done.set()
            self._notify()

    async def _engine_background(self) -> None:
        """The engine's own background work (periodic database updates); a failure there is
        logged, never the end of the scanner."""
        try:
            await self.engine.run_background()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("engine background work failed")

    def _databases_changed(self) -> None:
        """The engine took new databases into use: tell the handler on the current stream
        (a later registration sends them anyway)."""
        session = self._live
        if session is None or session.closing:
            return
        try:
            databases = tuple(self.engine.databases())
        except Exception:
            self.log.exception("engine cannot list its databases")
            return
        protos = tuple(database.to_proto() for database in databases)
        if protos == session.databases:
            return
        session.databases = protos
        session.outbox.put(protocol.databases_changed(databases))
        session.log.info(
            "databases changed",
            databases={d.name: f"{d.version}@{d.released_at}" for d in databases},
        )

    def request_drain(self) -> None:
        """Start draining (safe from a signal handler); :meth:`run` returns when done."""
        self._drain_requested.set()
        self._wake.set()

    def request_stop(self) -> None:
        """Stop at once (safe from a signal handler): running jobs are cancelled unreported."""
        self._stop_requested.set()
        self._wake.set()

    async def drain(self) -> None:
        """Send Drain, take nothing new, let the running jobs finish and report, close the
        stream, and return once :meth:`run` has."""
        self.request_drain()
        if self._started:
            await self._done.wait()

    async def stop(self) -> None:
        """End the stream and the running jobs now, and return once :meth:`run` has."""
        self.request_stop()
        if self._started:
            await self._done.wait()

    async def wait_for(self, predicate: Callable[[ClientStats], bool]) -> None:
        """Until ``predicate(self.stats)`` holds (wrap in ``asyncio.timeout``)."""
        while not predicate(self.stats):
            self._watchers += 1
            try:
                await self._changed.wait()
            finally:
                self._watchers -= 1

    # ---- one session ------------------------------------------------------------------------

    async def _until_stopped(
        self, session: Callable[[], Coroutine[Any, Any, _Outcome]]
    ) -> _Outcome | None:
        """The session's outcome, or None when :meth:`stop` ended it first."""
        task = asyncio.create_task(session(), name=f"scanner session {self.config.scanner_id}")
        stopper = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            return None
        return task.result()

    async def _session(self) -> _Outcome:
        assert self._stub is not None
        self.last_activity = time.monotonic()
        self.stats.connect_attempts += 1
        self._notify()
        self.log.info("connecting", handler=self.handler, attempt=self.stats.connect_attempts)
        call: ConnectCall = self._stub.Connect(None, metadata=self._call_metadata)
        session: _Session | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            try:
                session = await self._register(call)
            except grpc.aio.AioRpcError as exc:
                remote = read_rpc_error(exc)
                if remote.code in REGISTRATION_CODES or remote.status in _REFUSED_STATUSES:
                    raise ScannerRejected.from_remote(remote) from None
                return _Broken(f"cannot register: {remote.message}", None, remote.retry_after)
            except asyncio.InvalidStateError:
                return _Broken(f"cannot register: {await self._status_text(call)}")
            except TimeoutError:
                return _Broken(
                    f"no answer to the registration within {self.config.register_timeout}s"
                )
            except ScannerRejected:
                raise
            except _RegistrationFailed as exc:
                return _Broken(str(exc), None, exc.retry_after)
            tasks = [
                asyncio.create_task(self._write_loop(session)),
                asyncio.create_task(self._heartbeat_loop(session)),
            ]
            session.reader = asyncio.create_task(self._read_loop(session))
            drainer = asyncio.create_task(self._drain_when_asked(session))
            tasks += [session.reader, drainer]
            done, _ = await asyncio.wait(
                {session.reader, drainer}, return_when=asyncio.FIRST_COMPLETED
            )
            outcome: _Outcome = (
                session.reader.result() if session.reader in done else drainer.result()
            )
            if isinstance(outcome, _Broken):
                outcome = _Broken(
                    outcome.reason,
                    asyncio.get_running_loop().time() - session.registered_at,
                    outcome.retry_after,
                )
            return outcome
        finally:
            self.registered.clear()
            if self._live is session:
                self._live = None
            for task in tasks:
                task.cancel()
            if session is not None:
                self._abandon_jobs(session)
            waiting = {*tasks, *self._unwinding}
            if waiting:
                await asyncio.wait(waiting, timeout=self.config.cancel_grace)
            call.cancel()

    async def _register(self, call: ConnectCall) -> _Session:
        try:
            databases = tuple(self.engine.databases())
        except Exception as exc:
            self.log.exception("engine cannot list its databases")
            raise _RegistrationFailed(f"engine cannot list its databases: {exc!r}") from exc
        request = protocol.register_request(
            scanner_id=self.config.scanner_id,
            version=self.config.version,
            engine=self.engine.name,
            kinds=self.kinds,
            slots=self.config.slots,
            databases=databases,
            proxy_url=self.config.proxy_url,
            policies=self.config.policies,
        )
        async with asyncio.timeout(self.config.register_timeout):
            await call.write(request)
            response = await call.read()
        if not isinstance(response, scanner_service_pb2.ConnectResponse):
            raise _RegistrationFailed("the handler ended the stream before answering")
        kind = response.WhichOneof("message")
        if kind == "rejected":
            error = response.rejected.error
            if error.code in REGISTRATION_CODES:
                raise ScannerRejected.from_job_error(error)
            # Anything else (HNDL-007: this id's old stream is still live) passes: retry, after
            # the delay the status that ends the call asks for (its RetryInfo).
            async with asyncio.timeout(self.config.register_timeout):
                ended = remote_error(
                    await call.code(), await call.details(), await call.trailing_metadata()
                )
            raise _RegistrationFailed(
                f"registration refused for now: {error.message}", ended.retry_after
            )
        if kind != "registered":
            raise _RegistrationFailed(f"the handler answered the registration with {kind}")
        registered = response.registered
        registration = Registration(
            session_id=registered.session_id,
            heartbeat_interval=protocol.seconds(
                registered.heartbeat_interval, self.config.heartbeat_interval
            ),
            heartbeat_timeout=protocol.seconds(
                registered.heartbeat_timeout, self.config.heartbeat_timeout
            ),
        )
        log = self.log.bind(session_id=registration.session_id)
        session = _Session(
            call=call,
            outbox=Outbox(max_batch=self.config.max_batch),
            registration=registration,
            databases=tuple(database.to_proto() for database in databases),
            log=log,
            registered_at=asyncio.get_running_loop().time(),
        )
        self.registration = registration
        self._live = session
        self.stats.registrations += 1
        self.registered.set()
        self._notify()
        log.info(
            "registered",
            handler=self.handler,
            slots=self.config.slots,
            kinds=sorted(self.kinds) or "all",
            engine=self.engine.name,
            heartbeat_interval=registration.heartbeat_interval,
            heartbeat_timeout=registration.heartbeat_timeout,
        )
        if self._drain_requested.is_set():
            # Asked to drain while registering: take nothing at all.
            session.outbox.put(protocol.drain())
            session.drain_queued = True
        else:
            session.outbox.put(protocol.ready(self.config.slots))
        return session

    async def _read_loop(self, session: _Session) -> _Outcome:
        call = session.call
        timeout = session.registration.heartbeat_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    response = await call.read()
            except TimeoutError:
                if session.closing:
                    return _DRAINED
                return _Broken(f"no message from the handler for {timeout}s (heartbeat timeout)")
            except grpc.aio.AioRpcError as exc:
                if session.closing:
                    return _DRAINED
                remote = read_rpc_error(exc)
                return _Broken(f"stream failed: {remote.message}", None, remote.retry_after)
            self.last_activity = time.monotonic()
            if not isinstance(response, scanner_service_pb2.ConnectResponse):
                if session.closing:
                    return _DRAINED
                return _Broken("the handler ended the stream")
            self._dispatch(session, response)

    def _dispatch(self, session: _Session, response: scanner_service_pb2.ConnectResponse) -> None:
        kind = response.WhichOneof("message")
        if kind == "assignment":
            loop = asyncio.get_running_loop()
            # Deadlines are wall-clock times; the loop's timers run on its own clock. Read once
            # for the whole assignment.
            offset = loop.time() - datetime.now(UTC).timestamp()
            started = []
            for assigned in response.assignment.jobs:
                running = self._start_job(session, assigned, offset)
                if running is not None:
                    started.append(running)
            if started:
                self.stats.jobs_assigned += len(started)
                self._notify()
                # After the first steps of the tasks just made (call_soon keeps the order).
                loop.call_soon(self._arm_deadlines, started)
        elif kind == "cancel":
            self._cancel_job(session, response.cancel.job_id, response.cancel.reason)
        elif kind == "rejected":
            error = response.rejected.error
            self.stats.rejections += 1
            self._notify()
            session.log.warning(
                "handler refused a message",
                code=error.code,
                error=error.message,
                job_id=response.rejected.job_id or None,
            )
        elif kind == "heartbeat":
            pass
        elif kind == "drain":
            # The handler is shutting down: it sends nothing new; running jobs finish and
            # report, and the client reconnects (to it or a replacement) when the stream ends.
            session.log.info("the handler is draining: finishing running jobs")
        else:
            session.log.warning("unexpected message from the handler", message=kind)

    async def _write_loop(self, session: _Session) -> None:
        outbox = session.outbox
        while True:
            request = await outbox.get()
            try:
                await session.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The stream is over; the reader reports why.
                session.log.debug("write failed", error=repr(exc))
                return
            outbox.written()
            self._count_sent(request)

    async def _heartbeat_loop(self, session: _Session) -> None:
        while True:
            await asyncio.sleep(session.registration.heartbeat_interval)
            if session.closing:
                return
            session.outbox.put(protocol.heartbeat(session.jobs))

    async def _drain_when_asked(self, session: _Session) -> _Outcome:
        await self._drain_requested.wait()
        if not session.drain_queued:
            session.outbox.put(protocol.drain())
            session.drain_queued = True
        session.log.info("draining", running=len(session.jobs))
        await session.idle.wait()
        await session.outbox.wait_idle()
        session.closing = True
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await session.call.done_writing()
        # Give the handler a moment to end the stream on its side.
        assert session.reader is not None
        await asyncio.wait({session.reader}, timeout=self.config.drain_close_timeout)
        return _DRAINED

    # ---- jobs -------------------------------------------------------------------------------

    def _start_job(
        self, session: _Session, assigned: scanner_service_pb2.AssignedJob, offset: float
    ) -> _RunningJob | None:
        """Start one assigned job (the caller counts it); ``offset`` is the loop's clock minus
        the wall clock."""
        job, deadline = protocol.assigned_job(assigned)
        if session.closing:
            _job_log(session, job).warning(
                "assignment after the stream was closed; the handler requeues it"
            )
            return None
        if self.broken is not None:
            # Sent before the handler heard of the drain: handed back unscanned.
            session.outbox.failure(self._broken_failure(job, self.broken))
            return None
        previous = session.jobs.pop(job.job_id, None)
        if previous is not None:
            _job_log(session, job).warning(
                "job assigned again while running; the earlier run is dropped"
            )
            self._cancel_task(previous.task)
        running = _RunningJob(job, None if deadline is None else deadline + offset)
        running.task = asyncio.create_task(
            self._run_job(session, running), name=f"scan {job.job_id}"
        )
        session.jobs[job.job_id] = running
        session.idle.clear()
        if session.info:  # skip formatting what nobody reads
            _job_log(session, job).info(
                "job assigned",
                kind=job.kind,
                deadline=protocol.format_deadline(job.deadline) if job.deadline else None,
            )
        return running

    @staticmethod
    def _arm_deadlines(started: list[_RunningJob]) -> None:
        """Arm the deadline of each run whose scan is still going after its first step.

        A scan that needs no waiting is over within its first step, before its deadline timer
        could fire, so it never needs one; skipping the timer (made, then cancelled) is a
        good part of the client's cost per short scan. A timer armed here fires when one
        armed at the start would have: the deadline is absolute.
        """
        for running in started:
            running.armed = True
            timeout = running.timeout
            if timeout is not None and running.when is not None and not running.task.done():
                timeout.reschedule(running.when)

    def _cancel_job(self, session: _Session, job_id: str, reason: str) -> None:
        running = session.jobs.pop(job_id, None)
        if running is None:
            session.log.debug("cancel for a job not running here", job_id=job_id, reason=reason)
            return
        session.outbox.forget(job_id)
        self._cancel_task(running.task)
        if not session.jobs:
            session.idle.set()
        self.stats.jobs_cancelled += 1
        self._notify()
        session.log.info("job cancelled by the handler", job_id=job_id, reason=reason)

    def _abandon_jobs(self, session: _Session) -> None:
        """The stream is over: its jobs are the handler's again and cannot be reported."""
        if session.jobs:
            session.log.info("cancelling running jobs", job_ids=sorted(session.jobs))
            self.stats.jobs_cancelled += len(session.jobs)
            self._notify()
        for running in session.jobs.values():
            self._cancel_task(running.task)
        session.jobs.clear()
        session.idle.set()

    def _cancel_task(self, task: asyncio.Task[None]) -> None:
        if task.done():
            return
        task.cancel()
        self._unwinding.add(task)
        task.add_done_callback(self._unwinding.discard)

    async def _run_job(self, session: _Session, running: _RunningJob) -> None:
        job = running.job
        # Unarmed (None) until _arm_deadlines has seen this run's first step.
        deadline = asyncio.timeout_at(running.when if running.armed else None)
        running.timeout = deadline
        failure: scanner_service_pb2.Failure | None = None
        result: common_pb2.ScanResult | None = None
        try:
            async with deadline:
                returned: object = await self.engine.scan(job, _StreamProgress(session, running))
            if not isinstance(returned, common_pb2.ScanResult):
                raise TypeError(
                    f"engine {self.engine.name!r} returned {type(returned).__name__}, "
                    "not a ScanResult"
                )
            result = returned
        except TimeoutError as exc:
            if deadline.expired() and job.deadline is not None:
                failure = protocol.failure(
                    job.job_id,
                    "HNDL-004",
                    f"scan did not finish by its deadline {protocol.format_deadline(job.deadline)}",
                )
            else:
                failure = self._internal_failure(job, exc, _job_log(session, job))
        except ScanFailure as exc:
            failure = protocol.failure(job.job_id, exc.code, exc.detail, permanent=exc.permanent)
        except ScannerBroken as exc:
            # The drain goes out before this run's failure: the slot it frees takes nothing.
            self._break(session, exc)
            failure = self._broken_failure(job, exc)
        except Exception as exc:
            failure = self._internal_failure(job, exc, _job_log(session, job))
        jobs = session.jobs
        if jobs.get(job.job_id) is not running:
            return  # cancelled meanwhile: nothing may be said about it
        del jobs[job.job_id]
        if not jobs:
            session.idle.set()
        if result is not None:
            result.job_id = job.job_id
            result.run = job.run
            if not result.databases:
                result.databases.extend(session.databases)
            session.outbox.result(result)
            if session.info:
                _job_log(session, job).info(
                    "job finished", verdict=common_pb2.Verdict.Name(result.verdict)
                )
        elif failure is not None:
            session.outbox.failure(failure)
            _job_log(session, job).warning(
                "job failed", code=failure.code, detail=failure.detail, permanent=failure.permanent
            )

    def _break(self, session: _Session, exc: ScannerBroken) -> None:
        """The engine says this scanner cannot work: drain (take nothing new, let the running
        scans end), then run() raises ``exc``."""
        if self.broken is None:
            self.broken = exc
            session.log.error(
                "scanner broken: taking no more jobs, exiting once the running ones end",
                error=str(exc),
                running=len(session.jobs),
            )
        if not session.drain_queued and not session.closing:
            session.outbox.put(protocol.drain())
            session.drain_queued = True
        self.request_drain()

    def _broken_failure(self, job: Job, exc: ScannerBroken) -> scanner_service_pb2.Failure:
        # Retryable, whatever the job: another scanner can scan it.
        return protocol.failure(
            job.job_id,
            "HNDL-007",
            f"scanner {self.config.scanner_id} cannot work, the job goes back to the queue: {exc}",
        )

    def _internal_failure(
        self, job: Job, exc: BaseException, log: FilteringBoundLogger
    ) -> scanner_service_pb2.Failure:
        log.error("engine raised an unexpected error", exc_info=exc)
        return protocol.failure(
            job.job_id, "HNDL-007", f"engine {self.engine.name}: {type(exc).__name__}: {exc}"
        )

    # ---- plumbing ---------------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        initial_ms = max(1, int(self.config.backoff_initial * 1000))
        options: list[tuple[str, Any]] = [
            # Keep gRPC's own reconnection from outwaiting the client's backoff.
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.min_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(self.config.backoff_max * 1000))),
            *self._channel_options,
        ]
        if self._credentials is not None:
            return grpc.aio.secure_channel(self.handler, self._credentials, options=options)
        return grpc.aio.insecure_channel(self.handler, options=options)

    def _count_sent(self, request: scanner_service_pb2.ConnectRequest) -> None:
        self.stats.messages_sent += 1
        kind = request.WhichOneof("message")
        if kind == "result":
            self.stats.results_messages += 1
            self.stats.jobs_succeeded += len(request.result.results)
        elif kind == "failure":
            self.stats.jobs_failed += 1
        elif kind == "drain":
            self.drain_sent.set()
        elif kind == "databases":
            self.stats.databases_changes += 1
        else:
            return
        self._notify()

    def _notify(self) -> None:
        if not self._watchers:
            return  # nobody waits: skip the new Event (this runs for every job)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @staticmethod
    async def _status_text(call: ConnectCall) -> str:
        try:
            return f"{(await call.code()).name}: {await call.details()}"
        except Exception as exc:
            return repr(exc)


class _RegistrationFailed(Exception):
    """The handler neither accepted nor refused the registration (retry later)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        # Seconds the handler asked to wait first, if it said.
        self.retry_after = retry_after
