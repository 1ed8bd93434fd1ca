"""`earthkamal-agent run`: the foreground daemon.

One instance per state dir (an flock on ``run/agent.lock``). The main thread owns the spool:
a watchdog observer on the flat spool dir wakes it, it drains the files into the store, and
hands runnable jobs to worker threads (the pipeline). On start it recovers interrupted jobs,
drains what was spooled while it was down and reconciles every registered repo's tags.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import logging.handlers
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__, detect, sdnotify
from .errors import UserError
from .lockfile import read_lock
from .paths import Paths
from .store import Store

log = logging.getLogger("earthkamal")


class AgentLock:
    """The single-instance lock; its file says who holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                info = read_lock(self.path)
                for _ in range(50):  # the winner may not have written its PID yet
                    if info.get("pid"):
                        break
                    time.sleep(0.02)
                    info = read_lock(self.path)
                pid = info.get("pid", "?")
                raise UserError(
                    f"another earthkamal-agent is already running (PID {pid}) for "
                    f"{self.path.parent.parent}; stop it first (or use `earthkamal-agent status`)."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()}\nstarted={time.time()}\nversion={__version__}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def setup_logging(paths: Paths, verbose: bool = False) -> None:
    """Plain lines to stderr (journald/launchd capture them) and a bounded rotating file."""
    from .redact import Redactor

    red = Redactor()

    class RedactFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = red(record.getMessage())
            record.args = ()
            return True

    logging.raiseExceptions = False  # a full disk must not print a traceback per record
    root = logging.getLogger("earthkamal")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.addFilter(RedactFilter())
    root.addHandler(err)
    try:
        fh = logging.handlers.RotatingFileHandler(paths.agent_log, maxBytes=1 << 20,
                                                  backupCount=3)
        os.chmod(paths.agent_log, 0o600)
        fh.setFormatter(fmt)
        fh.addFilter(RedactFilter())
        root.addHandler(fh)
    except OSError as e:
        log.warning("cannot write %s: %s", paths.agent_log, e)


class Agent:
    """The running agent: spool watcher, store, and the pipeline's workers."""

    def __init__(self, paths: Paths, once: bool = False, hold: bool = False) -> None:
        self.paths = paths
        self.once = once
        self.hold = hold
        self.wake: queue.Queue[str] = queue.Queue()
        self.stopping = threading.Event()
        self.lock = AgentLock(paths.lock)
        self.store: Store | None = None
        self.pipeline = None
        self.observer = None

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        sdnotify.detach()  # children (earthly, docker, kamal) must not inherit NOTIFY_SOCKET
        self.paths.ensure()
        self.lock.acquire()
        self.store = Store(self.paths.db)
        self._signals()
        try:
            self._start_pipeline()
            if not self.once:
                self._start_observer()
            sdnotify.notify("READY=1")
            sdnotify.notify(f"STATUS=watching {self.paths.spool}")
            log.info("earthkamal-agent %s running (PID %d), state in %s", __version__,
                     os.getpid(), self.paths.home)
            if self.pipeline is not None:
                self.pipeline.recover()
            self._cycle(reconcile=True)
            if self.once:
                if self.pipeline is not None:
                    self.pipeline.wait_idle()
                return 0
            self._loop()
            return 0
        finally:
            sdnotify.notify("STOPPING=1")
            self._shutdown()

    def _signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            sdnotify.notify("STOPPING=1")
            self.stopping.set()
            self.wake.put("stop")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self.wake.put("reconcile"))

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        agent = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001
                dest = getattr(event, "dest_path", "") or event.src_path
                if str(dest).endswith(".ev"):
                    agent.wake.put("spool")

        self.observer = Observer()
        self.observer.schedule(Handler(), str(self.paths.spool), recursive=False)
        self.observer.start()

    def _start_pipeline(self) -> None:
        if self.hold:
            return
        try:
            from .pipeline import Pipeline
        except ImportError:
            return
        self.pipeline = Pipeline(self.paths, self.store, self.wake, self.stopping)

    def _cycle(self, reconcile: bool = False) -> None:
        assert self.store is not None
        detect.drain(self.store, self.paths)
        if reconcile:
            for repo in self.store.repos():
                detect.reconcile(self.store, repo)
        if self.pipeline is not None:
            self.pipeline.schedule()

    def _loop(self) -> None:
        last_housekeeping = 0.0
        while not self.stopping.is_set():
            timeout = self.pipeline.next_deadline() if self.pipeline else 60.0
            try:
                reason = self.wake.get(timeout=max(0.05, min(timeout, 60.0)))
            except queue.Empty:
                reason = "timer"
            if self.stopping.is_set():
                break
            while True:  # collapse a burst of wake-ups into one cycle
                try:
                    more = self.wake.get_nowait()
                    reason = "reconcile" if "reconcile" in (reason, more) else reason
                except queue.Empty:
                    break
            try:
                self._cycle(reconcile=reason == "reconcile")
                if time.monotonic() - last_housekeeping > 3600:
                    last_housekeeping = time.monotonic()
                    if self.pipeline is not None:
                        self.pipeline.housekeeping()
            except Exception:  # noqa: BLE001 - the agent must keep running
                log.exception("cycle failed; continuing")

    def _shutdown(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.store is not None:
            self.store.close()
        self.lock.release()
        log.info("stopped")
