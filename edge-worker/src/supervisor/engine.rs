//! The supervisor's container engine thread: every Docker Engine API call
//! made for container services runs here, never on the runtime thread.
//!
//! One thread, started at the first need, runs the jobs **one at a time in
//! submission order** and sends each outcome back; the (synchronous)
//! supervisor collects them in [`super::Supervisor::poll`]. The order is
//! what keeps two copies from ever running: a stop submitted after an
//! ensure is executed after it, and an orphan sweep only removes what was
//! not desired when it was submitted (an ensure submitted later runs
//! later).
//!
//! The engine is connected lazily ([`Engine::connect`], honouring
//! `DOCKER_HOST`) at the first job and again after any job failed with
//! [`ContainerError::is_unavailable`], so an engine that starts after the
//! worker is found.
//!
//! Limits: a slow job (a stop waits up to its grace period; a hung engine
//! up to the client's timeout, [`crate::container::DEFAULT_TIMEOUT`])
//! delays the jobs queued behind it, for every container service.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};

use protocol::Manifest;

use crate::container::{ContainerError, ContainerState, Engine, Ensured};

/// What to do with a service's container.
#[derive(Debug)]
pub(super) enum Op {
    /// [`Engine::ensure`]: create, start, or replace to run this manifest.
    Ensure(Box<Manifest>),
    /// [`Engine::inspect`].
    Inspect,
    /// [`Engine::stop`] with this grace period, seconds.
    Stop(u32),
    /// [`Engine::remove`].
    Remove,
    /// Remove every container of ours whose service is not in the list
    /// (the job's service name is empty).
    Orphans(Vec<String>),
}

/// Which [`Op`] a [`Done`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ensure,
    Inspect,
    Stop,
    Remove,
    Orphans,
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Ensure(_) => Kind::Ensure,
            Op::Inspect => Kind::Inspect,
            Op::Stop(_) => Kind::Stop,
            Op::Remove => Kind::Remove,
            Op::Orphans(_) => Kind::Orphans,
        }
    }
}

/// What a job produced.
#[derive(Debug)]
pub(super) enum Outcome {
    /// [`Op::Ensure`].
    Ensured(Ensured),
    /// [`Op::Inspect`] and [`Op::Stop`]: the container afterwards, `None`
    /// if there is none.
    State(Option<ContainerState>),
    /// [`Op::Remove`].
    Removed,
    /// [`Op::Orphans`]: the services whose containers were removed.
    Orphans(Vec<String>),
}

/// A job for the thread.
#[derive(Debug)]
pub(super) struct Job {
    pub id: u64,
    pub service: String,
    pub op: Op,
}

/// A finished job.
#[derive(Debug)]
pub(super) struct Done {
    pub id: u64,
    pub kind: Kind,
    pub service: String,
    pub result: Result<Outcome, ContainerError>,
}

/// The thread's ends of the two queues. Dropping it ends the thread once
/// its current job is done.
#[derive(Debug)]
pub(super) struct EngineThread {
    jobs: Sender<Job>,
    done: Receiver<Done>,
}

impl EngineThread {
    /// Starts the thread for `worker_id`'s containers; `socket` overrides
    /// the engine socket search.
    pub fn spawn(worker_id: String, socket: Option<PathBuf>) -> io::Result<EngineThread> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Done>();
        std::thread::Builder::new()
            .name("container-engine".into())
            .stack_size(256 * 1024)
            .spawn(move || run(&worker_id, socket, &job_rx, &done_tx))?;
        Ok(EngineThread { jobs, done })
    }

    /// Queues a job; `false` if the thread is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// A finished job, if any (never waits).
    pub fn try_recv(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

fn run(worker_id: &str, socket: Option<PathBuf>, jobs: &Receiver<Job>, done: &Sender<Done>) {
    let mut engine: Option<Engine> = None;
    while let Ok(job) = jobs.recv() {
        if engine.is_none() {
            match Engine::connect(socket.as_deref()) {
                Ok(e) => {
                    tracing::info!(
                        socket = %e.socket().display(),
                        api = e.api_version(),
                        "container engine connected"
                    );
                    engine = Some(e);
                }
                Err(e) => {
                    tracing::debug!("container engine: {e}");
                    let d = Done {
                        id: job.id,
                        kind: job.op.kind(),
                        service: job.service,
                        result: Err(e),
                    };
                    if done.send(d).is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(eng) = engine.as_ref() else {
            continue;
        };
        let result = execute(eng, worker_id, &job);
        if result.as_ref().is_err_and(ContainerError::is_unavailable) {
            // Connect (and ping) again before the next job.
            engine = None;
        }
        let d = Done {
            id: job.id,
            kind: job.op.kind(),
            service: job.service,
            result,
        };
        if done.send(d).is_err() {
            return;
        }
    }
}

fn execute(engine: &Engine, worker_id: &str, job: &Job) -> Result<Outcome, ContainerError> {
    let name = job.service.as_str();
    match &job.op {
        Op::Ensure(m) => engine.ensure(worker_id, m).map(Outcome::Ensured),
        Op::Inspect => engine.inspect(worker_id, name).map(Outcome::State),
        Op::Stop(t) => engine.stop(worker_id, name, *t).map(Outcome::State),
        Op::Remove => engine.remove(worker_id, name).map(|()| Outcome::Removed),
        Op::Orphans(keep) => {
            let mut removed = Vec::new();
            for (service, _) in engine.list_ours(worker_id)? {
                if keep.contains(&service) {
                    continue;
                }
                match engine.remove(worker_id, &service) {
                    Ok(()) => removed.push(service),
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => tracing::warn!(service, "cannot remove the orphan container: {e}"),
                }
            }
            Ok(Outcome::Orphans(removed))
        }
    }
}
