"""Approvals: the words, the osascript argv, and real round trips through dunst."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from earthkamal_agent.approvals import ApprovalRequest, CliApprover, body, select, summary
from earthkamal_agent.approvals.macos import (
    OsascriptApprover,
    dialog_argv,
    notify_argv,
    parse_dialog_output,
)
from earthkamal_agent.errors import UserError

REQ = ApprovalRequest(
    job_id=42, service="myapp", version="v1.4.0", destination="production",
    repo="/home/me/src/myapp", commit="0123456789abcdef0123456789abcdef01234567",
    subject="Fix the login form", digest="sha256:" + "ab" * 32,
    changes=("Fix the login form", "Bump rails", "Add <b>bold</b> & more"), change_count=7,
    previous_version="v1.3.2",
)


# -- pure functions -----------------------------------------------------------------------------

def test_summary() -> None:
    assert summary(REQ) == "Deploy myapp v1.4.0 to production?"
    first = ApprovalRequest(**{**REQ.__dict__, "destination": None})
    assert summary(first) == "Deploy myapp v1.4.0 to the default destination?"


def test_body_with_actions() -> None:
    text = body(REQ, with_actions=True)
    lines = text.splitlines()
    assert lines[0] == "Repo: /home/me/src/myapp"
    assert lines[1] == "Commit: 0123456 Fix the login form"
    assert lines[2] == "Image: sha256:abababababab"
    assert "7 commits since v1.3.2:" in lines
    assert "  • Bump rails" in lines
    assert "  … and 4 more" in lines
    assert lines[-1] == ("Or from a terminal: earthkamal-agent approve 42 "
                         "(or: earthkamal-agent reject 42)")


def test_body_without_actions_names_the_cli() -> None:
    text = body(REQ, with_actions=False)
    assert "To deploy, run: earthkamal-agent approve 42" in text
    assert "To reject, run: earthkamal-agent reject 42" in text


def test_body_first_deploy_and_no_previous() -> None:
    first = ApprovalRequest(**{**REQ.__dict__, "change_count": None, "changes": ()})
    assert "First deploy to production." in body(first, with_actions=True)
    one = ApprovalRequest(**{**REQ.__dict__, "change_count": 1, "changes": ("Only",),
                             "previous_version": None})
    text = body(one, with_actions=True)
    assert "1 commit since the last deploy:" in text
    assert "more" not in text


def test_osascript_argv_passes_text_as_data() -> None:
    evil = ApprovalRequest(**{**REQ.__dict__, "subject": 'x" & (do shell script "rm -rf ~") & "'})
    argv = dialog_argv(evil, give_up_after=600)
    assert argv[0] == "osascript"
    script = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert script[0] == "on run argv" and script[-1] == "end run"
    assert not any("rm -rf" in line or "myapp" in line for line in script)
    items = list(argv[2 * len(script) + 1:])
    assert items[0] == "earthkamal-agent"  # fixed first item: no later item looks like an option
    assert items[2].startswith("Deploy myapp v1.4.0 to production?\n\n")
    assert 'do shell script "rm -rf ~"' in items[2]
    assert items[3] == "600"
    assert any('buttons {"Reject", "Deploy"}' in line and "giving up after" in line
               for line in script)
    n = notify_argv("Deployed myapp v1.4.0", "to production")
    assert n[-2:] == ("Deployed myapp v1.4.0", "to production")


@pytest.mark.parametrize(("out", "want"), [
    ("button returned:Deploy, gave up:false\n", "approve"),
    ("button returned:Reject, gave up:false", "reject"),
    ("button returned:, gave up:true", None),
    ("button returned:Deploy, gave up:true", None),
    ("", None),
    ("execution error: User canceled. (-128)", None),
])
def test_parse_dialog_output(out: str, want: str | None) -> None:
    assert parse_dialog_output(out) == want


def test_osascript_unavailable_on_linux() -> None:
    assert OsascriptApprover().available() == "osascript dialogs are only available on macOS."


def test_select(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select("none").name == "none"
    with pytest.raises(UserError, match="Unknown approval backend"):
        select("carrier-pigeon")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    with pytest.raises(UserError, match="DBUS_SESSION_BUS_ADDRESS is unset"):
        select("dbus")
    assert isinstance(select("auto"), CliApprover)


def test_cli_approver_logs_the_command(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "earthkamal_agent.approvals")
    CliApprover().ask(REQ, lambda *_: None)
    assert "earthkamal-agent approve 42" in caplog.text
    assert "Deploy myapp v1.4.0 to production?" in caplog.text


# -- real round trips through dunst ---------------------------------------------------------------

class Decisions:
    """Collects on_decision calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.event = threading.Event()

    def __call__(self, job_id: int, decision: str) -> None:
        self.calls.append((job_id, decision))
        self.event.set()

    def wait(self, timeout: float = 10) -> list[tuple[int, str]]:
        assert self.event.wait(timeout), "no decision arrived"
        return self.calls


