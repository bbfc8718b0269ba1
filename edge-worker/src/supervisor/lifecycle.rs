//! Lifecycle commands: deploy and install a manifest, start, stop, restart
//! and remove a service, and a deploy refused before it got here. Each
//! changes the desired state (saved at once when it changes) and starts
//! the transition; [`Supervisor::poll`] finishes it.

use protocol::frame::bounded;
use protocol::{Manifest, RestartPolicy, ServiceSpec, ServiceState, ServiceStatus};

use super::desired::{checked_name, spec_to_manifest};
use super::{AfterStop, Proc, Service, Supervisor, SupervisorError, INSTALLED_STOPPED};

impl Supervisor {
    /// Installs a legacy `spec` and runs it ([`spec_to_manifest`], then
    /// [`Supervisor::deploy_manifest`]).
    pub fn deploy(&mut self, spec: ServiceSpec) -> Result<String, SupervisorError> {
        self.deploy_manifest(spec_to_manifest(&spec))
    }

    /// Installs `manifest` and runs it. The same manifest again is a no-op
    /// (`Ok("unchanged")`) unless the service failed (restart policy not
    /// `never`): then it starts afresh; another one stops the old copy first. An
    /// artifact service's file must already be in the cache
    /// ([`crate::fetch::Conductor::ensure_artifact`]). `Ok`: what happened;
    /// refused ([`SupervisorError::InvalidManifest`],
    /// [`SupervisorError::InvalidName`]) with nothing changed.
    pub fn deploy_manifest(&mut self, manifest: Manifest) -> Result<String, SupervisorError> {
        let name = checked_name(&manifest)?;
        let version = manifest.version;
        let result = match self.services.get_mut(&name) {
            Some(svc) if svc.manifest == manifest && !svc.removing => {
                // The conductor deploys a service that failed at this
                // version again (at most every minute): start it afresh,
                // unless its policy says never or it was stopped on purpose.
                let retry = svc.run
                    && svc.state == ServiceState::Failed
                    && svc.manifest.restart != RestartPolicy::Never
                    && matches!(svc.proc, Proc::None)
                    && svc.stopping.is_none();
                if retry {
                    tracing::info!(service = %name, "failed service deployed again: starting it");
                    return self.start(&name);
                }
                return Ok("unchanged".into());
            }
            Some(svc) => {
                let old = svc.manifest.version;
                svc.manifest = manifest;
                svc.run = true;
                svc.removing = false;
                svc.reset_counters();
                self.save();
                self.restart_now(&name);
                format!("deployed version {version} (was {old})")
            }
            None => {
                self.services
                    .insert(name.clone(), Service::new(manifest, true, false));
                self.save();
                self.spawn(&name);
                format!("deployed version {version}")
            }
        };
        self.prune(false);
        Ok(result)
    }

    /// Installs `manifest` with desired state "stopped" (persisted, as by
    /// [`Supervisor::stop`]): it is not started, and a running copy of any
    /// version is stopped first. The same manifest again, already desired
    /// stopped, changes nothing (`Ok("unchanged")`). An artifact service's
    /// file must already be in the cache, as for
    /// [`Supervisor::deploy_manifest`]; a container's image is pulled only
    /// when it is started. Refused as by [`Supervisor::deploy_manifest`].
    pub fn install_manifest(&mut self, manifest: Manifest) -> Result<String, SupervisorError> {
        let name = checked_name(&manifest)?;
        let version = manifest.version;
        let result = match self.services.get_mut(&name) {
            Some(svc) if svc.manifest == manifest && !svc.removing => {
                if !svc.run {
                    return Ok("unchanged".into());
                }
                svc.run = false;
                self.save();
                let how = self.hold_stopped(&name, "stopped by request", false);
                format!("version {version} unchanged, {how}")
            }
            Some(svc) => {
                let old = svc.manifest.version;
                svc.manifest = manifest;
                svc.run = false;
                svc.removing = false;
                svc.reset_counters();
                self.save();
                match self.hold_stopped(&name, INSTALLED_STOPPED, true) {
                    "stopping" => format!(
                        "installed version {version} (was {old}), not started; stopping the running copy"
                    ),
                    _ => format!("installed version {version} (was {old}), not started"),
                }
            }
            None => {
                self.services
                    .insert(name.clone(), Service::new(manifest, false, false));
                self.save();
                self.hold_stopped(&name, INSTALLED_STOPPED, true);
                format!("installed version {version}, not started")
            }
        };
        self.prune(false);
        Ok(result)
    }

