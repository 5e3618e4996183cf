"""`kura serve --workers N`: N worker processes serving one address, and the process that
keeps them running: it restarts a worker that dies, and reloads the configuration on SIGHUP.

The supervisor binds one listening socket per worker slot, with SO_REUSEPORT (the kernel
spreads new connections over them), and keeps each open for good; a worker is forked with
its slot's socket. A listening socket that closes resets the connections waiting in its
queue, so no worker binds or closes one itself: a replacement, or a worker of the next
configuration, takes over the very socket its predecessor served, and whatever the kernel
queued there meanwhile is answered, never refused.

SIGHUP: the configuration file is read again and checked as at start-up (one error line, and
the running workers go on, when it is wrong); a new worker per slot starts beside the old
ones; once all of them accept connections, the old ones are sent SIGTERM: they stop
accepting and finish the requests they have (server.shutdown_timeout_seconds at most).

All state that matters lives in the store, which several processes may share (README
"Scale out"), except the failed-login counts, which the supervisor keeps for its workers in
a file of their own (auth/shared_limits.py), and the metrics, which the workers write to a
directory the supervisor made (monitoring/workers.py); what each worker keeps for itself is
listed in README "Workers and reloads".
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from .auth.shared_limits import LoginTable
from .auth.shared_limits import share as share_logins
from .config import Config, ConfigError
from .logformat import configure as configure_logging
from .monitoring.workers import worker_exited
from .startup import Ready, StartupError, reason

log = logging.getLogger("kura.server")

BACKLOG = 128
READY = b"r"
START_FAILURES = 5  # a slot whose worker exits this many times in a row before it is ready: give up
STABLE_SECONDS = 10.0  # a worker that lived shorter than this is restarted after a back-off
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 10.0
READY_TIMEOUT = 120.0  # a reload whose workers are not all ready by then is abandoned
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


def worker_count(config: Config) -> int:
    """server.workers, or (0) one per CPU core this process may run on."""
    if config.workers:
        return config.workers
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _addresses(host: str, port: int) -> list[tuple]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen = []
    for family, kind, proto, _, address in infos:
        if (family, kind, proto, address) not in seen:
            seen.append((family, kind, proto, address))
    return seen


def _socket(family: int, kind: int, proto: int) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def check_free(host: str, port: int) -> None:
    """OSError when another process listens on host:port. Bound without SO_REUSEPORT, so that
    a second `kura serve --workers N` on the port fails too instead of sharing it."""
    for family, kind, proto, address in _addresses(host, port):
        with _socket(family, kind, proto) as probe:
            probe.bind(address)


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """One slot's listening sockets: one per address `host` stands for, as asyncio binds."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in _addresses(host, port):
            sock = _socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass(eq=False)
class Worker:
    slot: int  # from 0; logs call it `worker {slot + 1}`
    pid: int
    generation: Generation
    ready_fd: int  # the read end of the pipe the worker writes READY to
    started: float
    ready: bool = False

    @property
    def number(self) -> int:
        return self.slot + 1


@dataclass(eq=False)
class Generation:
    """The workers of one configuration (the first, or one SIGHUP read)."""
    number: int
    config: Config
    prepared: Ready
    sockets: list[list[socket.socket]]  # per slot
    workers: dict[int, Worker] = field(default_factory=dict)  # the live worker of each slot
    started: float = field(default_factory=time.monotonic)
    announced: bool = False

    @property
    def size(self) -> int:
        return len(self.sockets)

    def all_ready(self) -> bool:
        return len(self.workers) == self.size and all(w.ready for w in self.workers.values())