def _req(job_id: int, version: str) -> ApprovalRequest:
    return ApprovalRequest(**{**REQ.__dict__, "job_id": job_id, "version": version})


@pytest.fixture
def dbus_approver(desktop):
    from earthkamal_agent.approvals.dbus import DBusApprover

    desktop.start_server()
    approver = DBusApprover(bus_address=desktop.bus_address)
    yield approver
    approver.close()
    desktop.close_all()


def test_dbus_available(desktop, dbus_approver) -> None:
    assert dbus_approver.available() is None


def test_dbus_unavailable_without_server(desktop) -> None:
    from earthkamal_agent.approvals.dbus import DBusApprover

    desktop.kill_server()
    try:
        approver = DBusApprover(bus_address=desktop.bus_address)
        reason = approver.available()
        approver.close()
        assert reason is not None and "No notification server owns" in reason
    finally:
        desktop.start_server()


@pytest.mark.parametrize(("key", "job_id"), [("approve", 101), ("reject", 102)])
def test_dbus_click_decides(desktop, dbus_approver, key: str, job_id: int) -> None:
    req = _req(job_id, f"v9.{job_id}")
    got = Decisions()
    dbus_approver.ask(req, got)
    shown = desktop.wait_shown(summary(req))
    assert shown["urgency"] == "CRITICAL"
    assert "earthkamal-agent approve" in shown["body"]
    line = desktop.click(key, int(shown["id"]))
    assert line.endswith(f"[{shown['id']},{key}]")
    assert got.wait() == [(job_id, key)]
    assert dbus_approver.pending_jobs() == []
    # the approver closes the (resident) notification itself once decided
    from tests.infra.desktop import wait_for

    wait_for(lambda: any(h["id"] == int(shown["id"]) for h in desktop.history()), 10,
             "the decided notification to be closed")


def test_dbus_close_is_not_an_approval(desktop, dbus_approver) -> None:
    req = _req(103, "v9.103")
    got = Decisions()
    dbus_approver.ask(req, got)
    desktop.wait_shown(summary(req))
    desktop.dunstctl("close")
    from tests.infra.desktop import wait_for

    wait_for(lambda: dbus_approver.pending_jobs() == [], 10, "the approver to forget job 103")
    time.sleep(0.3)
    assert got.calls == []


def test_dbus_withdraw_closes_it(desktop, dbus_approver) -> None:
    req = _req(104, "v9.104")
    got = Decisions()
    dbus_approver.ask(req, got)
    shown = desktop.wait_shown(summary(req))
    dbus_approver.withdraw(104)
    from tests.infra.desktop import wait_for

    wait_for(lambda: any(h["id"] == int(shown["id"]) for h in desktop.history()), 10,
             "the withdrawn notification to be closed")
    with pytest.raises(AssertionError, match="no notification offers"):
        desktop.click("approve", int(shown["id"]), timeout=2)
    assert got.calls == []


def test_dbus_without_actions_names_the_cli(desktop) -> None:
    from earthkamal_agent.approvals.dbus import DBusApprover

    approver = DBusApprover(bus_address=desktop.bus_address, capabilities=("body",))
    try:
        req = _req(105, "v9.105")
        approver.ask(req, Decisions())
        shown = desktop.wait_shown(summary(req))
        assert "To deploy, run: earthkamal-agent approve 105" in shown["body"]
        with pytest.raises(AssertionError, match="no notification offers"):
            desktop.click("approve", int(shown["id"]), timeout=2)
    finally:
        approver.close()
        desktop.close_all()


