//! A fresh MQTT login when the broker refuses the stored one: on NATS in
//! operator mode a worker's login expires (`--nats-login-ttl` on the
//! conductor), and any broker may have lost or replaced it (a restored
//! store, a re-created Mosquitto client). The worker then re-enrols with
//! the proof of its frame secret, as `--reenroll` does, and takes the
//! login of the answer; the id, the secret and everything else stay. A
//! revoked or removed worker is refused there (403/401) and stays
//! disconnected: that is how an expiring login becomes a revocation.
//!
//! At most one re-enrolment runs at a time; the first after a connection
//! the broker accepted starts at once, another one only [`REFRESH_EVERY`]
//! after the last (a fresh login refused too, a conductor that refuses). The event loop is inside
//! the poll future while it waits to reconnect: the new login reaches it
//! through [`Handoff`], which also cuts that wait short.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::enroll::{self, EnrollError, EnrollRequest, EnrollResponse};
use crate::fetch::Conductor;
use protocol::Secret;

/// The shortest time between two re-enrolments for a login.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// A login for the event loop's next connect, and the wake-up of its wait.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    login: Mutex<Option<(String, String)>>,
    wake: tokio::sync::Notify,
}

impl Handoff {
    /// Hands `login` (username, password) to the next connect, now.
    fn put(&self, login: (String, String)) {
        *self
            .login
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(login);
        self.wake.notify_one();
    }

    /// The login handed over since the last call, if any.
    pub(crate) fn take(&self) -> Option<(String, String)> {
        self.login
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Resolves when a login is handed over (or was, since the last wait).
    pub(crate) async fn handed(&self) {
        self.wake.notified().await;
    }
}

type Task = JoinHandle<Result<EnrollResponse, EnrollError>>;

/// The re-enrolment of a refused login.
pub(crate) struct LoginRefresh {
    /// Where to re-enrol (the conductor URLs and the pinned CA).
    conductor: Conductor,
    /// The request without `worker_id` and `proof` (set at each start).
    template: EnrollRequest,
    task: Option<Task>,
    last: Option<Instant>,
    /// Shared with the poll future.
    pub(crate) handoff: Arc<Handoff>,
}

impl LoginRefresh {
    pub(crate) fn new(conductor: Conductor, template: EnrollRequest) -> LoginRefresh {
        LoginRefresh {
            conductor,
            template,
            task: None,
            last: None,
            handoff: Arc::default(),
        }
    }

    /// After a refused login: starts a re-enrolment as `worker_id` with
    /// the proof of `secret`, unless one runs or the last one started less
    /// than [`REFRESH_EVERY`] ago. Whether it started.
    pub(crate) fn start(&mut self, worker_id: &str, secret: &Secret) -> bool {
        if self.task.is_some() || self.last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return false;
        }
        self.last = Some(Instant::now());
        let mut req = self.template.clone();
        req.worker_id = Some(worker_id.to_string());
        req.proof = Some(protocol::reenroll_proof(secret, worker_id));
        let conductor = self.conductor.clone();
        self.task = Some(tokio::task::spawn_blocking(move || {
            let url = conductor.urls.reachable();
            enroll::enroll_once(url, &req, conductor.trust.as_ref())
        }));
        true
    }

    /// The broker accepted a login: the next refusal (that login expiring)
    /// may ask for a fresh one at once.
    pub(crate) fn connected(&mut self) {
        self.last = None;
    }

    /// The running re-enrolment's answer (pending while none runs).
    pub(crate) async fn done(&mut self) -> Result<EnrollResponse, EnrollError> {
        let result = match &mut self.task {
            Some(t) => t.await,
            None => std::future::pending().await,
        };
        self.task = None;
        result.unwrap_or_else(|e| Err(EnrollError::Unavailable(format!("task: {e}"))))
    }

    /// Hands a fresh login to the event loop's next connect.
    pub(crate) fn hand_over(&self, username: String, password: String) {
        self.handoff.put((username, password));
    }
}