class Supervisor:
    def __init__(self, config: Config, prepared: Ready, reload: Callable[[], Config],
                 prepare: Callable[[Config], Ready]):
        self.reload_config = reload
        self.prepare = prepare
        self.current = Generation(1, config, prepared, self._sockets_for(config, worker_count(config), None))
        self.logins = LoginTable()  # failed logins, counted across the workers
        share_logins(prepared.app, self.logins)
        self.incoming: Generation | None = None  # a reload whose workers are starting
        self.retiring: list[Generation] = []  # told to stop; their sockets close after them
        self.children: dict[int, Worker] = {}
        self.restarts: dict[int, float] = {}  # slot -> when to start its next worker
        self.start_failures: dict[int, int] = {}
        self.quick_deaths: dict[int, int] = {}
        self.stopping = False
        self.reload_wanted = False
        self.exit_code = 0
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.pid = os.getpid()

    # -- sockets --------------------------------------------------------------------
    def _sockets_for(self, config: Config, count: int, previous: Generation | None) -> list[list[socket.socket]]:
        """The slots' sockets for `config`: those of `previous` while the address is the
        same (their queues carry on), new ones beside them otherwise."""
        reuse = previous.sockets if previous is not None and previous.config.listen == config.listen else []
        made: list[list[socket.socket]] = []
        try:
            if not reuse:
                check_free(config.host, config.port)
            for _ in range(len(reuse), count):
                made.append(listening_sockets(config.host, config.port))
        except OSError as exc:
            for sockets in made:
                for sock in sockets:
                    sock.close()
            raise StartupError(f"cannot listen on {config.listen}: {reason(exc)}") from None
        return (reuse + made)[:count]

    def _release_sockets(self, generation: Generation) -> None:
        """Close what only `generation` used (after its workers are gone)."""
        kept = {id(s) for g in (self.current, self.incoming) if g is not None and g is not generation
                for slot in g.sockets for s in slot}
        for slot in generation.sockets:
            for sock in slot:
                if id(sock) not in kept:
                    sock.close()

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        try:
            self._run()
        finally:
            signal.set_wakeup_fd(-1)
            for generation in (self.current, self.incoming, *self.retiring):
                if generation is not None:
                    self._release_sockets(generation)
            self.logins.remove()
        return self.exit_code

    def _run(self) -> None:
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # the wake-up pipe carries the signal's number
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        for slot in range(self.current.size):
            self._start(self.current, slot)
        while self.children or not self.stopping:
            self._wait()
            self._reap()
            now = time.monotonic()
            for slot, when in list(self.restarts.items()):
                if when <= now and not self.stopping:
                    del self.restarts[slot]
                    self._start(self.current, slot)
            self._advance()

    def _wait(self) -> None:
        deadlines = list(self.restarts.values())
        if self.incoming is not None:
            deadlines.append(self.incoming.started + READY_TIMEOUT)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self.selector.select(timeout):
            if key.fd == self.wake_r:
                try:
                    numbers = os.read(self.wake_r, 512)
                except BlockingIOError:
                    numbers = b""
                for number in numbers:
                    self._signal(number)
            else:
                self._ready_pipe(key.data)

    def _signal(self, number: int) -> None:
        if number in STOP_SIGNALS:
            if self.stopping:  # a second SIGINT/SIGTERM: no more waiting for requests in progress
                log.warning("stopping at once: killing %d worker(s)", len(self.children))
                self._send_all(signal.SIGKILL)
                return
            log.info("%s: stopping %d worker(s) (they finish the requests in progress)",
                     signal.Signals(number).name, len(self.children))
            self._stop(number)
        elif number == signal.SIGHUP and not self.stopping:
            if self.incoming is not None:
                self.reload_wanted = True  # once this one is done
            else:
                self._reload()

    def _stop(self, sig: int) -> None:
        self.stopping = True
        self.restarts.clear()
        self._send_all(sig)

    def _send_all(self, sig: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _ready_pipe(self, worker: Worker) -> None:
        try:
            data = os.read(worker.ready_fd, 16)
        except OSError:
            data = b""
        if READY in data:
            worker.ready = True
            if worker.generation is self.current:
                self.start_failures.pop(worker.slot, None)
        self._close_ready_pipe(worker)

    def _close_ready_pipe(self, worker: Worker) -> None:
        if worker.ready_fd >= 0:
            self.selector.unregister(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = -1

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.children.pop(pid, None)
            if worker is not None:
                if worker.ready_fd >= 0:  # what it wrote before it died (the write end is closed)
                    self._ready_pipe(worker)
                self._forget_logins(pid, status)
                worker_exited(pid)  # its gauges of what is in progress stop counting
                self._exited(worker, status)

    def _forget_logins(self, pid: int, status: int) -> None:
        if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) != 0:
            try:
                self.logins.forget(pid)
            except sqlite3.Error as exc:
                log.error("cannot release the login checks of worker pid %d: %s", pid, exc)

    def _exited(self, worker: Worker, status: int | None) -> None:
        generation = worker.generation
        if generation.workers.get(worker.slot) is worker:
            del generation.workers[worker.slot]
        how = _describe(status) if status is not None else "could not be started"
        if generation in self.retiring:
            log.debug("worker %d (pid %d) of the previous configuration %s", worker.number, worker.pid, how)
            if not generation.workers:
                self.retiring.remove(generation)
                self._release_sockets(generation)
                log.info("reload complete: the workers of the previous configuration have finished")
            return
        if self.stopping:
            log.debug("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return
        if generation is self.incoming:
            self._abandon_reload(f"worker {worker.number} (pid {worker.pid}) of the new configuration {how} "
                                 "before it was ready")
            return
        lived = time.monotonic() - worker.started
        if not worker.ready:
            failures = self.start_failures[worker.slot] = self.start_failures.get(worker.slot, 0) + 1
            if failures >= START_FAILURES:
                log.error("worker %d %s before it was ready, %d times in a row: giving up, stopping the "
                          "other workers (see the lines above for why it failed)", worker.number, how, failures)
                self.exit_code = 1
                self._stop(signal.SIGTERM)
                return
        quick = self.quick_deaths[worker.slot] = self.quick_deaths.get(worker.slot, 0) + 1 \
            if lived < STABLE_SECONDS else 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (quick - 1)) if quick else 0.0
        log.warning("worker %d (pid %d) %s after %.1f s; starting another%s", worker.number, worker.pid, how,
                    lived, f" in {delay:g} s" if delay else "")
        self.restarts[worker.slot] = time.monotonic() + delay

    # -- reloads --------------------------------------------------------------------
    def _reload(self) -> None:
        try:
            config = self.reload_config()
            prepared = self.prepare(config)
            sockets = self._sockets_for(config, worker_count(config), self.current)
        except (ConfigError, StartupError) as exc:
            log.error("SIGHUP: not reloaded, still serving with the previous configuration: %s", exc)
            return
        configure_logging(config.log_level, config.log_format)
        share_logins(prepared.app, self.logins)
        self.incoming = generation = Generation(self.current.number + 1, config, prepared, sockets)
        log.info("SIGHUP: configuration read; starting %d new worker(s)", generation.size)
        for slot in range(generation.size):
            if self.incoming is not generation:  # abandoned: a worker could not be started
                break
            self._start(generation, slot)

    def _abandon_reload(self, why: str) -> None:
        generation, self.incoming = self.incoming, None
        log.error("SIGHUP: not reloaded, still serving with the previous configuration: %s", why)
        self._retire(generation)

    def _retire(self, generation: Generation) -> None:
        for worker in generation.workers.values():
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if generation.workers:
            self.retiring.append(generation)
        else:
            self._release_sockets(generation)

    def _advance(self) -> None:
        if not self.current.announced and self.current.all_ready():
            self.current.announced = True
            for level, message in self.current.prepared.notes:
                log.log(level, "%s", message)
            pids = [str(self.current.workers[slot].pid) for slot in range(self.current.size)]
            log.info("%d worker%s (pid%s %s)", len(pids), "s" if len(pids) > 1 else "", "s" if len(pids) > 1 else "",
                     ", ".join(pids))
        incoming = self.incoming
        if incoming is None or self.stopping:
            return
        if incoming.all_ready():
            previous, self.current, self.incoming = self.current, incoming, None
            self.restarts.clear()
            self.start_failures.clear()
            self.quick_deaths.clear()
            self._retire(previous)
            self._advance()  # announces the new configuration's notes
            if self.reload_wanted:
                self.reload_wanted = False
                self._reload()
        elif time.monotonic() > incoming.started + READY_TIMEOUT:
            self._abandon_reload(f"its workers were not ready within {READY_TIMEOUT:g} s")

    # -- workers --------------------------------------------------------------------
    def _start(self, generation: Generation, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: as a worker that failed to start
            os.close(ready_r)
            os.close(ready_w)
            log.error("cannot start worker %d: %s", slot + 1, reason(exc))
            self._exited(Worker(slot, 0, generation, -1, time.monotonic()), None)
            return
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                self._become_worker(generation, slot, ready_w)
                code = 0
            except BaseException:
                log.exception("worker %d stopped by an error", slot + 1)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(ready_w)
        worker = Worker(slot, pid, generation, ready_r, time.monotonic())
        generation.workers[slot] = worker
        self.children[pid] = worker
        self.selector.register(ready_r, selectors.EVENT_READ, worker)

    def _become_worker(self, generation: Generation, slot: int, ready_w: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # meant for the supervisor (a terminal's hang-up too)
        _die_with(self.pid)
        mine = generation.sockets[slot]
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for worker in self.children.values():
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
        self.selector.close()
        for other in (self.current, self.incoming, *self.retiring):
            if other is not None:
                for sockets in other.sockets:
                    for sock in sockets:
                        if sock not in mine:
                            sock.close()
        configure_logging(generation.config.log_level, generation.config.log_format, worker=slot + 1)

        def ready() -> None:
            os.write(ready_w, READY)
            os.close(ready_w)

        from .quota import RECOUNT_AT_START
        from .serve import run
        prepared = generation.prepared
        prepared.app[RECOUNT_AT_START] = slot == 0  # one recount of the shared ledgers is enough
        run(prepared.app, generation.config, prepared.ssl_context, socks=mine, ready=ready)


def _die_with(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies (killed: it cannot forward anything)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def supervise(config: Config, prepared: Ready, reload: Callable[[], Config],
              prepare: Callable[[Config], Ready]) -> int:
    """Run worker_count(config) workers until SIGINT or SIGTERM; the exit status. Raises
    StartupError (before any worker starts) when the address cannot be bound."""
    return Supervisor(config, prepared, reload, prepare).run()
