//! Deploy jobs: the downloads of `DeployManifest` and `InstallManifest`
//! commands (the manifest, then any artifact) on blocking threads, never on
//! the runtime thread, and what to answer once they are over. A later
//! command for the same service supersedes a pending one (its generation
//! moves on), which is then answered with an error and deploys nothing.
//! The services themselves are the [`Supervisor`]'s; this only hands it
//! what was downloaded.

use std::collections::HashMap;
use std::path::PathBuf;

use protocol::manifest::{ProcessRuntime, Program, Runtime};
use protocol::{Manifest, ManifestRef, ReplyStatus, Secret};
use tokio::task::{Id, JoinError, JoinSet};

use super::service_reply;
use crate::fetch::{Conductor, FetchError};
use crate::supervisor::Supervisor;

/// What a `DeployManifest` download step produced.
enum Fetched {
    /// The manifest (or why not).
    Manifest(Result<Manifest, FetchError>),
    /// The manifest and its artifact download (cached path, downloaded now).
    Artifact(Manifest, [u8; 32], Result<(PathBuf, bool), FetchError>),
}

/// A finished download step of one `DeployManifest` or `InstallManifest`
/// command.
pub(super) struct DeployJob {
    /// The command to answer.
    cmd_id: u32,
    /// The generation of the command; deployed only while still current.
    gen: u64,
    /// The service.
    name: String,
    /// The manifest version the command names.
    version: u32,
    /// Run it (`DeployManifest`) or install it stopped (`InstallManifest`).
    run: bool,
    /// What the step produced.
    fetched: Fetched,
}

/// How to answer a deploy command whose downloads are over.
pub(super) struct Answer {
    /// The command answered.
    pub cmd_id: u32,
    /// The reply's status.
    pub status: ReplyStatus,
    /// The reply's detail.
    pub detail: String,
    /// The detail (`<name>: <why>`) of an `ArtifactRejected` event to send
    /// before the reply: downloaded bytes did not match their digest.
    pub rejected: Option<String>,
}

impl Answer {
    /// An error reply with `detail`.
    fn error(cmd_id: u32, detail: String) -> Answer {
        Answer {
            cmd_id,
            status: ReplyStatus::Error,
            detail,
            rejected: None,
        }
    }
}

/// The deploy commands whose downloads run.
pub(super) struct Deployments {
    /// Where manifests and artifacts are downloaded from. Its secrets
    /// follow rotations ([`Deployments::set_secrets`]): the download tag is
    /// the worker's.
    conductor: Conductor,
    /// Download steps running on blocking threads.
    jobs: JoinSet<DeployJob>,
    /// Task id → (command id, service name) of `jobs`, to answer a
    /// command whose task died.
    tasks: HashMap<Id, (u32, String)>,
    /// Per service: the generation of the latest command that changes its
    /// manifest. Invariant: a download whose generation is not the current
    /// one is never deployed (a later command superseded it).
    gens: HashMap<String, u64>,
    /// The last generation handed out.
    next_gen: u64,
}

impl Deployments {
    /// Where and as whom to download (the current secrets); remote exec
    /// uploads and a self-update downloads the same way.
    pub(super) fn conductor(&self) -> &Conductor {
        &self.conductor
    }

    /// No downloads yet, from `conductor`.
    pub(super) fn new(conductor: Conductor) -> Deployments {
        Deployments {
            conductor,
            jobs: JoinSet::new(),
            tasks: HashMap::new(),
            gens: HashMap::new(),
            next_gen: 0,
        }
    }

    /// Downloads from now on are tagged with `secret`; `previous` is what
    /// it replaced.
    pub(super) fn set_secrets(&mut self, secret: Secret, previous: Secret) {
        self.conductor.secret = secret;
        self.conductor.previous_secret = Some(previous);
    }

    /// A new generation for `name`: pending downloads for it are superseded.
    pub(super) fn supersede(&mut self, name: &str) -> u64 {
        self.next_gen += 1;
        self.gens.insert(name.to_string(), self.next_gen);
        self.next_gen
    }

