"""Linux desktops: freedesktop Notifications over D-Bus (pure Python, jeepney).

A server that supports actions shows [Deploy] [Reject] on a critical, resident notification
that does not expire; ``ActionInvoked`` with our id and one of those keys is the decision.
Closing the notification (any reason) is never an approval. Servers without actions get a
plain notification naming the CLI commands.

Threads: one receive thread per bus connection (replies and signals) and one dispatcher
thread that handles signals and runs the callbacks, so a callback may call back into the
approver (withdraw, notify) without deadlocking. If the notification server or the bus goes
away, outstanding requests stay pending (the job keeps waiting; the CLI still answers it); they
are shown again when a server appears on the bus, or on the next ``ask`` after a reconnect.
"""

from __future__ import annotations

import html
import os
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.threading import ReceiveStopped, open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

from .base import (
    DECISIONS,
    ApprovalRequest,
    DecisionFn,
    body,
    cli_commands,
    log,
    safe_call,
    summary,
)

BUS_NAME = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"
IFACE = "org.freedesktop.Notifications"
APP_NAME = "earthkamal-agent"
ACTIONS = ["approve", "Deploy", "reject", "Reject"]
URGENCY_NORMAL, URGENCY_CRITICAL = 1, 2
CALL_TIMEOUT = 5.0

_SERVER = DBusAddress(PATH, bus_name=BUS_NAME, interface=IFACE)
_SIGNALS = MatchRule(type="signal", sender=BUS_NAME, interface=IFACE, path=PATH)
_OWNER = MatchRule(
    type="signal", sender="org.freedesktop.DBus", interface="org.freedesktop.DBus",
    member="NameOwnerChanged", path="/org/freedesktop/DBus",
)
_OWNER.add_arg_condition(0, BUS_NAME)

_DBUS_ERRORS = (OSError, ConnectionError, DBusErrorResponse, TimeoutError, FutureTimeout,
                ValueError, EOFError)


def notify_message(
    summary_text: str, body_text: str, *, actions: list[str], critical: bool,
    expire_ms: int, replaces_id: int = 0,
) -> Message:
    """A ``Notify(susssasa{sv}i)`` call."""
    hints: dict[str, tuple[str, object]] = {
        "urgency": ("y", URGENCY_CRITICAL if critical else URGENCY_NORMAL),
        "desktop-entry": ("s", APP_NAME),
    }
    if actions:
        hints["resident"] = ("b", True)
    return new_method_call(
        _SERVER, "Notify", "susssasa{sv}i",
        (APP_NAME, replaces_id, "", summary_text, body_text, actions, hints, expire_ms),
    )


