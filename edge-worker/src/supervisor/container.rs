//! The container backend: container services run through the engine
//! thread (`engine.rs`). Start is an ensure, a running container is
//! inspected every [`CONTAINER_POLL`], a stop (or removal) is the engine's,
//! and every answer is applied here when [`Supervisor::poll`] collects it.
//! Our containers whose service is not desired are swept at load and after
//! every container removal.

use std::time::Instant;

use protocol::manifest::Limits;
use protocol::{EventKind, ServiceState};

use super::engine::{Done, EngineThread, Job, Kind, Op, Outcome};
use super::health::Health;
use super::{AfterStop, Proc, Supervisor, CONTAINER_POLL, ENGINE_RETRY};
use crate::container::{ContainerError, EnsureAction, Ensured};

/// Start of the detail of a container service failed for want of an engine.
const NO_ENGINE: &str = "no container engine";

impl Supervisor {
    /// Queues the removal of our containers whose service is not a desired
    /// container service.
    pub(super) fn sweep_orphans(&mut self) {
        let keep: Vec<String> = self
            .services
            .values()
            .filter(|s| s.is_container() && !s.removing)
            .map(|s| s.manifest.name.clone())
            .collect();
        self.submit_job(None, Op::Orphans(keep));
    }

    /// Queues an engine job for `service` (`None`: not a service's job),
    /// starting the engine thread first if needed. `false` (logged, and the
    /// service failed) if the thread cannot run.
    pub(super) fn submit_job(&mut self, service: Option<&str>, op: Op) -> bool {
        if self.engine.is_none() {
            match EngineThread::spawn(self.opts.worker_id.clone(), self.opts.engine_socket.clone())
            {
                Ok(t) => self.engine = Some(t),
                Err(e) => {
                    tracing::error!("cannot start the container engine thread: {e}");
                    if let Some(name) = service {
                        self.ctr_failed(name, format!("cannot start the engine thread: {e}"));
                    }
                    return false;
                }
            }
        }
        self.next_job += 1;
        let id = self.next_job;
        let job = Job {
            id,
            service: service.unwrap_or_default().to_string(),
            op,
        };
        if !self.engine.as_ref().is_some_and(|t| t.submit(job)) {
            // The thread died (it never panics on engine answers): start a
            // new one at the next job.
            self.engine = None;
            tracing::error!("the container engine thread is gone");
            if let Some(name) = service {
                self.ctr_failed(name, "the container engine thread is gone".into());
            }
            return false;
        }
        self.engine_jobs += 1;
        if let Some(svc) = service.and_then(|n| self.services.get_mut(n)) {
            svc.ctr_jobs += 1;
            svc.ctr_last = id;
        }
        true
    }