    /// Reports a deploy refused before it reached the supervisor (e.g. a
    /// downloaded artifact that did not match): a `Failed` status for
    /// `name` at `version`. A running older version is left alone.
    pub fn report_refused(&mut self, name: &str, version: u32, detail: &str) {
        let running = self.services.get(name).filter(|s| !s.removing);
        let detail = match running {
            Some(s) if !matches!(s.proc, Proc::None) => {
                format!("{detail}; version {} keeps running", s.proc_version)
            }
            _ => detail.to_string(),
        };
        self.changes.push(ServiceStatus {
            name: bounded(name),
            version,
            state: ServiceState::Failed,
            pid: 0,
            restarts: 0,
            exit_code: None,
            detail: bounded(&detail),
        });
    }

    /// Stops the current copy if any (and whatever stop is pending), then
    /// starts the current manifest.
    fn restart_now(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Start;
        } else if matches!(svc.proc, Proc::None) {
            self.spawn(name);
        } else {
            self.begin_stop(name, AfterStop::Start);
        }
    }

    fn known(&mut self, name: &str) -> Result<&mut Service, SupervisorError> {
        match self.services.get_mut(name) {
            Some(s) if !s.removing => Ok(s),
            _ => Err(SupervisorError::UnknownService(name.to_string())),
        }
    }

    /// Starts a stopped or failed service (counters reset). Running: no-op.
    /// [`SupervisorError::UnknownService`] for a name not installed here
    /// (as for stop, restart and remove).
    pub fn start(&mut self, name: &str) -> Result<String, SupervisorError> {
        let svc = self.known(name)?;
        let changed = !svc.run;
        svc.run = true;
        let running = !matches!(svc.proc, Proc::None) && svc.stopping.is_none();
        if changed {
            self.save();
        }
        if running {
            return Ok("already running".into());
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.reset_counters();
        }
        self.restart_now(name);
        Ok("starting".into())
    }

    /// Stops a service; it stays installed with desired state "stopped".
    pub fn stop(&mut self, name: &str) -> Result<String, SupervisorError> {
        let svc = self.known(name)?;
        let changed = svc.run;
        svc.run = false;
        if changed {
            self.save();
        }
        Ok(self.hold_stopped(name, "stopped by request", false).into())
    }

    /// Brings a service whose desired state is now "stopped" there: a
    /// pending stop stays stopped, a running copy (or a container being
    /// started) is stopped, and one without a process is reported `Stopped`
    /// with `detail` — also when it already was, if `report` (its version
    /// changed). Returns what happens.
    fn hold_stopped(&mut self, name: &str, detail: &str, report: bool) -> &'static str {
        let Some(svc) = self.services.get_mut(name) else {
            return "unknown";
        };
        svc.backoff_until = None;
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Stay;
            return "stopping";
        }
        // A container being started may run by the time the engine gets
        // to this stop: it is stopped in the engine's order.
        let starting = svc.is_container() && svc.ctr_jobs > 0;
        if matches!(svc.proc, Proc::None) && !starting {
            if report || svc.state != ServiceState::Stopped {
                svc.state = ServiceState::Stopped;
                svc.detail = detail.into();
                self.emit(name);
            }
            return "already stopped";
        }
        self.begin_stop(name, AfterStop::Stay);
        "stopping"
    }

    /// Stops and starts a service (counters reset).
    pub fn restart(&mut self, name: &str) -> Result<String, SupervisorError> {
        let svc = self.known(name)?;
        let changed = !svc.run;
        svc.run = true;
        svc.reset_counters();
        if changed {
            self.save();
        }
        self.restart_now(name);
        Ok("restarting".into())
    }

    /// Stops a service and forgets it (dir, pid file, cgroup, entry, unused
    /// artifacts); reports `Removed` once its process is gone.
    pub fn remove(&mut self, name: &str) -> Result<String, SupervisorError> {
        let svc = self.known(name)?;
        svc.run = false;
        svc.removing = true;
        svc.backoff_until = None;
        self.save();
        let Some(svc) = self.services.get_mut(name) else {
            return Err(SupervisorError::UnknownService(name.to_string()));
        };
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Remove;
        } else if matches!(svc.proc, Proc::None) && !svc.is_container() {
            self.finish_remove(name);
        } else {
            // A container is deleted in the engine even when it is stopped.
            self.begin_stop(name, AfterStop::Remove);
        }
        Ok("removing".into())
    }
}
