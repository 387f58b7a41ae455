"""The master: one thread, one poll loop, owning the control socket and the pool.

Runs in: the master.

Like gunicorn's arbiter, signal handlers only queue the signal and wake the loop (through a
wakeup fd the poller watches); the loop dispatches handle_<signal>. Everything else arrives as
a readable socket or fd, each with its handler in the reactor: client requests on the control
ROUTER, each worker's and zygote's channel. Deadlines (task timeouts, the watchdog, the stop
grace period) bound how long one poll may sleep. At the end of each turn, jobs that can go are
dispatched and what was queued for each worker is written in one go.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import zmq

from workerctl import protocol
from workerctl.paths import resolve_socket_path
from workerd import config as configuration
from workerd import control, memory
from workerd.access import Access
from workerd.admission import RequestRejected
from workerd.clients import Clients
from workerd.cluster.backend import Cluster
from workerd.core import processes
from workerd.core.backend import Backend, Services
from workerd.core.lifecycle import STOP_MESSAGE, Ledger
from workerd.core.reactor import Reactor
from workerd.gpu.backend import GpuWorkers
from workerd.handlers import DEFERRED, Commands, Incoming
from workerd.limits import ClientLimits
from workerd.metrics import Metrics
from workerd.notify import Notifier
from workerd.pool.backend import Pool

if TYPE_CHECKING:
    from workerd.exporter import Exporter

log = logging.getLogger("workerd")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
SIGNAL_NAMES = {sig: sig.name.lower() for sig in SIGNALS}
# At most this many client messages per loop turn, so workers' results are never starved.
CONTROL_BATCH = 256
# After the grace period, give killed workers this long to be reaped before we exit anyway.
EXIT_WAIT_S = 3.0
# The longest one poll sleeps. Deadlines come from clients (a task's timeout_s may be 1e300 s):
# converted to milliseconds unclamped, such a deadline overflowed the int zmq_poll takes (or
# became infinite) and the exception ended the loop, i.e. one request killed the daemon. Waking
# once a minute with nothing to do costs nothing.
MAX_POLL_MS = 60_000
# After a burst, glibc keeps the freed memory in its arenas: measured, 8,000 idle connections
# (opened and closed) left the master at 51 MiB RSS instead of 22 for the rest of its life. Once
# the loop has been idle this long after activity, it hands that memory back (memory.trim).
TRIM_AFTER_IDLE_S = 1.0


class Master:
    def __init__(
        self, config: configuration.Config, config_path: str | None, overrides: dict[str, Any]
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.started = time.monotonic()
        self.state = "starting"
        self.metrics = Metrics()
        self.counters = self.metrics.events
        self.exporter: Exporter | None = None
        self.notifier = Notifier()
        self.signals: list[int] = []
        self.pending_reloads: list[Incoming] = []
        self.pending_config: configuration.Config | None = None
        self.reload_generation: int | None = None
        self.reload_queued = False
        self.booted: tuple[bool, str] | None = None  # the first generation's outcome, until READY
        self.stop_deadline = math.inf
        self.exit_deadline = math.inf
        self.next_watchdog = time.monotonic()
        self.trim_at = math.inf
        self.access = Access(config.access)
        self.clients = Clients(config.fairness, self.access.cache)
        self.commands = Commands(self)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.install_signals()
        processes.become_subreaper()
        old, new = control.raise_fd_limit()
        log.debug("open descriptor limit: %d (was %d)", new, old)
        self.context: zmq.Context[Any] = zmq.Context()
        max_bytes = self.config.daemon.max_message_bytes
        path = configuration_socket(self.config)
        fd = control.inherited_fd()
        self.adopted = fd is not None
        self.control, self.socket_path = control.bind(self.context, path, max_bytes, fd)
        # A client's departure ends its work that has not started (Commands.depart).
        departed = self.commands.depart
        self.limits = ClientLimits(self.control, self.socket_path, max_bytes, self.counters, departed)
        self.max_message_bytes = max_bytes
        # Remember which file is ours, to remove it at exit (an adopted socket stays systemd's).
        self.socket_inode = None if self.adopted else os.stat(self.socket_path).st_ino
        self.start_exporter()  # before any process starts: a taken port stops us at once
        # Workers write their stack dumps here, in a directory only we (and they) can enter.
        self.private_dir = tempfile.mkdtemp(prefix="workerd-")
        self.reactor = Reactor()
        self.reactor.watch(self.control, self.handle_control)
        self.reactor.watch(self.limits.monitor, self.limits.read_departures)
        self.reactor.watch(self.wake_read, self.handle_signals)
        if self.exporter is not None:
            exporter = self.exporter
            self.reactor.watch(exporter.wake_read, lambda: self.handle_scrapes(exporter))
        self.ledger = Ledger(self.reply, self.metrics)
        services = Services(self.ledger, self.reactor, self.counters, self.private_dir)
        self.pool = Pool(self.config, services)
        self.pool.generations.on_generation = self.generation_done
        self.gpu = GpuWorkers(self.config, services)
        self.cluster = Cluster(self.config, services, self.pool.submit)
        self.cluster.on_connect = self.finish_boot
        # The same questions of each, each turn (core/backend.py); the pool's first, then the GPU
        # side's, then the cluster's, which takes the pool's overflow.
        self.backends: list[Backend] = [self.pool, self.gpu, self.cluster]
        log.info("workerd listening on %s (config: %s)", self.socket_path, self.config.source)
        self.notifier.status(f"importing task code; serving {self.socket_path}")
        try:
            self.pool.generations.start(self.config)
        except OSError as exc:
            failure = self.pool.generations.failure = f"cannot start the zygote: {exc}"
            log.error("%s", failure)
            self.generation_done(0, False, failure)
        if self.gpu.enabled and self.config.gpu.start == "boot":
            self.gpu.start()
        self.cluster.start()

    def start_exporter(self) -> None:
        address = self.config.metrics.address()
        if address is None:
            return
        from workerd.exporter import Exporter  # prometheus_client is loaded only when asked for

        try:
            self.exporter = Exporter(*address)
        except OSError as exc:
            raise control.ControlSocketError(
                f"cannot serve metrics on {self.config.metrics.listen}: {exc.strerror or exc}"
            ) from None
        log.info("metrics at %s", self.exporter.url)

    def install_signals(self) -> None:
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        # SIGUSR1 prints every thread's stack to stderr, as it does in workers (never kills us).
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        for sig in SIGNALS:
            signal.signal(sig, self.queue_signal)

    def queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # -- loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
            while self.state != "stopped":
                self.poll_once()
        finally:
            self.cleanup()
        log.info("workerd stopped")
        return 0

    def poll_once(self) -> None:
        # Deadlines read once a turn: whatever this turn adds is due later, not now.
        due = [backend.next_deadline() for backend in self.backends]
        events = self.reactor.poll(self.poll_timeout_ms(min(due)))
        self.reactor.dispatch(events)
        now = time.monotonic()
        for backend, when in zip(self.backends, due, strict=True):
            if now >= when:
                backend.tick()
        for backend in self.backends:
            backend.dispatch()
        if self.pool.queue:  # what the local workers could not take may spill to the cluster
            self.cluster.take_overflow(self.pool.queue, self.pool.depth)
        self.reactor.flush()
        self.ping_watchdog(now)
        self.trim_when_idle(bool(events), now)
        if self.state == "stopping":
            self.advance_stop(now)

    def poll_timeout_ms(self, due: float) -> int:
        deadline = min(due, self.stop_deadline, self.exit_deadline, self.trim_at)
        if self.notifier.watchdog_interval:
            deadline = min(deadline, self.next_watchdog)
        if self.state == "stopping":
            deadline = min(deadline, time.monotonic() + 0.1)
        if deadline == math.inf:
            return -1
        return max(0, math.ceil(min((deadline - time.monotonic()) * 1000, MAX_POLL_MS)))

    def trim_when_idle(self, active: bool, now: float) -> None:
        if active:
            self.trim_at = now + TRIM_AFTER_IDLE_S
        elif now >= self.trim_at:
            self.trim_at = math.inf
            memory.trim()

    def ping_watchdog(self, now: float) -> None:
        # Sent from the loop itself, so a loop that stalls stops the pings and systemd notices.
        interval = self.notifier.watchdog_interval
        if interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + interval

    # -- clients -------------------------------------------------------------------------------

    def handle_control(self) -> None:
        """Every request waiting, up to CONTROL_BATCH: read without blocking until none is
        left (one zmq.Again a turn costs less than asking ZMQ_EVENTS before each message)."""
        for _ in range(CONTROL_BATCH):
            try:
                frames = self.receive()
            except zmq.Again:
                return
            self.handle_request(frames)

    def receive(self) -> list[Any]:
        """One client message: [routing id, delimiter, body, *raw frames]; zmq.Again if none.

        The routing id comes as a zmq.Frame, which carries the connection's metadata (the
        peer's credentials, for [access]); delimiter and body as bytes, which is what decoding
        needs; raw frames as zmq.Frames again, forwarded to a worker without a copy. A message
        is delivered whole or not at all, so only its first frame can raise zmq.Again."""
        recv = self.control.recv
        frame = recv(zmq.NOBLOCK, copy=False)
        frames: list[Any] = [frame]
        while frame.more:  # Frame.more, not getsockopt(RCVMORE): pyzmq makes an enum of each option
            frame = recv(copy=False)
            frames.append(frame.bytes if len(frames) < 3 else frame)
        return frames

    def handle_request(self, frames: list[Any]) -> None:
        arrived_at = time.monotonic()
        client = frames[0].bytes
        if not self.limits.seen(client, frames[0]):
            return  # left over from a connection cut off for not reading its replies
        if len(frames) < 3 or frames[1] != b"":
            message = "a request is two frames: an empty delimiter and a msgpack body"
            self.refuse_bad(client, None, protocol.BAD_REQUEST, message, arrived_at)
            return
        try:
            request = protocol.decode_request(frames[2])
        except protocol.ProtocolError as exc:
            self.refuse_bad(client, exc.request_id, exc.code, exc.message, arrived_at)
            return
        cmd = request["cmd"]
        handler = self.commands.lookup(cmd)
        if handler is None:
            message = f"unknown command {cmd!r}"
            self.refuse_bad(client, request["id"], protocol.UNKNOWN_COMMAND, message, arrived_at)
            return
        self.counters[f"requests_{cmd}"] += 1
        msg = Incoming(client, frames[2], request, frames[3:], arrived_at, frames[0])
        denial = self.access.denial(cmd, frames[0])
        if denial is not None:
            self.counters["access_denied"] += 1
            message, details = denial
            log.info("denied: %s", message)
            self.refuse(msg, protocol.DENIED, message, details)
            return
        try:
            result = handler(msg)
        except RequestRejected as exc:
            self.counters[f"rejected_{exc.code.lower()}"] += 1
            self.refuse(msg, exc.code, exc.message)
            return
        except Exception as exc:
            log.exception("command %s failed", cmd)
            self.refuse(msg, protocol.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if result is not DEFERRED:
            self.answer(msg, result)

    def answer(self, msg: Incoming, result: Any) -> None:
        """The final reply to a command other than execute (the pool and GPU worker answer those)."""
        self.metrics.answered(msg.request["cmd"], "ok", msg.arrived_at)
        self.reply(msg.client, protocol.encode_result(msg.id, result))

    def refuse(self, msg: Incoming, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.metrics.answered(msg.request["cmd"], code.lower(), msg.arrived_at)
        self.reply(msg.client, protocol.encode_error(msg.id, code, message, details))

    def refuse_bad(self, client: bytes, request_id: Any, code: str, message: str, arrived_at: float) -> None:
        """A message that is no command at all: counted under the command "invalid"."""
        self.counters["bad_requests"] += 1
        self.metrics.answered("invalid", code.lower(), arrived_at)
        self.reply(client, protocol.encode_error(request_id, code, message))

    def reply(self, client: bytes, frame: bytes, raw: Sequence[bytes] = ()) -> None:
        """Send one reply body, followed by the raw buffer frames it refers to, if any.

        Never blocks: a reply to a client that has gone is dropped; a client that stopped
        reading is cut off once its replies fill its queue or hold too many bytes (limits.py)."""
        self.limits.send(client, [b"", frame, *raw])

    # -- metrics -------------------------------------------------------------------------------

    def handle_scrapes(self, exporter: Exporter) -> None:
        """Prometheus asked (exporter.py): one snapshot answers every scrape waiting now."""
        if not exporter.take_requests():
            return
        try:
            self.commands.scrape(exporter.deliver)
        except Exception:  # a scrape must never end the loop; it then times out (HTTP 500)
            log.exception("gathering metrics failed")

    # -- reload --------------------------------------------------------------------------------

    def reload(self, requester: Incoming | None) -> None:
        """Re-read the config and start a new generation of task code; workers roll over.

        The new config takes effect only once its code has imported: until then, and for good
        if the import fails, the running generation keeps serving with its own settings."""
        if requester is not None:
            self.pending_reloads.append(requester)
        if self.state == "stopping":
            self.finish_reloads(protocol.SHUTTING_DOWN, STOP_MESSAGE)
            return
        if self.state in ("starting", "reloading"):
            self.reload_queued = self.state == "starting"  # the first boot finishes first
            return  # joins the reload in progress
        try:
            config = load_config(self.config_path, self.overrides)
        except configuration.ConfigError as exc:
            log.error("reload refused: %s", exc)
            self.finish_reloads(protocol.INTERNAL, f"reload refused: {exc}")
            return
        if configuration_socket(config) != configuration_socket(self.config):
            log.warning("reload: the socket path changes only on restart")
        # [access] and [fairness] do not depend on task code: they apply at once, not once the
        # new code has imported (nor never, if the import fails): tightening access must not wait.
        self.access.reconfigure(config.access)
        self.clients.reconfigure(config.fairness)
        try:
            generation = self.pool.generations.start(config)
        except OSError as exc:
            # Answered here, once, and the state never leaves "running": an exception out of
            # here was answered INTERNAL by the handler yet left the reload pending (answered
            # again at stop) and the state "reloading" (later reloads joined it, never ended);
            # from SIGHUP it ended the loop.
            log.error("reload failed: cannot start a zygote: %s", exc)
            self.finish_reloads(protocol.INTERNAL, f"reload failed: cannot start a zygote: {exc}")
            return
        self.state = "reloading"
        self.notifier.reloading()
        log.info("reloading: importing task code into a new zygote")
        self.pending_config = config
        self.reload_generation = generation

    def generation_done(self, generation: int, ok: bool, message: str) -> None:
        """A zygote is ready or failed to import: the first boot, a reload, or a restart."""
        if self.state == "stopping":
            return
        if self.state == "starting":
            self.booted = (ok, message)
            self.finish_boot()
            return
        if generation != self.reload_generation:
            return  # a restart after a crash: nothing to announce
        self.reload_generation = None
        if ok and self.pending_config is not None:
            self.config = self.pending_config
            self.gpu.reconfigure(self.config)
            self.cluster.reconfigure(self.config)
        self.pending_config = None
        self.state = "running"
        self.notifier.ready(f"serving {self.socket_path}" if ok else f"reload failed: {message}")
        if ok:
            self.finish_reloads(None, message)
        else:
            self.finish_reloads(protocol.INTERNAL, message)

    def finish_boot(self) -> None:
        """READY=1 once the first generation is ready (or failed) and, with [cluster] engine
        set, the bridge has connected or said why it cannot: `systemctl start` then returns to
        a daemon whose cluster is usable, or whose status says in one line why not."""
        if self.state != "starting" or self.booted is None or self.cluster.connecting:
            return
        ok, message = self.booted
        self.notifier.ready(f"serving {self.socket_path}" if ok else f"degraded: {message}")
        self.state = "running"
        if self.reload_queued:
            self.reload_queued = False
            self.reload(None)

    def finish_reloads(self, code: str | None, message: str) -> None:
        """Answer every pending reload: its new generation, or the error `code`."""
        for msg in self.pending_reloads:
            if code is None:
                self.answer(msg, {"generation": self.pool.generations.generation})
            else:
                self.refuse(msg, code, message)
        self.pending_reloads.clear()

    # -- signals -------------------------------------------------------------------------------

    def handle_signals(self) -> None:
        try:
            os.read(self.wake_read, 4096)
        except BlockingIOError:
            pass
        queued, self.signals = self.signals, []
        for signum in queued:
            getattr(self, f"handle_{SIGNAL_NAMES[signal.Signals(signum)]}")()

    def handle_sigterm(self) -> None:
        if self.state == "stopping":
            log.warning("second stop signal: not waiting for tasks in flight")
            self.stop_deadline = time.monotonic()
            return
        self.begin_stop()

    handle_sigint = handle_sigterm

    def handle_sighup(self) -> None:
        self.reload(None)

    def handle_sigttin(self) -> None:
        self.pool.scale(self.pool.target + 1)

    def handle_sigttou(self) -> None:
        self.pool.scale(self.pool.target - 1)

    def handle_sigchld(self) -> None:
        """Reap every child that exited: zygotes, GPU workers, the Ray bridge, and (we are a
        subreaper) whatever a dead zygote or bridge left behind."""
        for pid, status in processes.reap():
            if not any(backend.reaped(pid, status) for backend in self.backends):
                log.debug("reaped process %d (%s)", pid, processes.describe_exit(status))

    # -- stop ----------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        log.info("stopping: finishing tasks in flight (grace %g s)", self.config.daemon.stop_timeout_s)
        self.state = "stopping"
        self.notifier.stopping()
        self.finish_reloads(protocol.SHUTTING_DOWN, STOP_MESSAGE)
        self.stop_deadline = time.monotonic() + self.config.daemon.stop_timeout_s
        for backend in self.backends:
            backend.begin_stop()

    def advance_stop(self, now: float) -> None:
        if self.exit_deadline == math.inf:  # still letting tasks in flight finish
            if any(backend.busy for backend in self.backends) and now < self.stop_deadline:
                return
            for backend in self.backends:
                backend.abort_running()
            self.exit_deadline = now + EXIT_WAIT_S
        if all(backend.exited for backend in self.backends) or now >= self.exit_deadline:
            self.state = "stopped"

    def cleanup(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        if self.exporter is not None:
            self.exporter.close()
        if hasattr(self, "limits"):
            self.limits.close()
        if hasattr(self, "control"):
            self.control.close(linger=0)
        if hasattr(self, "context"):
            self.context.term()
        inode = getattr(self, "socket_inode", None)
        if inode is not None:
            control.remove_own_socket(self.socket_path, inode)
        if hasattr(self, "private_dir"):
            shutil.rmtree(self.private_dir, ignore_errors=True)


def configuration_socket(config: configuration.Config) -> str:
    return resolve_socket_path(config.daemon.socket or None)


def load_config(path: str | None, overrides: dict[str, Any]) -> configuration.Config:
    return configuration.load(path).with_overrides(**overrides)