class _Link:
    """One bus connection with a receive thread; events go to the approver's queue."""

    def __init__(self, address: str, events: queue.Queue) -> None:
        self.conn = open_dbus_connection(bus=address)
        self._events = events
        self._lock = threading.Lock()
        self._replies: dict[int, Future] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._receive, name="dbus-notify-rx", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def call(self, msg: Message, timeout: float = CALL_TIMEOUT) -> tuple:
        """Send a method call and return the reply body (DBusErrorResponse on an error)."""
        if not self.alive:
            raise ConnectionError("the D-Bus connection is closed")
        serial = next(self.conn.outgoing_serial)
        fut: Future = Future()
        with self._lock:
            self._replies[serial] = fut
        try:
            self.conn.send(msg, serial=serial)
            return unwrap_msg(fut.result(timeout=timeout))
        finally:
            with self._lock:
                self._replies.pop(serial, None)

    def _receive(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                msg = self.conn.receive()
                kind = msg.header.message_type
                if kind in (MessageType.method_return, MessageType.error):
                    with self._lock:
                        fut = self._replies.get(msg.header.fields.get(HeaderFields.reply_serial))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif kind == MessageType.signal:
                    self._events.put(("signal", self, msg))
        except ReceiveStopped:
            pass
        except Exception as e:  # noqa: BLE001 - the bus went away; reported below
            error = e
        finally:
            with self._lock:
                waiting = list(self._replies.values())
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(ConnectionError("the D-Bus connection was lost"))
            if not self._closing:
                self._events.put(("lost", self, error))

    def close(self) -> None:
        self._closing = True
        try:
            self.conn.interrupt()
            self._thread.join(timeout=2)
            self.conn.close()
        except (OSError, ValueError):
            pass


@dataclass
class _Pending:
    req: ApprovalRequest
    on_decision: DecisionFn
    nid: int | None = None  # the server's notification id while one is shown


class DBusApprover:
    """Approvals as freedesktop notifications. Thread safe.

    ``bus_address`` defaults to ``DBUS_SESSION_BUS_ADDRESS`` (read at each connect).
    ``capabilities`` overrides what the server reports (tests force the no-actions path).
    """

    name = "dbus"

    def __init__(self, bus_address: str | None = None,
                 capabilities: Iterable[str] | None = None) -> None:
        self._address = bus_address
        self._forced_caps = frozenset(capabilities) if capabilities is not None else None
        self._lock = threading.RLock()
        self._events: queue.Queue = queue.Queue()
        self._link: _Link | None = None
        self._owner: str | None = None  # unique name of the notification server
        self._caps: frozenset[str] | None = None
        self._pending: dict[int, _Pending] = {}
        self._by_nid: dict[int, int] = {}
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    # -- public API -------------------------------------------------------------------------

    def available(self) -> str | None:
        if not self._bus_address():
            return ("There is no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset), "
                    "so desktop notifications cannot be shown.")
        try:
            with self._lock:
                link = self._connect()
            if link.call(message_bus.NameHasOwner(BUS_NAME))[0]:
                return None
            if BUS_NAME in link.call(message_bus.ListActivatableNames())[0]:
                return None
        except _DBUS_ERRORS as e:
            return f"Cannot reach the D-Bus session bus ({e})."
        return (f"No notification server owns {BUS_NAME} on the session bus; "
                "start one (for example dunst or mako) or log in to a desktop session.")

    def ask(self, req: ApprovalRequest, on_decision: DecisionFn) -> None:
        """Show ``req``; never raises for bus trouble (the job just keeps waiting)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("approver is closed")
            old = self._pending.pop(req.job_id, None)
            replaces = 0
            if old is not None and old.nid is not None:
                self._by_nid.pop(old.nid, None)
                replaces = old.nid
            pending = _Pending(req, on_decision)
            self._pending[req.job_id] = pending
            try:
                self._connect()
            except _DBUS_ERRORS as e:
                self._warn_unshown(req.job_id, e)
                return
            self._show(pending, replaces)
            self._show_orphans()

    def withdraw(self, job_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(job_id, None)
            if pending is None or pending.nid is None:
                return
            self._by_nid.pop(pending.nid, None)
            link = self._link
        self._close_notification(link, pending.nid)

    def notify(self, summary: str, body: str) -> None:
        try:
            with self._lock:
                link = self._connect()
                self._show_orphans()
                text = self._body_for_server(link, body)
            link.call(notify_message(summary, text, actions=[], critical=False, expire_ms=-1))
        except _DBUS_ERRORS as e:
            log.warning("could not show the notification %r: %s", summary, e)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            shown = [p.nid for p in self._pending.values() if p.nid is not None]
            self._pending.clear()
            self._by_nid.clear()
            link, self._link = self._link, None
        for nid in shown:
            self._close_notification(link, nid)
        if link is not None:
            link.close()
        self._events.put(None)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=2)

    def pending_jobs(self) -> list[int]:
        """Jobs asked and not yet decided, withdrawn or dismissed."""
        with self._lock:
            return sorted(self._pending)

    # -- internals (self._lock held where noted) -----------------------------------------------

    def _bus_address(self) -> str | None:
        return self._address or os.environ.get("DBUS_SESSION_BUS_ADDRESS") or None

    def _connect(self) -> _Link:
        """The live link, reconnecting if needed. Lock held."""
        if self._link is not None and self._link.alive:
            return self._link
        address = self._bus_address()
        if not address:
            raise ConnectionError("DBUS_SESSION_BUS_ADDRESS is unset")
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="dbus-notify",
                                                daemon=True)
            self._dispatcher.start()
        link = _Link(address, self._events)
        try:
            link.call(message_bus.AddMatch(_SIGNALS))
            link.call(message_bus.AddMatch(_OWNER))
            self._owner = self._name_owner(link)
        except _DBUS_ERRORS:
            link.close()
            raise
        self._link, self._caps = link, None
        return link

    @staticmethod
    def _name_owner(link: _Link) -> str | None:
        try:
            return link.call(message_bus.GetNameOwner(BUS_NAME))[0]
        except DBusErrorResponse:
            return None

    def _capabilities(self, link: _Link) -> frozenset[str]:
        """Lock held."""
        if self._forced_caps is not None:
            return self._forced_caps
        if self._caps is None:
            self._caps = frozenset(link.call(new_method_call(_SERVER, "GetCapabilities"))[0])
        return self._caps

    def _body_for_server(self, link: _Link, text: str) -> str:
        """Servers with body-markup parse the body as markup: escape it. Lock held."""
        if "body-markup" in self._capabilities(link):
            return html.escape(text, quote=False)
        return text

    def _show(self, pending: _Pending, replaces: int = 0) -> None:
        """Post one request. Lock held; errors are logged and leave it pending."""
        link = self._link
        req = pending.req
        try:
            if link is None:
                raise ConnectionError("not connected")
            actions = "actions" in self._capabilities(link)
            text = self._body_for_server(link, body(req, with_actions=actions))
            msg = notify_message(
                summary(req), text, actions=ACTIONS if actions else [], critical=True,
                expire_ms=0, replaces_id=replaces,
            )
            nid = int(link.call(msg)[0])
            if self._owner is None:
                self._owner = self._name_owner(link)
        except _DBUS_ERRORS as e:
            self._warn_unshown(req.job_id, e)
            return
        pending.nid = nid
        self._by_nid[nid] = req.job_id
        log.info("asked for approval of job %s (notification %s%s)", req.job_id, nid,
                 "" if actions else ", no action buttons: the CLI answers it")

    def _show_orphans(self) -> None:
        """Post pending requests that have no notification (after a server restart). Lock held."""
        for pending in list(self._pending.values()):
            if pending.nid is None and self._link is not None and self._link.alive:
                self._show(pending)

    def _warn_unshown(self, job_id: int, error: BaseException) -> None:
        approve, reject = cli_commands(job_id)
        log.warning("could not show the approval notification for job %s (%s); it keeps "
                    "waiting: run `%s` or `%s`", job_id, error, approve, reject)

    def _close_notification(self, link: _Link | None, nid: int) -> None:
        if link is None or not link.alive:
            return
        try:
            link.call(new_method_call(_SERVER, "CloseNotification", "u", (nid,)))
        except _DBUS_ERRORS as e:
            log.debug("CloseNotification(%s) failed: %s", nid, e)

    def _forget_shown(self, why: str) -> None:
        """The server or bus is gone: every shown notification is gone with it. Lock held."""
        if self._pending:
            log.warning("%s; %d approval(s) keep waiting and will be shown again when a "
                        "notification server is back (or answer with `earthkamal-agent "
                        "approve <job>`)", why, len(self._pending))
        for pending in self._pending.values():
            pending.nid = None
        self._by_nid.clear()
        self._caps = None
        self._owner = None

    def _dispatch(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            kind, link, payload = event
            try:
                if kind == "lost":
                    with self._lock:
                        if link is not self._link:
                            continue
                        self._link = None
                        self._forget_shown(f"lost the D-Bus session bus ({payload or 'closed'})")
                elif kind == "signal":
                    self._on_signal(link, payload)
            except Exception:  # noqa: BLE001 - keep the dispatcher alive
                log.exception("error handling a D-Bus event")

    def _on_signal(self, link: _Link, msg: Message) -> None:
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        sender = fields.get(HeaderFields.sender)
        if member == "NameOwnerChanged" and fields.get(HeaderFields.interface) == \
                "org.freedesktop.DBus":
            name, _old, new = msg.body
            if name != BUS_NAME:
                return
            with self._lock:
                if link is not self._link:
                    return
                if not new:
                    self._forget_shown("the notification server left the session bus")
                    return
                if _old:
                    self._forget_shown("the notification server was replaced")
                self._owner = new
                self._show_orphans()
            return
        if fields.get(HeaderFields.interface) != IFACE:
            return
        decided: tuple[_Pending, str] | None = None
        with self._lock:
            if link is not self._link or (self._owner is not None and sender != self._owner):
                return
            if member == "ActionInvoked":
                nid, key = int(msg.body[0]), str(msg.body[1])
                job_id = self._by_nid.get(nid)
                if job_id is None or key not in DECISIONS:
                    return  # not ours, or the "default" action (a click on the body)
                del self._by_nid[nid]
                decided = (self._pending.pop(job_id), key)
            elif member == "NotificationClosed":
                nid = int(msg.body[0])
                job_id = self._by_nid.pop(nid, None)
                if job_id is None:
                    return
                self._pending.pop(job_id, None)
                approve, _ = cli_commands(job_id)
                log.info("approval notification for job %s was closed without a decision; "
                         "it keeps waiting: run `%s`", job_id, approve)
                return
        if decided is not None:
            pending, key = decided
            self._close_notification(link, pending.nid or 0)
            safe_call(pending.on_decision, pending.req.job_id, key)  # type: ignore[arg-type]