    /// A container service that cannot run: `Failed` with `detail`.
    fn ctr_failed(&mut self, name: &str, detail: String) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.proc = Proc::None;
        svc.health = None;
        svc.ctr_check_at = None;
        let again = svc.state == ServiceState::Failed && svc.detail == detail;
        svc.state = ServiceState::Failed;
        svc.detail = detail;
        if !again {
            tracing::warn!(service = name, "{}", svc.detail);
            let detail = format!("{name}: failed: {}", svc.detail);
            self.event(EventKind::ServiceChanged, detail);
            self.emit(name);
        }
    }

    /// Asks the engine to run the current manifest's container; the
    /// answer arrives in [`Supervisor::poll`].
    pub(super) fn spawn_container(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        svc.limits_note = None;
        svc.health = None;
        let m = Box::new(svc.manifest.clone());
        // Waiting for an engine: tried again quietly, still `Failed`
        // (one status and event per outage, not one per retry).
        let waiting = svc.state == ServiceState::Failed && svc.detail.starts_with(NO_ENGINE);
        if !waiting {
            svc.state = ServiceState::Starting;
            svc.detail = "starting container".into();
            self.emit(name);
        }
        self.submit_job(Some(name), Op::Ensure(m));
    }

    /// Applies every answer the engine thread has sent.
    pub(super) fn collect_engine_answers(&mut self) {
        while let Some(done) = self.engine.as_ref().and_then(EngineThread::try_recv) {
            self.engine_jobs = self.engine_jobs.saturating_sub(1);
            self.on_engine_answer(done);
        }
    }

    fn on_engine_answer(&mut self, done: Done) {
        let Done {
            id,
            kind,
            service: name,
            result,
        } = done;
        let now = Instant::now();
        if kind == Kind::Orphans {
            match result {
                Ok(Outcome::Orphans(removed)) => {
                    for service in removed {
                        tracing::info!(
                            service,
                            "removed the container of a service not deployed here"
                        );
                    }
                }
                Err(e) if e.is_unavailable() => tracing::debug!("orphan sweep: {e}"),
                Err(e) => tracing::warn!("orphan container sweep failed: {e}"),
                Ok(_) => {}
            }
            return;
        }
        let Some(svc) = self.services.get_mut(&name) else {
            tracing::debug!(
                service = name,
                ?kind,
                "engine answer for a forgotten service"
            );
            return;
        };
        svc.ctr_jobs = svc.ctr_jobs.saturating_sub(1);
        let latest = svc.ctr_last == id;
        match (kind, result) {
            (Kind::Ensure, Ok(Outcome::Ensured(e))) => self.ctr_ensured(&name, e, now),
            (Kind::Ensure, Err(e)) => {
                let detail = match &e {
                    ContainerError::EngineUnavailable { .. } => e.to_string(),
                    e if e.is_unavailable() => format!("{NO_ENGINE}: {e}"),
                    e => format!("cannot run the container: {e}"),
                };
                let retry = e.is_unavailable();
                self.ctr_failed(&name, detail);
                if let Some(svc) = self.services.get_mut(&name) {
                    if retry && svc.run && svc.stopping.is_none() {
                        svc.backoff_until = Some(now + ENGINE_RETRY);
                    }
                }
            }
            (Kind::Inspect, result) => {
                // Only the answer to the last job says how things are now,
                // and only while nothing else is under way.
                let watching = matches!(svc.proc, Proc::Container { .. }) && svc.stopping.is_none();
                if !latest || !watching {
                    return;
                }
                match result {
                    Ok(Outcome::State(Some(st))) if st.running => {
                        let pid = st.pid.unwrap_or(0);
                        if svc.proc.pid() != pid {
                            svc.proc = Proc::Container { pid };
                            self.emit(&name);
                        }
                    }
                    Ok(Outcome::State(Some(st))) => {
                        let how = st.oom_killed.then(|| "killed: out of memory".to_string());
                        self.ctr_exited(&name, st.exit_code, how, now);
                    }
                    Ok(_) => {
                        let how = "the container was removed outside the worker".to_string();
                        self.ctr_exited(&name, None, Some(how), now);
                    }
                    Err(e) => self.ctr_exited(&name, None, Some(format!("lost: {e}")), now),
                }
            }
            (Kind::Stop, result) => {
                let code = match result {
                    Ok(Outcome::State(Some(st))) => {
                        if st.running {
                            tracing::warn!(service = name, "the container still runs after a stop");
                        }
                        st.exit_code
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(service = name, "stopping the container: {e}");
                        None
                    }
                };
                self.ctr_gone(&name, code, false, now);
            }
            (Kind::Remove, result) => {
                if let Err(e) = result {
                    tracing::warn!(
                        service = name,
                        "removing the container: {e}; the orphan sweep will try again"
                    );
                }
                self.ctr_gone(&name, None, true, now);
            }
            (kind, result) => {
                tracing::warn!(
                    service = name,
                    ?kind,
                    "unexpected engine answer: {result:?}"
                );
            }
        }
    }

    /// The engine runs the container of `name` (or could not keep it up).
    fn ctr_ensured(&mut self, name: &str, e: Ensured, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if !e.state.running {
            // Started, and already gone again.
            let how = e.state.error.clone().filter(|s| !s.is_empty());
            if svc.stopping.is_none() {
                svc.proc = Proc::Container { pid: 0 };
                self.ctr_exited(name, e.state.exit_code, how, now);
            }
            return;
        }
        svc.proc = Proc::Container {
            pid: e.state.pid.unwrap_or(0),
        };
        svc.proc_version = e.state.version.unwrap_or(svc.manifest.version);
        svc.ctr_check_at = Some(now + CONTAINER_POLL);
        if svc.stopping.is_some() {
            // The stop queued behind this decides.
            return;
        }
        svc.state = ServiceState::Running;
        svc.detail = if e.action == EnsureAction::AlreadyRunning {
            "adopted".into()
        } else {
            "running".into()
        };
        svc.limits_note = container_limits_note(&svc.manifest.limits, &e);
        if let Some(note) = &svc.limits_note {
            tracing::warn!(service = name, "{note}");
        }
        svc.health = svc.manifest.health.as_ref().map(|h| Health::new(h, now));
        tracing::info!(
            service = name,
            pid = svc.proc.pid(),
            version = svc.proc_version,
            action = ?e.action,
            "container running"
        );
        self.emit(name);
    }

    /// The running container of `name` stopped by itself: the restart policy.
    fn ctr_exited(&mut self, name: &str, code: Option<i64>, how: Option<String>, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let code = code.and_then(|c| i32::try_from(c).ok());
        tracing::info!(service = name, ?code, "container exited");
        svc.proc = Proc::None;
        svc.exit_code = code;
        svc.health = None;
        svc.ctr_check_at = None;
        self.on_exit(name, code, now, how);
    }

    /// The engine answered a stop (`deleted`: a removal) of `name`'s
    /// container: finish what the stop was for.
    pub(super) fn ctr_gone(&mut self, name: &str, code: Option<i64>, deleted: bool, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.proc = Proc::None;
        svc.health = None;
        svc.ctr_check_at = None;
        if let Some(c) = code.and_then(|c| i32::try_from(c).ok()) {
            svc.exit_code = Some(c);
        }
        let Some(st) = svc.stopping.take() else {
            return;
        };
        // The stopped container is deleted when the service goes, or when
        // its next copy is a process (it would be an orphan).
        let delete = matches!(st.then, AfterStop::Remove) || !svc.is_container();
        if delete && !deleted {
            svc.stopping = Some(st);
            if !self.submit_job(Some(name), Op::Remove) {
                self.ctr_gone(name, None, true, now);
            }
            return;
        }
        match st.then {
            AfterStop::Remove => {
                self.finish_remove(name);
                self.sweep_orphans();
            }
            AfterStop::Failure(how) => {
                let code = svc.exit_code;
                self.on_exit(name, code, now, Some(how));
            }
            then => {
                svc.state = ServiceState::Stopped;
                svc.detail = "stopped".into();
                self.emit(name);
                if matches!(then, AfterStop::Start) {
                    self.spawn(name);
                }
            }
        }
    }
}

/// `limits not applied: …` when the engine dropped a limit the manifest
/// asks for, with the engine's warnings; just the warnings otherwise.
fn container_limits_note(want: &Limits, e: &Ensured) -> Option<String> {
    let got = &e.state.limits;
    let mut missing = Vec::new();
    if want.memory_bytes.is_some() && got.memory_bytes.is_none() {
        missing.push("memory");
    }
    if want.cpu_millicores.is_some() && got.cpu_millicores.is_none() {
        missing.push("cpu");
    }
    if want.pids.is_some() && got.pids.is_none() {
        missing.push("pids");
    }
    let warnings = e.warnings.join("; ");
    match (missing.is_empty(), warnings.is_empty()) {
        (true, true) => None,
        (true, false) => Some(format!("engine warning: {warnings}")),
        (false, true) => Some(format!("limits not applied: {}", missing.join(", "))),
        (false, false) => Some(format!(
            "limits not applied: {} (engine: {warnings})",
            missing.join(", ")
        )),
    }
}
