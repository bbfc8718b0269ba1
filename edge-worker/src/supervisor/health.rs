//! Health checks of a running copy: probes on their own threads
//! ([`crate::health`]) every `interval_ms`, failures counted after the start
//! period, `retries` of them in a row make the service `Unhealthy` and stop
//! it as a failure (the restart policy decides what follows).

use std::time::{Duration, Instant};

use protocol::manifest::{HealthCheck, Probe, Runtime};
use protocol::{EventKind, Manifest, ServiceState};

use super::{AfterStop, Supervisor};
use crate::health::ProbeTask;

/// Health-check progress of the current process.
#[derive(Debug)]
pub(super) struct Health {
    /// When the current process started (or was adopted).
    started: Instant,
    /// When the next probe starts (if none runs).
    next_at: Instant,
    /// Consecutive counted failures.
    failures: u16,
    /// The probe in flight.
    task: Option<ProbeTask>,
}

impl Health {
    /// A copy that started `now`, checked by `check`: the first probe after
    /// one interval.
    pub(super) fn new(check: &HealthCheck, now: Instant) -> Health {
        Health {
            started: now,
            next_at: now + Duration::from_millis(u64::from(check.interval_ms)),
            failures: 0,
            task: None,
        }
    }
}

impl Supervisor {
    /// Starts a due probe or handles a finished one.
    pub(super) fn poll_health(&mut self, name: &str, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(check) = svc.manifest.health.clone() else {
            return;
        };
        let Some(h) = svc.health.as_mut() else {
            return;
        };
        let interval = Duration::from_millis(u64::from(check.interval_ms));
        let result = match h.task.as_mut() {
            Some(task) => match task.try_finish() {
                Some(r) => r,
                None => return,
            },
            None => {
                if now >= h.next_at {
                    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
                    let probe = probe_for(&svc.manifest, &check.probe);
                    match ProbeTask::start(probe, timeout, name.to_string()) {
                        Ok(task) => h.task = Some(task),
                        Err(e) => {
                            tracing::warn!(service = name, "cannot start a health probe: {e}");
                            h.next_at = now + interval;
                        }
                    }
                }
                return;
            }
        };
        h.task = None;
        h.next_at = now + interval;
        match result {
            Ok(()) => {
                h.failures = 0;
                if svc.state != ServiceState::Healthy {
                    svc.state = ServiceState::Healthy;
                    svc.detail = "healthy".into();
                    if std::mem::take(&mut svc.was_unhealthy) {
                        self.event(EventKind::ServiceChanged, format!("{name}: healthy again"));
                    }
                    self.emit(name);
                }
            }
            Err(why) => {
                let grace = Duration::from_millis(u64::from(check.start_period_ms));
                if now < h.started + grace {
                    tracing::debug!(
                        service = name,
                        "health probe failed in the start period: {why}"
                    );
                    return;
                }
                h.failures = h.failures.saturating_add(1);
                tracing::info!(
                    service = name,
                    failures = h.failures,
                    retries = check.retries,
                    "health probe failed: {why}"
                );
                if h.failures < check.retries {
                    return;
                }
                svc.state = ServiceState::Unhealthy;
                svc.detail = format!("unhealthy: {why}");
                svc.was_unhealthy = true;
                tracing::warn!(service = name, "{}; restarting", svc.detail);
                self.emit(name);
                self.event(EventKind::HealthFailed, format!("{name}: {why}"));
                self.begin_stop(name, AfterStop::Failure(format!("unhealthy: {why}")));
            }
        }
    }
}

/// The probe as the worker runs it: a container's HTTP probe of a port it
/// publishes under another host port goes to that host port.
fn probe_for(m: &Manifest, probe: &Probe) -> Probe {
    if let (Runtime::Container(c), Probe::Http { port, path }) = (&m.runtime, probe) {
        let tcp = || c.ports.iter().filter(|p| !p.udp);
        if !tcp().any(|p| p.host == *port) {
            if let Some(p) = tcp().find(|p| p.container == *port) {
                return Probe::Http {
                    port: p.host,
                    path: path.clone(),
                };
            }
        }
    }
    probe.clone()
}
