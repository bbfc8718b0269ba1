//! Why the supervisor refuses a command: [`SupervisorError`], whose text
//! the session sends back as the reply's detail (the conductor and the CLI
//! show it; tests match on it).

use protocol::manifest::ManifestError;

/// A refused command (deploy, install, start, stop, restart, remove):
/// nothing changed. A command that was accepted can still fail to start a
/// copy (the spawn, the cached artifact, the container engine): that is
/// what the service's `Failed` status and its detail say, later, not this.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No such service here, or it is being removed.
    #[error("no service {0:?} on this worker")]
    UnknownService(String),
    /// The manifest does not pass [`protocol::Manifest::validate`].
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    /// The name cannot be a directory name ([`super::is_valid_name`]).
    #[error("invalid service name {0:?} (use [a-z0-9-])")]
    InvalidName(String),
}