def test_dbus_notify_informational(desktop, dbus_approver) -> None:
    dbus_approver.notify("Deployed myapp v9.106", "to production in 4 s")
    shown = desktop.wait_shown("Deployed myapp v9.106")
    assert shown["urgency"] == "NORMAL"


def test_dbus_server_killed_mid_approval(desktop, dbus_approver, caplog) -> None:
    caplog.set_level(logging.WARNING, "earthkamal_agent.approvals")
    req = _req(107, "v9.107")
    got = Decisions()
    dbus_approver.ask(req, got)
    desktop.wait_shown(summary(req))
    desktop.kill_server()
    from tests.infra.desktop import wait_for

    wait_for(lambda: "left the session bus" in caplog.text, 10, "the warning")
    assert dbus_approver.pending_jobs() == [107]  # still waiting; nothing decided
    other = _req(108, "v9.108")
    dbus_approver.ask(other, got)  # no server now: logged, no exception
    assert "could not show the approval notification for job 108" in caplog.text
    seen = len(desktop.shown())
    desktop.start_server()  # a server comes back: both are shown again
    desktop.wait_shown(summary(req), after=seen)
    desktop.wait_shown(summary(other), after=seen)
    desktop.click("approve")
    assert got.wait() in ([(107, "approve")], [(108, "approve")])
    assert got.calls[0][1] == "approve"


def test_dbus_bus_gone_mid_approval(tmp_path, caplog) -> None:
    """The whole bus disappears: logged, nothing decided, next ask does not raise."""
    from earthkamal_agent.approvals.dbus import DBusApprover

    from tests.infra import need_bin
    from tests.infra.desktop import start_bus, wait_for

    need_bin("dbus-daemon")
    caplog.set_level(logging.WARNING, "earthkamal_agent.approvals")
    bus, address = start_bus(tmp_path)
    approver = DBusApprover(bus_address=address, capabilities=("actions",))
    try:
        got = Decisions()
        approver.ask(_req(109, "v9.109"), got)  # nobody owns the name: warned, kept pending
        bus.kill()
        bus.wait()
        wait_for(lambda: "lost the D-Bus session bus" in caplog.text, 10, "the warning")
        approver.ask(_req(110, "v9.110"), got)
        assert approver.pending_jobs() == [109, 110]
        assert got.calls == []
    finally:
        approver.close()


def test_dbus_escapes_body_for_markup_servers() -> None:
    from earthkamal_agent.approvals.dbus import DBusApprover

    approver = DBusApprover(bus_address="unix:path=/nonexistent",
                            capabilities=("actions", "body-markup"))
    assert approver._body_for_server(None, "Add <b>x</b> & y") == "Add &lt;b&gt;x&lt;/b&gt; &amp; y"
    plain = DBusApprover(bus_address="unix:path=/nonexistent", capabilities=("actions",))
    assert plain._body_for_server(None, "a <b> & c") == "a <b> & c"


def test_dbus_ignores_default_action_and_foreign_ids() -> None:
    """Only Deploy/Reject on our own notification ids decide; a body click ("default") never."""
    from earthkamal_agent.approvals.dbus import IFACE, PATH, DBusApprover, _Pending
    from jeepney import DBusAddress, new_signal

    approver = DBusApprover(bus_address="unix:path=/nonexistent", capabilities=("actions",))
    class DeadLink:
        alive = False  # so the decision's CloseNotification is skipped

    link = DeadLink()
    approver._link = link  # type: ignore[assignment]
    got = Decisions()
    approver._pending[7] = _Pending(_req(7, "v7"), got, nid=70)
    approver._by_nid[70] = 7

    def signal(member: str, sig: str, body: tuple):
        return new_signal(DBusAddress(PATH, interface=IFACE), member, sig, body)

    approver._on_signal(link, signal("ActionInvoked", "us", (70, "default")))
    approver._on_signal(link, signal("ActionInvoked", "us", (71, "approve")))
    approver._on_signal(object(), signal("ActionInvoked", "us", (70, "approve")))  # stale link
    assert got.calls == [] and approver.pending_jobs() == [7]
    approver._on_signal(link, signal("ActionInvoked", "us", (70, "reject")))
    assert got.calls == [(7, "reject")] and approver.pending_jobs() == []