    /// Does a download run?
    pub(super) fn running(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// The next finished download step (pending while none runs).
    pub(super) async fn next_done(&mut self) -> Option<Result<(Id, DeployJob), JoinError>> {
        self.jobs.join_next_with_id().await
    }

    /// Starts the manifest download of a `DeployManifest` (`run`) or an
    /// `InstallManifest`; the command is answered once
    /// [`Deployments::on_done`] says how.
    pub(super) fn begin(&mut self, cmd_id: u32, r: ManifestRef, run: bool) {
        let name = r.name.to_string();
        let gen = self.supersede(&name);
        let conductor = self.conductor.clone();
        let version = r.version;
        let task_name = name.clone();
        let handle = self.jobs.spawn_blocking(move || DeployJob {
            cmd_id,
            gen,
            name: task_name,
            version,
            run,
            fetched: Fetched::Manifest(conductor.fetch_manifest(&r)),
        });
        self.tasks.insert(handle.id(), (cmd_id, name));
    }

    /// A download step finished: starts the next one (the artifact), or
    /// hands the manifest to `services` and says how to answer.
    pub(super) fn on_done(
        &mut self,
        done: Result<(Id, DeployJob), JoinError>,
        services: &mut Supervisor,
    ) -> Option<Answer> {
        let job = match done {
            Ok((id, job)) => {
                self.tasks.remove(&id);
                job
            }
            Err(e) => {
                let (cmd_id, name) = self.tasks.remove(&e.id())?;
                tracing::error!(service = %name, "deploy task failed: {e}");
                return Some(Answer::error(cmd_id, format!("internal error: {e}")));
            }
        };
        let DeployJob {
            cmd_id,
            gen,
            name,
            version,
            run,
            fetched,
        } = job;
        if let Fetched::Artifact(_, sha, _) = &fetched {
            services.unpin_artifact(*sha);
        }
        if self.gens.get(&name) != Some(&gen) {
            let detail = format!("{name} v{version}: superseded by a later command");
            tracing::info!("{detail}");
            return Some(Answer::error(cmd_id, detail));
        }
        let manifest = match fetched {
            Fetched::Manifest(Err(e)) | Fetched::Artifact(_, _, Err(e)) => {
                return Some(failed(services, cmd_id, &name, version, &e))
            }
            Fetched::Artifact(m, _, Ok((path, downloaded))) => {
                tracing::info!(service = %name, path = %path.display(), downloaded, "artifact ready");
                m
            }
            Fetched::Manifest(Ok(m)) => {
                let arch = services.arch().to_string();
                let artifact = m.artifact_for(&arch).cloned();
                match (&m.runtime, artifact) {
                    (
                        Runtime::Process(ProcessRuntime {
                            program: Program::Artifacts(_),
                            ..
                        }),
                        None,
                    ) => {
                        let e = FetchError::NoArtifact(arch);
                        return Some(failed(services, cmd_id, &name, version, &e));
                    }
                    (_, Some(a)) => {
                        // Pinned until deployed: a prune meanwhile must not
                        // delete the fresh download.
                        services.pin_artifact(a.sha256);
                        let conductor = self.conductor.clone();
                        let dir = services.state_dir().to_path_buf();
                        let task_name = name.clone();
                        let handle = self.jobs.spawn_blocking(move || {
                            let result = conductor.ensure_artifact(&dir, &a);
                            DeployJob {
                                cmd_id,
                                gen,
                                name: task_name,
                                version,
                                run,
                                fetched: Fetched::Artifact(m, a.sha256, result),
                            }
                        });
                        self.tasks.insert(handle.id(), (cmd_id, name));
                        return None;
                    }
                    // A command or a container: nothing more to download
                    // (an image is pulled when the container starts).
                    (_, None) => m,
                }
            }
        };
        let result = if run {
            services.deploy_manifest(manifest)
        } else {
            services.install_manifest(manifest)
        };
        let (status, detail, _) = service_reply(result);
        Some(Answer {
            cmd_id,
            status,
            detail,
            rejected: None,
        })
    }
}

/// The answer to a `DeployManifest` whose download failed; bytes that did
/// not match their digest also raise `ArtifactRejected` and a `Failed`
/// status.
fn failed(
    services: &mut Supervisor,
    cmd_id: u32,
    name: &str,
    version: u32,
    e: &FetchError,
) -> Answer {
    tracing::warn!(service = name, version, "deploy failed: {e}");
    let (detail, rejected) = match e.rejection() {
        Some(why) => {
            let detail = format!("v{version} refused: {e}");
            services.report_refused(name, version, &detail);
            (detail, Some(format!("{name}: {why}")))
        }
        None => (format!("v{version} not deployed: {e}"), None),
    };
    Answer {
        cmd_id,
        status: ReplyStatus::Error,
        detail,
        rejected,
    }
}
