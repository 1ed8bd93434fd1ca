"""The job state machine: detected → snapshot → gate → build → publish → approve → deploy.

The daemon's main thread calls :meth:`Pipeline.schedule`; stages run in worker threads, each
with its own store connection. Every stage failure a user can cause ends the job in
``failed`` with the step and one sentence; the log keeps the details.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path

from . import approvals, history, kamal, namecache, publisher, snapshot
from . import repo as gitrepo
from .builders import BuildSpec
from .builders import select as select_builder
from .config import REPO_FILE, load_user_config, parse_repo_config
from .deployer import KamalDeployer
from .errors import UserError
from .joblog import JobLog
from .jobrun import (
    Canceled,
    JobRun,
    StageFailed,
    alive_group,
    pick_scratch,
    platform_of,
    scratch_prefix,
)
from .paths import Paths
from .redact import Redactor
from .runner import Command, Result
from .store import ACTIVE, Job, Store, TransitionError

log = logging.getLogger("earthkamal.pipeline")


class Pipeline:
    def __init__(self, paths: Paths, store: Store, wake: queue.Queue, stopping: threading.Event):
        self.paths = paths
        self.store = store
        self.wake = wake
        self.stopping = stopping
        self.user = load_user_config(paths.user_config)
        self.build_slots = threading.BoundedSemaphore(int(self.user.get("builds_per_host") or 1))
        # job id -> (worker thread, its cancel event, "prepare" | "deploy")
        self.running: dict[int, tuple[threading.Thread, threading.Event, str]] = {}
        self.deploy_keys: set[tuple[int, str]] = set()
        self.asked: set[int] = set()
        self._approver = None
        self.deployer = KamalDeployer()

    # -- scheduling (main thread) ----------------------------------------------------------
    @property
    def approver(self):
        if self._approver is None:
            self._approver = approvals.select(self.user.get("approvals") or "auto")
            why = self._approver.available()
            if why:
                log.warning("approvals backend %s unavailable (%s); use `earthkamal-agent "
                            "approve JOB`", self._approver.name, why)
        return self._approver

    def recover(self) -> None:
        """After a crash: restart image preparation, park interrupted deploys for a person."""
        for job in self.store.jobs(states=("snapshotting", "building", "publishing")):
            if alive_group(job.extra.get("pgid"), job.extra.get("pgid_start")):
                os.killpg(job.extra["pgid"], signal.SIGTERM)  # the killed agent's build
                log.info("job %s: stopped the build left running by the previous agent", job.id)
            self.store.transition(job.id, "detected", reason=f"agent restarted during {job.step}")
            snapshot.remove(snapshot.build_dir(self.paths.builds, job.id))
            log.info("job %s: restarting after interruption in %s", job.id, job.step)
        for job in self.store.jobs(states=("deploying",)):
            pgid = job.extra.get("pgid")
            still = (f" (its kamal, process group {pgid}, is still running: let it finish)"
                     if alive_group(pgid, job.extra.get("pgid_start")) else "")
            self.store.transition(
                job.id, "interrupted", reason="the agent stopped during `kamal deploy`" + still +
                f"; check the servers, then `earthkamal-agent retry {job.id}` or "
                f"`cancel {job.id}`")
            log.warning("job %s: deploy interrupted; waiting for a person", job.id)
        self._clean_orphans()

    def _clean_orphans(self) -> None:
        from . import sshagent

        for pid in sshagent.reap_orphans(self.paths.run):
            log.info("stopped ssh-agent %s left by the previous agent", pid)
        keep = {j.id for j in self.store.jobs(states=("detected", "awaiting_approval",
                                                       "approved", "interrupted"))}
        for d in self.paths.builds.glob("job-*"):
            try:
                jid = int(d.name[4:])
            except ValueError:
                continue
            job = self.store.job(jid)
            if jid not in keep and not (job and job.state == "failed" and
                                        (job.extra.get("keep_snapshot"))):
                snapshot.remove(d)
        for d in Path("/dev/shm").glob(f"{scratch_prefix(self.paths.run)}job*"):
            shutil.rmtree(d, ignore_errors=True)

    def schedule(self) -> None:
        self._reap()
        for jid, (_t, cancel, _k) in list(self.running.items()):
            job = self.store.job(jid)
            if job is None or job.state in ("canceled", "superseded"):
                cancel.set()
        queued = list(reversed(self.store.jobs(states=("detected",))))
        skipped = self._supersede_queued(queued)
        detected = [j for j in queued if j.id not in skipped]
        limit = int(self.user.get("builds_per_host") or 1) + 1
        for job in detected:
            preparing = sum(1 for _t, _c, kind in self.running.values() if kind == "prepare")
            if preparing >= limit or self.stopping.is_set():
                break
            if job.id not in self.running:
                self._start(job.id, self._prepare)
        for job in reversed(self.store.jobs(states=("approved",))):
            key = (job.repo_id, job.destination or "")
            if job.id not in self.running and key not in self.deploy_keys:
                self.deploy_keys.add(key)
                self._start(job.id, self._deploy, key)
        now = time.time()
        for job in self.store.jobs(states=("awaiting_approval",)):
            expires = job.extra.get("expires_at")
            if expires and now >= expires:
                try:
                    self.store.transition(job.id, "expired", reason="no decision within "
                                          "approval_timeout; `earthkamal-agent retry` asks again")
                    self._withdraw(job.id)
                except TransitionError:
                    pass
                continue
            if job.id not in self.asked:
                self.asked.add(job.id)
                self._ask(job)
        for jid in list(self.asked):
            job = self.store.job(jid)
            if job is None or job.state != "awaiting_approval":
                self.asked.discard(jid)
                self._withdraw(jid)

    def _supersede_queued(self, detected: list[Job]) -> set[int]:
        """A queued build is skipped when a newer tag for the same destination exists;
        return the ids skipped."""
        skipped: set[int] = set()
        newest: dict[tuple[int, str], Job] = {}
        for j in self.store.jobs(states=ACTIVE):
            if j.state == "detected" and self._needs_signature(j):
                continue  # an unverified tag must not displace anything (it may be refused)
            key = (j.repo_id, j.destination or "")
            if key not in newest or j.id > newest[key].id:
                newest[key] = j
        for job in detected:
            top = newest.get((job.repo_id, job.destination or ""))
            if top is not None and top.id > job.id and top.tag != job.tag \
                    and job.id not in self.running:
                try:
                    self.store.transition(job.id, "superseded", expect=("detected",),
                                          superseded_by=top.id,
                                          reason=f"{top.tag} is newer for this destination")
                    log.info("job %s (%s) superseded by %s before building", job.id, job.tag,
                             top.tag)
                except TransitionError:
                    pass
                skipped.add(job.id)
        return skipped

    def _needs_signature(self, job: Job) -> bool:
        """Decided at detection from the commit's config (or the user config)."""
        return bool(self.user.get("require_signed_tags") or job.extra.get("signed_required"))

    def _start(self, job_id: int, fn, *args) -> None:  # noqa: ANN001
        cancel = threading.Event()
        kind = "prepare" if fn == self._prepare else "deploy"
        t = threading.Thread(target=self._guard, args=(fn, job_id, cancel, *args),
                             name=f"{kind}-{job_id}", daemon=True)
        self.running[job_id] = (t, cancel, kind)
        t.start()

    def _guard(self, fn, job_id: int, cancel: threading.Event, *args) -> None:  # noqa: ANN001
        try:
            fn(job_id, cancel, *args)
        except Exception:  # noqa: BLE001
            log.exception("job %s: worker crashed", job_id)
        finally:
            self.wake.put("job-done")

    def _reap(self) -> None:
        for jid, (t, _c, _k) in list(self.running.items()):
            if not t.is_alive():
                del self.running[jid]

    def next_deadline(self) -> float:
        soon = 60.0
        now = time.time()
        for job in self.store.jobs(states=("awaiting_approval",)):
            exp = job.extra.get("expires_at")
            if exp:
                soon = min(soon, max(0.05, exp - now))
        return soon

    def wait_idle(self, timeout: float = 3600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.schedule()
            if not self.running:
                return
            try:
                self.wake.get(timeout=0.5)
            except queue.Empty:
                pass

    def shutdown(self) -> None:
        for _t, cancel, _k in self.running.values():
            cancel.set()
        for t, _c, _k in list(self.running.values()):
            t.join(timeout=15)
        if self._approver is not None:
            try:
                self._approver.close()
            except Exception:  # noqa: BLE001
                pass

    def housekeeping(self) -> None:
        removed = self.store.prune(int(self.user.get("keep_jobs") or 200),
                                   float(self.user.get("keep_days") or 30) * 86400)
        for jid in removed:
            (self.paths.logs / f"job-{jid}.log").unlink(missing_ok=True)
            snapshot.remove(snapshot.build_dir(self.paths.builds, jid))
        if removed:
            log.info("housekeeping: removed %d old jobs", len(removed))

    # -- approvals -------------------------------------------------------------------------
    def _ask(self, job: Job) -> None:
        try:
            req = self.approval_request(self.store, job)
            self.approver.ask(req, self._on_decision)
            log.info("job %s: waiting for approval (earthkamal-agent approve %s)", job.id, job.id)
        except Exception as e:  # noqa: BLE001 - the CLI still works
            log.warning("job %s: could not show the approval: %s", job.id, e)

    def _withdraw(self, job_id: int) -> None:
        if self._approver is not None:
            try:
                self._approver.withdraw(job_id)
            except Exception:  # noqa: BLE001
                pass

    def _on_decision(self, job_id: int, decision: str) -> None:
        from . import actions

        store = Store(self.paths.db)
        try:
            job = store.job(job_id)
            if job is None or job.state != "awaiting_approval":
                return
            if decision == "approve":
                actions.record_approval(store, job, by="desktop")
            else:
                store.transition(job_id, "rejected", expect=("awaiting_approval",),
                                 reason="rejected on the desktop", decided_by="desktop")
            log.info("job %s: %s on the desktop", job_id, decision)
        except TransitionError as e:
            log.info("job %s: decision %s ignored: %s", job_id, decision, e)
        finally:
            store.close()
            self.wake.put("decision")

    @staticmethod
    def approval_request(store: Store, job: Job) -> approvals.ApprovalRequest:
        repo = store.repo(job.repo_id)
        assert repo is not None
        ch = job.extra.get("changes") or history.changes(
            store, job.repo_id, repo.common_dir, job.commit_oid, job.destination, before=job.id)
        try:
            subject = gitrepo.commit_subject(repo.common_dir, job.commit_oid)
        except Exception:  # noqa: BLE001
            subject = ""
        return approvals.ApprovalRequest(
            job_id=job.id, service=job.extra.get("service") or repo.name,
            version=job.version or job.tag, destination=job.destination, repo=repo.name,
            commit=job.commit_oid, subject=subject, digest=job.digest or "",
            changes=tuple(ch["subjects"]), change_count=ch["count"],
            previous_version=ch["since"])

    def _notify(self, summary: str, body: str) -> None:
        try:
            self.approver.notify(summary, body)
        except Exception as e:  # noqa: BLE001
            log.warning("notification failed: %s", e)

    # -- stage plumbing --------------------------------------------------------------------
    def _ctx(self, job_id: int, cancel: threading.Event) -> JobRun:
        store = Store(self.paths.db)
        job = store.job(job_id)
        assert job is not None
        repo = store.repo(job.repo_id)
        assert repo is not None
        red = Redactor()
        return JobRun(store, job, repo, JobLog(self.paths.logs, job_id, red), red, self.user,
                      self.paths, cancel, pick_scratch(self.paths.run, job_id))

    def _fail(self, c: JobRun, reason: str) -> None:
        c.log(f"FAILED: {reason}")
        try:
            state = c.store.job(c.job.id).state
            if state in ("canceled", "superseded"):
                return
            c.store.transition(c.job.id, "failed", reason=reason)
        except TransitionError:
            return
        log.warning("job %s (%s %s) failed in %s: %s", c.job.id, c.repo.name, c.job.tag,
                    c.job.step, reason)
        self._notify(f"{c.repo.name} {c.job.tag}: {c.job.step or 'job'} failed", reason)

    def _finish(self, c: JobRun) -> None:
        shutil.rmtree(c.scratch, ignore_errors=True)
        c.log.close()
        state = c.store.job(c.job.id).state
        keep = state in ("awaiting_approval", "approved", "deploying")
        if not keep:
            if state == "failed" and c.cfg is not None and c.cfg.get("keep_failed_snapshot"):
                c.store.set_data(c.job.id, keep_snapshot=True)
            else:
                snapshot.remove(snapshot.build_dir(self.paths.builds, c.job.id))
        c.store.close()

    # -- prepare: snapshot, gate, build, publish --------------------------------------------
    def _prepare(self, job_id: int, cancel: threading.Event) -> None:
        c = self._ctx(job_id, cancel)
        try:
            c.log(f"job {job_id}: {c.repo.name} {c.job.tag} at {c.job.commit_oid}")
            self._stage_config(c)
            if c.job.state == "refused":
                return
            self._stage_snapshot(c)
            self._stage_build(c)
            self._stage_publish(c)
            self._stage_queue_for_approval(c)
        except Canceled:
            c.log("stopped: the job was canceled or superseded")
        except UserError as e:
            self._fail(c, str(e))
        except Exception as e:  # noqa: BLE001
            c.log(traceback.format_exc())
            self._fail(c, f"internal error in {c.job.step}: {type(e).__name__}: {e} "
                          "(details in `earthkamal-agent logs`)")
        finally:
            self._finish(c)

    def _stage_config(self, c: JobRun) -> None:
        text = gitrepo.read_file(c.repo.common_dir, c.job.commit_oid, REPO_FILE)
        c.cfg = parse_repo_config(text, f"{REPO_FILE} at {c.job.tag}")
        if c.cfg["require_signed_tags"] or self.user.get("require_signed_tags"):
            from .gitcli import verify_tag

            ok, words = verify_tag(c.repo.common_dir, c.job.tag)
            if not ok:
                why = words.splitlines()[-1] if words else "no signature"
                c.store.transition(c.job.id, "refused", step="verify",
                                   reason=f"tag {c.job.tag} is not signed by an allowed key "
                                   f"({why}); require_signed_tags is on")
                c.job = c.store.job(c.job.id)
                c.log(f"refused: {c.job.reason}")

    def _stage_snapshot(self, c: JobRun) -> None:
        c.move("snapshotting", step="snapshot")
        dest = snapshot.build_dir(self.paths.builds, c.job.id)
        t0 = time.monotonic()
        c.app = snapshot.export(c.repo.common_dir, c.job.commit_oid, dest)
        c.log(f"snapshot of {c.job.commit_oid[:12]} in {dest} ({time.monotonic() - t0:.2f}s)")
        c.step("resolve")
        version = c.job.commit_oid if c.cfg["version"] == "sha" else c.job.tag
        from .imageref import validate_version

        version = validate_version(version, sanitize=c.cfg["sanitize_version"])
        c.names = namecache.resolve(self.paths.home / "cache" / "kamal-names", c.app, version,
                                    c.job.destination,
                                    kamal_binary=self.user.get("kamal_binary") or "kamal")
        c.store.update(c.job.id, version=version, image=c.names.absolute_image)
        c.store.set_data(c.job.id, service=c.names.service, repository=c.names.repository,
                         names_source=c.names.source, local_registry=c.names.local_registry)
        c.log(f"image {c.names.absolute_image} (service {c.names.service}, from "
              f"{c.names.source})")

    def _build_secrets(self, c: JobRun, names: list[str]) -> dict[str, str]:
        out = {n: v for n in names if (v := c.secret(n)) is not None}
        missing = [n for n in names if n not in out]
        if missing:
            raise StageFailed(f"build secret(s) {', '.join(missing)} are not in the keyring; "
                              f"add them with `earthkamal-agent secrets set {missing[0]}`.")
        return out

    def _stage_build(self, c: JobRun) -> None:
        assert c.app and c.names and c.cfg
        builder = select_builder(c.cfg["builder"], c.app)
        section = c.cfg.builder_settings(builder.name)
        spec_secrets = self._build_secrets(c, list(section.get("secrets") or []))
        spec = BuildSpec(app_dir=c.app, image_ref=c.names.absolute_image,
                         platform=platform_of(c.names), settings=section, user=self.user,
                         secrets=spec_secrets, push=c.cfg["publish"] == "earthly",
                         tmp_dir=c.scratch)
        c.step("check build files")
        builder.check(spec)
        c.store.set_data(c.job.id, builder=builder.name, platform=spec.platform)
        secret_files = []
        if builder.name == "dockerfile":
            for name, value in spec_secrets.items():
                p = Path(builder.secret_file(spec, name))
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(value)
                secret_files.append(p)
        c.move("building", step="gate" if (c.cfg["gate"] or c.cfg["gate_command"])
                   else "build")
        try:
            c.log("waiting for a BuildKit slot")
            with self.build_slots:
                if c.cancel.is_set():
                    raise Canceled()
                if c.cfg["gate_command"]:
                    c.step("gate")
                    res = c.run(Command(tuple(c.cfg["gate_command"]), cwd=str(c.app),
                                               timeout=3600), "gate")
                    if not res.ok:
                        raise StageFailed(f"gate `{' '.join(c.cfg['gate_command'])}` failed "
                                          f"(exit {res.returncode}): {res.last_line()}")
                for gate, command in builder.gate_commands(spec, list(c.cfg["gate"])):
                    c.step(f"gate {gate}")
                    res = self._run_build(c, builder, spec, command)
                    if not res.ok:
                        raise StageFailed("gate " + builder.explain(spec, res, gate))
                c.step("build")
                command = builder.build_command(spec)
                if spec.push:  # Earthly pushes itself: it gets the temporary registry login
                    config_dir = publisher.login(c, c.names)
                    if config_dir:
                        command = dataclasses.replace(
                            command, env={**command.env, "DOCKER_CONFIG": config_dir})
                res = self._run_build(c, builder, spec, command)
                if not res.ok:
                    raise StageFailed(builder.explain(spec, res, "the build"))
                c.store.set_data(c.job.id, built_image=builder.built_image(spec, res))
        finally:
            for p in secret_files:
                p.unlink(missing_ok=True)

    def _run_build(self, c: JobRun, builder, spec: BuildSpec, command: Command) -> Result:  # noqa: ANN001
        res = c.run(command, "build")
        if not res.ok and builder.should_retry(res):
            c.log("transient BuildKit error (inconsistent graph state); retrying once")
            res = c.run(command, "build")
        return res

    def _stage_publish(self, c: JobRun) -> None:
        digest = publisher.select(c.cfg).publish(c)
        if not digest:
            raise StageFailed("the registry reported no digest for the pushed image; an "
                              "approval must pin one, so the job stops here.")
        c.store.update(c.job.id, digest=digest)

    def _stage_queue_for_approval(self, c: JobRun) -> None:
        newer = [j for j in c.store.jobs(repo_id=c.job.repo_id)
                 if j.id > c.job.id and (j.destination or "") == (c.job.destination or "")
                 and j.state in ("awaiting_approval", "approved", "deploying", "deployed")
                 and j.tag != c.job.tag]
        if newer:
            c.move("superseded", reason=f"{newer[0].tag} is newer for this destination",
                       superseded_by=newer[0].id)
            return
        if c.cfg.approval_for(c.job.destination) == "auto":
            c.move("approved", step="approved", decided_by="policy:auto",
                       approved_commit=c.job.commit_oid, approved_digest=c.store.job(
                           c.job.id).digest)
        else:
            c.store.set_data(c.job.id, expires_at=time.time() + c.cfg.approval_timeout)
            c.move("awaiting_approval", step="approve")
        try:
            c.store.set_data(c.job.id, changes=history.changes(
                c.store, c.job.repo_id, c.repo.common_dir, c.job.commit_oid, c.job.destination,
                before=c.job.id))
        except Exception:  # noqa: BLE001 - informational only
            pass
        for old in c.store.jobs(states=("awaiting_approval",), repo_id=c.job.repo_id):
            if old.id < c.job.id and (old.destination or "") == (c.job.destination or ""):
                try:
                    c.store.transition(old.id, "superseded", superseded_by=c.job.id,
                                       reason=f"{c.job.tag} is newer for this destination")
                except TransitionError:
                    pass

    # -- deploy ------------------------------------------------------------------------------
    def _deploy(self, job_id: int, cancel: threading.Event, key: tuple[int, str]) -> None:
        c = self._ctx(job_id, cancel)
        agent_proc = None
        try:
            c.cfg = parse_repo_config(gitrepo.read_file(c.repo.common_dir, c.job.commit_oid,
                                                        REPO_FILE), f"{REPO_FILE} at {c.job.tag}")
            c.step("verify approval")
            dest = snapshot.build_dir(self.paths.builds, c.job.id)
            c.app = dest if dest.exists() else snapshot.export(c.repo.common_dir,
                                                               c.job.commit_oid, dest)
            c.names = kamal.resolve(c.app, c.job.version, c.job.destination,
                                    kamal_binary=self.user.get("kamal_binary") or "kamal")
            prepared = self.deployer.prepare(c)
            if prepared is None:
                return
            env, agent_proc = prepared
            rollback = bool(c.job.extra.get("rollback"))
            c.move("deploying", step="kamal rollback" if rollback else "kamal deploy")
            res = c.run(self.deployer.command(c, env), "deploy", cancellable=False)
            problem = self.deployer.outcome(c, res)
            if problem is None:
                c.store.transition(c.job.id, "deployed", reason=None)
                c.log("deployed")
                self._notify(f"Deployed {c.names.service} {c.job.version}",
                             f"{c.repo.name} → {c.job.destination or 'default destination'}")
            else:
                self._fail(c, problem)
        except Canceled:
            c.log("deploy stopped before it started")
        except UserError as e:
            self._fail(c, str(e))
        except Exception as e:  # noqa: BLE001
            c.log(traceback.format_exc())
            self._fail(c, f"internal error in deploy: {type(e).__name__}: {e}")
        finally:
            if agent_proc is not None:
                from . import sshagent

                sshagent.stop(agent_proc)
            self.deploy_keys.discard(key)
            self._finish(c)

