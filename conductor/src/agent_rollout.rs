//! Agent rollouts: the fleet's edge-worker agents move to a signed agent
//! release (`POST /api/v1/agent-releases`) in waves, and the rollout stops
//! at the first worker whose update fails.
//!
//! `POST /api/v1/agent-rollouts {"version", …policy, "selector"}` starts one
//! ([`start`]); at most one is in progress (a partial unique index). The
//! **targets** are the non-revoked workers whose labels match the selector
//! (an empty selector: every worker). Each target is a **member** with an
//! outcome ([`MemberState`]): a target that already reports version V is
//! `updated` at once; one whose arch has no release of V is `skipped`
//! (`no release for <arch>`), and so is one that runs a newer version
//! without `allow_downgrade` (the agent would refuse it). The others are
//! `pending` and placed in waves as service rollouts place them
//! ([`crate::rollout::plan_waves`]): wave 0, the canaries, is the first
//! `canary` (or `canary_percent` %) **online** pending targets; wave 1 the
//! rest. Members of a later wave that are offline when it starts are
//! `skipped` (`offline when wave 1 started`).
//!
//! [`evaluate`] runs at every reconciliation pass, beside
//! [`crate::rollout::evaluate`]. For each `pending` member of the current
//! wave that is online and does not report V yet, it sends
//! `Action::UpdateAgent` built from the release for the member's arch
//! (signature, SHA-256, size, `trial_s`, `allow_downgrade`) through the
//! normal command path ([`crate::commands::seal_command`]: sealed, the
//! seq persisted) and records `sent` with the time and command id. A
//! member **passes** (`updated`) when it is online, the switched agent
//! said `AgentUpdated` (`<from> -> V`) since the command was sent (the new
//! binary on trial reports V too, before the switch), and its Birth's
//! `agent_version` is V, unchanged for `settle_s`. After a conductor
//! restart, a member sent its command before the restart passes on its
//! version alone (the event may have reached the previous run). It **fails** when its
//! reply to the `UpdateAgent` is not `Ok` (the reply's words are the
//! reason), or an `AgentUpdateFailed` event about V (`"<V>: <why>"`)
//! arrives after the command was sent — ingest notes both in
//! [`Shared::agent_updates`] ([`note_reply`], [`note_event`]) — or when the
//! wave has not passed within `timeout_s` (default `trial_s + settle_s +
//! 60`). A failure ends the rollout `reverted` with the reason
//! (`wave 0 failed: w-…: 0.99.0: rolled back: …`) and later waves are not
//! started; after the last wave it is `succeeded`. Members still `pending`
//! when it ends become `skipped`.
//!
//! A conductor restart resumes the rollout in progress: the wave's clock
//! (settle and timeout) restarts at the conductor's start, as for service
//! rollouts, and replies to commands sent before the restart are still
//! matched (the command ids are in the members' record).
//!
//! Limits: "reverted" means the rollout stopped, not that the fleet went
//! back: the device that failed rolled itself back (the agent's trial), but
//! workers that did update stay on V — roll them back with a rollout of the
//! previous version and `allow_downgrade`. A command lost on the way (the
//! worker went offline as it was sent) is not sent again: the wave times
//! out. Two waves (canary, rest); `trial_s` 5..=600; `settle_s` ≤ 3600,
//! `timeout_s` ≤ 86400.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protocol::release::{AgentUpdate, Version};
use protocol::Action;
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::commands::seal_command;
use crate::deployment::{labels_match, Policy, ServiceError};
use crate::rollout::{plan_waves, Wave, IN_PROGRESS, REVERTED, SUCCEEDED};
use crate::state::{now_ms, AgentNote, AgentUpdates, Shared, Status};
use crate::store::notes::{NoteKind, NoteRow};
use crate::store::{AgentReleaseRow, AgentRolloutRow, WriteOp};

/// Agent rollouts `GET /agent-rollouts` returns.
pub const HISTORY: usize = 50;
/// Default `trial_s`.
pub const DEFAULT_TRIAL_S: u16 = 60;
/// Shortest `trial_s`.
pub const MIN_TRIAL_S: u16 = 5;
/// Longest `trial_s`.
pub const MAX_TRIAL_S: u16 = 600;
/// Default `settle_s`.
pub const DEFAULT_SETTLE_S: u32 = 10;
/// The reason of a rollout ended by `POST /agent-rollouts/{id}/abort`.
pub const ABORTED: &str = "aborted by request";

fn default_settle() -> u32 {
    DEFAULT_SETTLE_S
}

fn default_trial() -> u16 {
    DEFAULT_TRIAL_S
}

/// How an agent rollout proceeds: a service rollout's [`Policy`] plus the
/// agent's trial time and whether an older version may be installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPolicy {
    /// Canary wave size (workers); exclusive with `canary_percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    /// Canary wave size as a percentage of the targets (1..=100, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// How long each member must report the new version, seconds.
    #[serde(default = "default_settle")]
    pub settle_s: u32,
    /// A wave that has not passed after this long fails (default
    /// `trial_s + settle_s + 60`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// Seconds the new agent has on the device to start and reach the
    /// conductor before the old one takes over again.
    #[serde(default = "default_trial")]
    pub trial_s: u16,
    /// Install even where the running agent is newer.
    #[serde(default)]
    pub allow_downgrade: bool,
}

impl Default for AgentPolicy {
    fn default() -> Self {
        AgentPolicy {
            canary: None,
            canary_percent: None,
            settle_s: DEFAULT_SETTLE_S,
            timeout_s: None,
            trial_s: DEFAULT_TRIAL_S,
            allow_downgrade: false,
        }
    }
}

impl AgentPolicy {
    /// The wave part, as service rollouts have it.
    pub fn waves(&self) -> Policy {
        Policy {
            canary: self.canary,
            canary_percent: self.canary_percent,
            settle_s: self.settle_s,
            timeout_s: self.timeout_s,
        }
    }

    /// Checks the bounds; the message names the field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        self.waves().validate()?;
        if !(MIN_TRIAL_S..=MAX_TRIAL_S).contains(&self.trial_s) {
            return Err(ServiceError::Invalid(format!(
                "trial_s must be {MIN_TRIAL_S}..={MAX_TRIAL_S}"
            )));
        }
        Ok(())
    }

    /// Wave timeout, ms.
    pub fn timeout_ms(&self) -> u64 {
        let default = u32::from(self.trial_s)
            .saturating_add(self.settle_s)
            .saturating_add(60);
        u64::from(self.timeout_s.unwrap_or(default)) * 1000
    }
}

/// A member's outcome. **Names are API**: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Not sent yet (its wave has not started, or it is offline).
    Pending,
    /// `UpdateAgent` sent; not reporting the new version for `settle_s` yet.
    Sent,
    /// Reports the new version (passed).
    Updated,
    /// Refused or rolled back the update (the rollout's reason says how).
    Failed,
    /// Not updated: no release for its arch, a newer agent, offline when
    /// its wave started, or the rollout ended first.
    Skipped,
}

impl MemberState {
    /// Every state.
    pub const ALL: [MemberState; 5] = [
        MemberState::Pending,
        MemberState::Sent,
        MemberState::Updated,
        MemberState::Failed,
        MemberState::Skipped,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Pending => "pending",
            MemberState::Sent => "sent",
            MemberState::Updated => "updated",
            MemberState::Failed => "failed",
            MemberState::Skipped => "skipped",
        }
    }
}

/// One target worker's record in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Outcome so far.
    pub state: MemberState,
    /// What happened (the worker's words for a failure).
    #[serde(default)]
    pub detail: String,
    /// Its arch when the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The agent version it reported when the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// Command id of the `UpdateAgent` sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd_id: Option<u32>,
    /// When it was sent, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<u64>,
    /// When the worker's `Ok` reply arrived, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replied_ms: Option<u64>,
    /// Since when it has been seen online at the new version, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_version_since_ms: Option<u64>,
    /// When its outcome was decided, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

impl Member {
    fn new(state: MemberState, detail: impl Into<String>) -> Member {
        Member {
            state,
            detail: detail.into(),
            arch: None,
            from_version: None,
            cmd_id: None,
            sent_ms: None,
            replied_ms: None,
            at_version_since_ms: None,
            finished_ms: None,
        }
    }

    fn decide(&mut self, state: MemberState, detail: String, now: u64) {
        self.state = state;
        self.detail = detail;
        self.finished_ms = Some(now);
    }
}

/// An agent rollout with its JSON columns parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRollout {
    /// The stored row (its JSON columns are written by [`AgentRollout::sync`]).
    pub row: AgentRolloutRow,
    /// Its policy.
    pub policy: AgentPolicy,
    /// Its label selector.
    pub selector: BTreeMap<String, String>,
    /// Its waves; `row.wave` indexes the current one.
    pub waves: Vec<Wave>,
    /// Every target by worker id.
    pub members: BTreeMap<String, Member>,
}

impl AgentRollout {
    /// Parses a row (unreadable JSON columns read as defaults).
    pub fn from_row(row: AgentRolloutRow) -> AgentRollout {
        AgentRollout {
            policy: serde_json::from_str(&row.policy_json).unwrap_or_default(),
            selector: serde_json::from_str(&row.selector_json).unwrap_or_default(),
            waves: serde_json::from_str(&row.waves_json).unwrap_or_default(),
            members: serde_json::from_str(&row.members_json).unwrap_or_default(),
            row,
        }
    }

    /// Writes the parsed parts back into the row's JSON columns.
    pub fn sync(&mut self) {
        self.row.policy_json = serde_json::to_string(&self.policy).unwrap_or_default();
        self.row.selector_json = serde_json::to_string(&self.selector).unwrap_or_default();
        self.row.waves_json = serde_json::to_string(&self.waves).unwrap_or_default();
        self.row.members_json = serde_json::to_string(&self.members).unwrap_or_default();
    }

    /// How many members are in each state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut out: BTreeMap<&'static str, usize> =
            MemberState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for m in self.members.values() {
            *out.entry(m.state.as_str()).or_default() += 1;
        }
        out
    }

    /// JSON for the API.
    pub fn to_json(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|(id, m)| {
                json!({
                    "worker_id": id,
                    "state": m.state.as_str(),
                    "detail": m.detail,
                    "arch": m.arch,
                    "from_version": m.from_version,
                    "sent_ms": m.sent_ms,
                    "finished_ms": m.finished_ms,
                })
            })
            .collect();
        json!({
            "id": self.row.id,
            "version": self.row.version,
            "state": self.row.state,
            "wave": self.row.wave,
            "waves": self.waves,
            "policy": self.policy,
            "selector": self.selector,
            "reason": self.row.reason,
            "started_ms": self.row.started_ms,
            "wave_started_ms": self.row.wave_started_ms,
            "finished_ms": self.row.finished_ms,
            "counts": self.counts(),
            "members": members,
        })
    }

    /// Ends the rollout (`succeeded` or `reverted`) at `now`: members
    /// still pending are skipped.
    pub fn finish(&mut self, state: &str, reason: &str, now: u64) {
        self.row.state = state.into();
        self.row.reason = reason.into();
        self.row.finished_ms = Some(now);
        let why = if state == SUCCEEDED {
            "not sent: the rollout ended".to_string()
        } else {
            format!("not sent: the rollout was {state}")
        };
        for m in self.members.values_mut() {
            if m.state == MemberState::Pending {
                m.decide(MemberState::Skipped, why.clone(), now);
            }
        }
    }
}

/// One target as [`plan`] sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Worker id.
    pub id: String,
    /// Online now.
    pub online: bool,
    /// Its arch (from its Birth).
    pub arch: Option<String>,
    /// Its agent version (from its Birth).
    pub version: Option<String>,
}

/// The members and waves of a rollout of `version` over `targets` (by id),
/// where `released` are the archs with a release of `version`. `Err` with
/// the reason when members need the update but none of them is online.
pub fn plan(
    version: &str,
    targets: &[Target],
    released: &BTreeSet<String>,
    policy: &AgentPolicy,
) -> Result<(BTreeMap<String, Member>, Vec<Wave>), String> {
    let to = Version::parse(version).ok();
    let mut members = BTreeMap::new();
    let mut pending: Vec<String> = Vec::new();
    let mut online: Vec<String> = Vec::new();
    for t in targets {
        let running = t.version.as_deref();
        let mut m = if running == Some(version) {
            Member::new(MemberState::Updated, format!("already running {version}"))
        } else {
            match t.arch.as_deref() {
                None => Member::new(MemberState::Skipped, "arch unknown (no Birth yet)"),
                Some(a) if !released.contains(a) => {
                    Member::new(MemberState::Skipped, format!("no release for {a}"))
                }
                Some(_) => {
                    let newer = running
                        .and_then(|r| Version::parse(r).ok())
                        .zip(to.clone())
                        .is_some_and(|(r, to)| r > to);
                    if newer && !policy.allow_downgrade {
                        Member::new(
                            MemberState::Skipped,
                            format!(
                                "runs {}, newer than {version} (allow_downgrade not set)",
                                running.unwrap_or_default()
                            ),
                        )
                    } else {
                        pending.push(t.id.clone());
                        if t.online {
                            online.push(t.id.clone());
                        }
                        Member::new(MemberState::Pending, "")
                    }
                }
            }
        };
        m.arch.clone_from(&t.arch);
        m.from_version.clone_from(&t.version);
        members.insert(t.id.clone(), m);
    }
    if !pending.is_empty() && online.is_empty() {
        return Err(format!(
            "none of the {} worker(s) to update to {version} is online to canary",
            pending.len()
        ));
    }
    let waves = plan_waves(&pending, &online, &policy.waves());
    Ok((members, waves))
}

/// What one worker looks like to [`step`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Online (and not revoked).
    pub online: bool,
    /// Its Birth's `agent_version`.
    pub version: Option<String>,
    /// Its last reply to an `UpdateAgent`.
    pub reply: Option<AgentNote>,
    /// Its last `AgentUpdateFailed` event.
    pub failure: Option<AgentNote>,
    /// Its last `AgentUpdated` event.
    pub switched: Option<AgentNote>,
    /// Since when this conductor notes events (its start, ms): a member
    /// sent its update before then may have reported its switch to the
    /// previous run, whose notes are gone; its version alone counts.
    pub noting_since_ms: u64,
}

/// What one [`step`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Something to persist changed.
    pub changed: bool,
    /// Members to send `UpdateAgent` to now.
    pub send: Vec<String>,
    /// The rollout ended in this state.
    pub finished: Option<&'static str>,
}

/// One evaluation of a rollout in progress as a pure step over what the
/// workers look like (`seen`, by id; a worker missing is offline) at `now`.
/// Updates the members, advances the wave or ends the rollout; the caller
/// sends `UpdateAgent` to [`Step::send`] and persists.
pub fn step(r: &mut AgentRollout, seen: &HashMap<String, Observed>, now: u64) -> Step {
    let mut out = Step::default();
    let version = r.row.version.clone();
    let idx = r.row.wave as usize;
    let Some(wave) = r.waves.get(idx).cloned() else {
        r.finish(SUCCEEDED, "", now);
        out.changed = true;
        out.finished = Some(SUCCEEDED);
        return out;
    };
    let since = r.row.wave_started_ms;
    let settle = u64::from(r.policy.settle_s) * 1000;
    let offline = Observed::default();
    let mut failed: Option<String> = None;
    let mut waiting: Option<String> = None;
    for id in &wave.workers {
        let Some(m) = r.members.get_mut(id) else {
            continue;
        };
        if matches!(m.state, MemberState::Updated | MemberState::Skipped) {
            continue;
        }
        let o = seen.get(id).unwrap_or(&offline);
        if let Some(sent) = m.sent_ms {
            let about_v = |n: &&AgentNote| n.version == version && n.at_ms >= sent;
            if let Some(n) = o.reply.as_ref().filter(about_v) {
                if !n.ok {
                    let why = format!("{version} refused: {}", n.detail);
                    failed = Some(format!("{id}: {why}"));
                    m.decide(MemberState::Failed, why, now);
                    out.changed = true;
                    break;
                }
                if m.replied_ms.is_none() {
                    m.replied_ms = Some(n.at_ms);
                    m.detail.clone_from(&n.detail);
                    out.changed = true;
                }
            }
            if let Some(n) = o.failure.as_ref().filter(about_v) {
                failed = Some(format!("{id}: {}", n.detail));
                m.decide(MemberState::Failed, n.detail.clone(), now);
                out.changed = true;
                break;
            }
        }
        let on_trial = m.sent_ms.is_some_and(|sent| {
            sent >= o.noting_since_ms
                && !o
                    .switched
                    .as_ref()
                    .is_some_and(|n| n.version == version && n.at_ms >= sent)
        });
        if o.online && o.version.as_deref() == Some(version.as_str()) && on_trial {
            // The new binary on trial reports V as well: the member passes
            // once the switched agent said `AgentUpdated`.
            waiting.get_or_insert_with(|| format!("{id}: {version} on trial, not switched yet"));
            continue;
        }
        if o.online && o.version.as_deref() == Some(version.as_str()) {
            let at = *m.at_version_since_ms.get_or_insert_with(|| {
                out.changed = true;
                now
            });
            if now.saturating_sub(at.max(since)) >= settle {
                m.decide(MemberState::Updated, format!("reports {version}"), now);
                out.changed = true;
            } else {
                waiting.get_or_insert_with(|| {
                    format!("{id} reports {version} for less than {} s", settle / 1000)
                });
            }
            continue;
        }
        if m.at_version_since_ms.take().is_some() {
            out.changed = true;
        }
        let reports = o.version.as_deref().unwrap_or("no version");
        let what = match (m.state, o.online) {
            (MemberState::Pending, true) => {
                out.send.push(id.clone());
                format!("{id}: update to {version} being sent (reports {reports})")
            }
            (MemberState::Pending, false) => format!("{id} is offline (not sent yet)"),
            (_, true) => format!("{id} reports {reports} ({})", m.detail),
            (_, false) => format!("{id} is offline ({})", m.detail),
        };
        waiting.get_or_insert(what);
    }
    if let Some(f) = failed {
        let why = format!("wave {idx} failed: {f}");
        r.finish(REVERTED, &why, now);
        out.send.clear();
        out.changed = true;
        out.finished = Some(REVERTED);
    } else if let Some(w) = waiting {
        if now.saturating_sub(since) >= r.policy.timeout_ms() {
            let why = format!(
                "wave {idx} did not pass within {} s: {w}",
                r.policy.timeout_ms() / 1000
            );
            r.finish(REVERTED, &why, now);
            out.send.clear();
            out.changed = true;
            out.finished = Some(REVERTED);
        }
    } else if idx + 1 >= r.waves.len() {
        r.finish(SUCCEEDED, "", now);
        out.changed = true;
        out.finished = Some(SUCCEEDED);
    } else {
        // Next wave: its members that are offline now are skipped.
        let next = idx + 1;
        if let Some(w) = r.waves.get_mut(next) {
            let (on, off): (Vec<String>, Vec<String>) = w
                .workers
                .drain(..)
                .partition(|id| seen.get(id).is_some_and(|o| o.online));
            w.workers = on;
            for id in &off {
                if let Some(m) = r.members.get_mut(id) {
                    if m.state == MemberState::Pending {
                        m.decide(
                            MemberState::Skipped,
                            format!("offline when wave {next} started"),
                            now,
                        );
                    }
                }
            }
            w.skipped.extend(off);
        }
        // fits: next < waves.len() ≤ 2 (the canaries, then the rest).
        #[allow(clippy::cast_possible_truncation)]
        let wave = next as u32;
        r.row.wave = wave;
        r.row.wave_started_ms = now;
        out.changed = true;
    }
    out
}

/// The `UpdateAgent` command for a release row.
pub fn update_action(rel: &AgentReleaseRow, policy: &AgentPolicy) -> Result<Action, String> {
    let bad = |what: &str| format!("release {} {}: {what}", rel.version, rel.arch);
    let sha: [u8; 32] = crate::crypto::from_hex(&rel.sha256)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("unreadable sha256"))?;
    let signature = crate::crypto::from_hex(&rel.signature)
        .filter(|b| b.len() == protocol::release::SIGNATURE_LEN)
        .and_then(|b| heapless::Vec::from_slice(&b).ok())
        .ok_or_else(|| bad("unreadable signature"))?;
    Ok(Action::UpdateAgent(AgentUpdate {
        version: heapless::String::try_from(rel.version.as_str())
            .map_err(|_| bad("version too long"))?,
        arch: heapless::String::try_from(rel.arch.as_str()).map_err(|_| bad("arch too long"))?,
        sha256: sha,
        size: rel.size,
        signature,
        allow_downgrade: policy.allow_downgrade,
        trial_s: policy.trial_s,
    }))
}

/// The agent rollout in progress, if any.
pub fn active(shared: &Shared) -> Result<Option<AgentRollout>, ServiceError> {
    Ok(shared
        .db()
        .active_agent_rollout()?
        .map(AgentRollout::from_row))
}

/// Starts a rollout of `version` (whose releases exist: the caller checked)
/// to the workers `selector` matches. Call without the worker map locked.
pub fn start(
    shared: &Shared,
    version: &str,
    policy: AgentPolicy,
    selector: BTreeMap<String, String>,
) -> Result<AgentRollout, ServiceError> {
    policy.validate()?;
    if let Some(r) = active(shared)? {
        return Err(ServiceError::Conflict(format!(
            "agent rollout {} (to {}) is in progress; wait for it or abort it",
            r.row.id, r.row.version
        )));
    }
    let released: BTreeSet<String> = shared
        .db()
        .agent_releases_of(version)?
        .into_iter()
        .map(|r| r.arch)
        .collect();
    let mut targets: Vec<Target> = {
        let workers = shared.workers();
        workers
            .values()
            .filter(|w| !w.revoked && labels_match(&selector, &w.labels))
            .map(|w| Target {
                id: w.id.clone(),
                online: w.status == Status::Online,
                arch: w.inventory.as_ref().map(|b| b.arch.to_string()),
                version: w.inventory.as_ref().map(|b| b.agent_version.to_string()),
            })
            .collect()
    };
    targets.sort_by(|a, b| a.id.cmp(&b.id));
    let (members, waves) =
        plan(version, &targets, &released, &policy).map_err(ServiceError::Conflict)?;
    let now = now_ms();
    let mut r = AgentRollout {
        row: AgentRolloutRow {
            id: 0,
            version: version.to_string(),
            state: IN_PROGRESS.into(),
            policy_json: String::new(),
            selector_json: String::new(),
            waves_json: String::new(),
            wave: 0,
            wave_started_ms: now,
            reason: String::new(),
            started_ms: now,
            finished_ms: None,
            members_json: String::new(),
        },
        policy,
        selector,
        waves,
        members,
    };
    if r.waves.is_empty() {
        // Nobody needs the update: done at once.
        r.finish(SUCCEEDED, "", now);
    }
    r.sync();
    r.row.id = match shared.db().insert_agent_rollout(&r.row) {
        Ok(id) => id,
        Err(e) if e.is_constraint_violation() => {
            return Err(ServiceError::Conflict(
                "an agent rollout is already in progress".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    info!(
        id = r.row.id,
        version,
        targets = r.members.len(),
        waves = r.waves.len(),
        "agent rollout started"
    );
    shared.reconcile.notify_one();
    Ok(r)
}

/// Ends agent rollout `id` as `reverted` ("aborted by request"). `Ok(None)`
/// when there is no such rollout; `Conflict` when it is not in progress.
pub fn abort(shared: &Shared, id: i64) -> Result<Option<AgentRollout>, ServiceError> {
    let Some(row) = shared.db().agent_rollout(id)? else {
        return Ok(None);
    };
    let mut r = AgentRollout::from_row(row);
    if r.row.state != IN_PROGRESS {
        return Err(ServiceError::Conflict(format!(
            "agent rollout {id} is {}, not in progress",
            r.row.state
        )));
    }
    r.finish(REVERTED, ABORTED, now_ms());
    r.sync();
    if !shared.db().update_agent_rollout(&r.row)? {
        return Err(ServiceError::Conflict(format!(
            "agent rollout {id} ended meanwhile"
        )));
    }
    warn!(id, version = %r.row.version, "agent rollout aborted");
    Ok(Some(r))
}

/// Advances, completes or stops the agent rollout in progress and sends
/// `UpdateAgent` where its wave needs it; returns how many commands were
/// sent plus 1 when the rollout changed. Called by each reconciliation
/// pass.
pub fn evaluate(shared: &Shared, client: &AsyncClient) -> Result<usize, ServiceError> {
    let Some(mut r) = active(shared)? else {
        // No reply is awaited any more.
        shared.agent_updates().cmds.clear();
        return Ok(0);
    };
    let mut seen: HashMap<String, Observed> = {
        let workers = shared.workers();
        r.members
            .keys()
            .map(|id| {
                let w = workers.get(id);
                let o = Observed {
                    online: w.is_some_and(|w| w.status == Status::Online && !w.revoked),
                    version: w
                        .and_then(|w| w.inventory.as_ref())
                        .map(|b| b.agent_version.to_string()),
                    ..Observed::default()
                };
                (id.clone(), o)
            })
            .collect()
    };
    let noting_since_ms = shared.notes_since_ms;
    {
        let mut notes = shared.agent_updates();
        // Replies to commands sent before a conductor restart still match.
        for (id, m) in &r.members {
            if let (MemberState::Sent, Some(cmd), None) = (m.state, m.cmd_id, m.replied_ms) {
                notes
                    .cmds
                    .entry((id.clone(), cmd))
                    .or_insert_with(|| r.row.version.clone());
            }
        }
        for (id, o) in &mut seen {
            o.reply = notes.replies.get(id).cloned();
            o.failure = notes.failures.get(id).cloned();
            o.switched = notes.switched.get(id).cloned();
            o.noting_since_ms = noting_since_ms;
        }
    }
    let now = now_ms();
    let st = step(&mut r, &seen, now);
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seal_failed = None;
    if !st.send.is_empty() {
        let releases: HashMap<String, AgentReleaseRow> = shared
            .db()
            .agent_releases_of(&r.row.version)?
            .into_iter()
            .map(|x| (x.arch.clone(), x))
            .collect();
        let mut workers = shared.workers();
        let mut awaited: Vec<(String, u32)> = Vec::new();
        for id in &st.send {
            let (Some(m), Some(w)) = (r.members.get_mut(id), workers.get_mut(id)) else {
                continue;
            };
            if w.revoked || w.status != Status::Online {
                continue;
            }
            let arch = m.arch.clone().unwrap_or_default();
            let action = match releases.get(&arch).map(|x| update_action(x, &r.policy)) {
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    m.decide(MemberState::Skipped, e, now);
                    continue;
                }
                None => {
                    m.decide(MemberState::Skipped, format!("no release for {arch}"), now);
                    continue;
                }
            };
            match seal_command(shared, w, action) {
                Ok((cmd_id, frame)) => {
                    info!(worker_id = %id, version = %r.row.version, cmd_id, "agent rollout: update sent");
                    m.state = MemberState::Sent;
                    m.detail = format!("update to {} sent", r.row.version);
                    m.sent_ms = Some(now);
                    m.cmd_id = Some(cmd_id);
                    awaited.push((id.clone(), cmd_id));
                    frames.push((id.clone(), frame));
                }
                Err(e) => {
                    seal_failed = Some(e);
                    break;
                }
            }
        }
        // Recorded before the worker map is released: no reply can come
        // before the publishes below.
        if !awaited.is_empty() {
            let mut notes = shared.agent_updates();
            for key in awaited {
                notes.cmds.insert(key, r.row.version.clone());
            }
        }
    }
    let mut changed = 0;
    if st.changed || !frames.is_empty() || seal_failed.is_some() {
        r.sync();
        // Persisted before the commands leave; a rollout aborted meanwhile
        // is left as it is and nothing is sent.
        if !shared.db().update_agent_rollout(&r.row)? {
            return Ok(0);
        }
        changed += 1;
    }
    match st.finished {
        Some(SUCCEEDED) => {
            info!(id = r.row.id, version = %r.row.version, "agent rollout succeeded")
        }
        Some(state) => warn!(id = r.row.id, version = %r.row.version, reason = %r.row.reason,
            "agent rollout {state}"),
        None => {}
    }
    for (wid, frame) in &frames {
        let topic = protocol::topic::topic(wid, protocol::TopicKind::Cmd);
        if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, frame.clone()) {
            warn!(worker_id = %wid, "agent rollout: MQTT queue unavailable: {e}");
        }
    }
    if let Some(e) = seal_failed {
        return Err(e);
    }
    Ok(changed + frames.len())
}

/// A reply no HTTP request waits for: if it answers an `UpdateAgent`, it is
/// noted for the rollout and `true` is returned.
pub fn note_reply(shared: &Shared, worker_id: &str, reply: &protocol::Reply) -> bool {
    let mut notes = shared.agent_updates();
    let Some(version) = notes.cmds.remove(&(worker_id.to_string(), reply.cmd_id)) else {
        return false;
    };
    let detail = match reply.status {
        protocol::ReplyStatus::Ok | protocol::ReplyStatus::Error => reply.detail.to_string(),
        protocol::ReplyStatus::Unsupported => {
            format!("unsupported by this agent: {}", reply.detail)
        }
    };
    let ok = reply.status == protocol::ReplyStatus::Ok;
    if !ok {
        warn!(worker_id, version = %version, detail = %detail, "agent update refused by the worker");
    }
    remember(
        shared,
        &mut notes,
        worker_id,
        NoteKind::AgentReply,
        version,
        ok,
        detail,
    );
    drop(notes);
    shared.reconcile.notify_one();
    true
}

/// A worker event: an `AgentUpdateFailed` (`"<version>: <why>"`) is noted
/// for the rollout. Returns `true` for the agent update events (the
/// rollout is worth evaluating now).
pub fn note_event(shared: &Shared, worker_id: &str, ev: &protocol::Event) -> bool {
    let detail = ev.detail.as_str();
    let (kind, version, ok) = match ev.kind {
        // `<from> -> <to>`, noted as `<to>`.
        protocol::EventKind::AgentUpdated => (
            NoteKind::AgentSwitched,
            detail.rsplit_once("->").map_or(detail, |(_, to)| to),
            true,
        ),
        // `<version>: <why>`.
        protocol::EventKind::AgentUpdateFailed => (
            NoteKind::AgentFailure,
            detail.split_once(':').map_or(detail, |(v, _)| v),
            false,
        ),
        _ => return false,
    };
    let mut notes = shared.agent_updates();
    remember(
        shared,
        &mut notes,
        worker_id,
        kind,
        version.trim().to_string(),
        ok,
        detail.to_string(),
    );
    true
}

/// Notes what `worker_id` said about its agent update (`kind`: a reply,
/// a failure or a switch) where the rollout reads it, and queues it for
/// the store (`store::notes`), so a restart or a takeover keeps it.
fn remember(
    shared: &Shared,
    notes: &mut AgentUpdates,
    worker_id: &str,
    kind: NoteKind,
    version: String,
    ok: bool,
    detail: String,
) {
    let note = AgentNote {
        version,
        ok,
        detail,
        at_ms: now_ms(),
    };
    let _ = shared.writer.send(WriteOp::Note(NoteRow {
        worker_id: worker_id.to_string(),
        kind,
        subject: String::new(),
        version: Some(note.version.clone()),
        ok: note.ok,
        what: note.detail.clone(),
        at_ms: note.at_ms,
    }));
    let by_worker = match kind {
        NoteKind::AgentReply => &mut notes.replies,
        NoteKind::AgentFailure => &mut notes.failures,
        NoteKind::AgentSwitched => &mut notes.switched,
        // Not an agent note (services.rs keeps those).
        NoteKind::ServiceFailure => return,
    };
    by_worker.insert(worker_id.to_string(), note);
}

/// Puts the stored notes (`store::notes`) back where the rollouts read
/// them: service failures and agent update notes. At start.
pub fn restore_notes(shared: &Shared, rows: Vec<NoteRow>) {
    // One leaf lock at a time (`state::lock_order`).
    let (services, agent): (Vec<NoteRow>, Vec<NoteRow>) = rows
        .into_iter()
        .partition(|n| n.kind == NoteKind::ServiceFailure);
    shared
        .service_failures()
        .extend(services.into_iter().map(|n| {
            (
                (n.worker_id, n.subject),
                crate::state::FailMark {
                    version: n.version.and_then(|v| v.parse().ok()),
                    what: n.what,
                    at_ms: n.at_ms,
                },
            )
        }));
    let mut notes = shared.agent_updates();
    for n in agent {
        let note = AgentNote {
            version: n.version.unwrap_or_default(),
            ok: n.ok,
            detail: n.what,
            at_ms: n.at_ms,
        };
        match n.kind {
            NoteKind::AgentReply => notes.replies.insert(n.worker_id, note),
            NoteKind::AgentFailure => notes.failures.insert(n.worker_id, note),
            NoteKind::AgentSwitched => notes.switched.insert(n.worker_id, note),
            // Partitioned out above.
            NoteKind::ServiceFailure => None,
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn target(id: &str, online: bool, arch: &str, version: &str) -> Target {
        Target {
            id: id.into(),
            online,
            arch: Some(arch.into()).filter(|a: &String| !a.is_empty()),
            version: Some(version.into()),
        }
    }

    fn rollout(targets: &[Target], policy: AgentPolicy) -> AgentRollout {
        let released: BTreeSet<String> = ["x86_64".to_string(), "aarch64".into()].into();
        let (members, waves) = plan("0.2.0", targets, &released, &policy).unwrap();
        let mut r = AgentRollout {
            row: AgentRolloutRow {
                id: 1,
                version: "0.2.0".into(),
                state: IN_PROGRESS.into(),
                policy_json: String::new(),
                selector_json: String::new(),
                waves_json: String::new(),
                wave: 0,
                wave_started_ms: 1_000,
                reason: String::new(),
                started_ms: 1_000,
                finished_ms: None,
                members_json: String::new(),
            },
            policy,
            selector: BTreeMap::new(),
            waves,
            members,
        };
        r.sync();
        r
    }

    fn at(version: &str) -> Observed {
        Observed {
            online: true,
            version: Some(version.into()),
            ..Observed::default()
        }
    }

    /// Online at `version`, which the switched agent reported at `at_ms`.
    fn switched(version: &str, at_ms: u64) -> Observed {
        Observed {
            switched: Some(AgentNote {
                version: version.into(),
                ok: true,
                detail: format!("0.1.0 -> {version}"),
                at_ms,
            }),
            ..at(version)
        }
    }

    fn state(r: &AgentRollout, id: &str) -> MemberState {
        r.members[id].state
    }

    /// What the caller of `step` does with `send`.
    fn sent(r: &mut AgentRollout, ids: &[String], now: u64) {
        for id in ids {
            let m = r.members.get_mut(id).unwrap();
            m.state = MemberState::Sent;
            m.sent_ms = Some(now);
        }
    }

    #[test]
    fn policy_bounds_and_the_default_timeout() {
        let p = |v: Value| serde_json::from_value::<AgentPolicy>(v).unwrap();
        assert!(AgentPolicy::default().validate().is_ok());
        assert_eq!(AgentPolicy::default().timeout_ms(), (60 + 10 + 60) * 1000);
        assert!(p(json!({"trial_s": 4})).validate().is_err());
        assert!(p(json!({"trial_s": 601})).validate().is_err());
        assert!(p(json!({"canary": 1, "canary_percent": 5}))
            .validate()
            .is_err());
        assert_eq!(p(json!({"timeout_s": 30})).timeout_ms(), 30_000);
        assert!(serde_json::from_value::<AgentPolicy>(json!({"bogus": 1})).is_err());
    }

    #[test]
    fn planning_skips_what_cannot_or_need_not_update() {
        let targets = [
            target("w-1", true, "x86_64", "0.1.0"),
            target("w-2", false, "x86_64", "0.1.0"),
            target("w-3", true, "armv7l", "0.1.0"),
            target("w-4", true, "aarch64", "0.2.0"),
            target("w-5", true, "aarch64", "0.3.0"),
            target("w-6", true, "", "0.1.0"),
            target("w-7", true, "aarch64", "0.1.0"),
        ];
        let r = rollout(&targets, AgentPolicy::default());
        assert_eq!(state(&r, "w-1"), MemberState::Pending);
        assert_eq!(state(&r, "w-3"), MemberState::Skipped);
        assert_eq!(r.members["w-3"].detail, "no release for armv7l");
        assert_eq!(state(&r, "w-4"), MemberState::Updated);
        assert_eq!(state(&r, "w-5"), MemberState::Skipped);
        assert!(r.members["w-5"].detail.contains("allow_downgrade"));
        assert_eq!(state(&r, "w-6"), MemberState::Skipped);
        assert_eq!(r.waves.len(), 2);
        assert_eq!(r.waves[0].workers, ["w-1"], "an online canary");
        assert_eq!(r.waves[1].workers, ["w-2", "w-7"]);
        // Downgrades allowed: w-5 is updated too.
        let r = rollout(
            &targets,
            AgentPolicy {
                allow_downgrade: true,
                ..AgentPolicy::default()
            },
        );
        assert_eq!(state(&r, "w-5"), MemberState::Pending);
        // Nobody to update online: refused.
        let released: BTreeSet<String> = ["x86_64".to_string()].into();
        let e = plan(
            "0.2.0",
            &[target("w-2", false, "x86_64", "0.1.0")],
            &released,
            &AgentPolicy::default(),
        )
        .unwrap_err();
        assert!(e.contains("online"), "{e}");
        // Nobody to update at all: no wave, the first step succeeds.
        let mut r = rollout(
            &[target("w-4", true, "aarch64", "0.2.0")],
            AgentPolicy::default(),
        );
        assert!(r.waves.is_empty());
        let s = step(&mut r, &HashMap::new(), 2_000);
        assert_eq!(s.finished, Some(SUCCEEDED));
    }

    #[test]
    fn a_wave_sends_then_passes_after_settling_then_the_last_succeeds() {
        let targets = [
            target("w-1", true, "x86_64", "0.1.0"),
            target("w-2", true, "x86_64", "0.1.0"),
            target("w-3", false, "x86_64", "0.1.0"),
        ];
        let policy = AgentPolicy {
            settle_s: 5,
            ..AgentPolicy::default()
        };
        let mut r = rollout(&targets, policy);
        let mut seen: HashMap<String, Observed> = [
            ("w-1".to_string(), at("0.1.0")),
            ("w-2".to_string(), at("0.1.0")),
        ]
        .into();
        let s = step(&mut r, &seen, 2_000);
        assert_eq!(s.send, ["w-1"], "the canary only");
        assert!(s.finished.is_none());
        sent(&mut r, &s.send, 2_000);
        // Nothing new: nothing sent again.
        let s = step(&mut r, &seen, 3_000);
        assert!(s.send.is_empty() && !s.changed, "{s:?}");
        // It replies Ok, restarts on the new version and settles.
        seen.get_mut("w-1").unwrap().reply = Some(AgentNote {
            version: "0.2.0".into(),
            ok: true,
            detail: "trial of 0.2.0 started".into(),
            at_ms: 3_500,
        });
        let s = step(&mut r, &seen, 4_000);
        assert!(s.changed);
        assert_eq!(r.members["w-1"].detail, "trial of 0.2.0 started");
        // The binary on trial reports 0.2.0: not yet a pass.
        seen.insert("w-1".into(), at("0.2.0"));
        let s = step(&mut r, &seen, 4_500);
        assert!(s.send.is_empty() && s.finished.is_none());
        assert_eq!(r.members["w-1"].at_version_since_ms, None, "on trial");
        // The switched agent says AgentUpdated.
        seen.insert("w-1".into(), switched("0.2.0", 4_800));
        step(&mut r, &seen, 5_000);
        assert_eq!(r.members["w-1"].at_version_since_ms, Some(5_000));
        let s = step(&mut r, &seen, 9_999);
        assert_eq!(state(&r, "w-1"), MemberState::Sent, "not settled yet");
        assert!(!s.changed);
        // The canary passes, and the same pass starts wave 1, where the
        // offline w-3 is skipped; its members are sent to on the next.
        let s = step(&mut r, &seen, 10_000);
        assert_eq!(state(&r, "w-1"), MemberState::Updated);
        assert_eq!(r.row.wave, 1);
        assert_eq!(r.row.wave_started_ms, 10_000);
        assert!(s.changed && s.send.is_empty());
        assert_eq!(state(&r, "w-3"), MemberState::Skipped);
        assert_eq!(r.members["w-3"].detail, "offline when wave 1 started");
        assert_eq!(r.waves[1].workers, ["w-2"]);
        assert_eq!(r.waves[1].skipped, ["w-3"]);
        let s = step(&mut r, &seen, 11_000);
        assert_eq!(s.send, ["w-2"]);
        sent(&mut r, &s.send, 11_000);
        seen.insert("w-2".into(), switched("0.2.0", 11_500));
        step(&mut r, &seen, 12_000);
        assert!(step(&mut r, &seen, 16_999).finished.is_none());
        let s = step(&mut r, &seen, 17_000);
        assert_eq!(s.finished, Some(SUCCEEDED), "w-2 passed: the last wave");
        assert_eq!(r.row.state, SUCCEEDED);
        assert_eq!(r.counts()["updated"], 2);
        assert_eq!(r.counts()["skipped"], 1);
    }

    #[test]
    fn a_refusal_a_rollback_or_a_timeout_reverts() {
        let targets = [
            target("w-1", true, "x86_64", "0.1.0"),
            target("w-2", true, "x86_64", "0.1.0"),
        ];
        let seen = |note: Option<AgentNote>, failure: Option<AgentNote>| -> HashMap<_, _> {
            let mut w1 = at("0.1.0");
            w1.reply = note;
            w1.failure = failure;
            [("w-1".to_string(), w1), ("w-2".to_string(), at("0.1.0"))].into()
        };
        let note = |version: &str, ok: bool, detail: &str, at_ms| AgentNote {
            version: version.into(),
            ok,
            detail: detail.into(),
            at_ms,
        };

        // An error reply.
        let mut r = rollout(&targets, AgentPolicy::default());
        let s = step(&mut r, &seen(None, None), 2_000);
        sent(&mut r, &s.send, 2_000);
        // A reply from before the command, or about another version, is ignored.
        let old = Some(note("0.2.0", false, "bad signature", 1_999));
        assert!(step(&mut r, &seen(old, None), 2_500).finished.is_none());
        let other = Some(note("0.1.5", false, "bad signature", 2_100));
        assert!(step(&mut r, &seen(other, None), 2_500).finished.is_none());
        let bad = Some(note("0.2.0", false, "bad signature", 2_100));
        let s = step(&mut r, &seen(bad, None), 3_000);
        assert_eq!(s.finished, Some(REVERTED));
        assert_eq!(
            r.row.reason,
            "wave 0 failed: w-1: 0.2.0 refused: bad signature"
        );
        assert_eq!(state(&r, "w-1"), MemberState::Failed);
        assert_eq!(
            state(&r, "w-2"),
            MemberState::Skipped,
            "wave 1 never started"
        );

        // A rollback event after an Ok reply.
        let mut r = rollout(&targets, AgentPolicy::default());
        let s = step(&mut r, &seen(None, None), 2_000);
        sent(&mut r, &s.send, 2_000);
        let ok = Some(note("0.2.0", true, "trial of 0.2.0 started", 2_100));
        let rolled = Some(note(
            "0.2.0",
            false,
            "0.2.0: rolled back: exited with exit status: 3 during the trial",
            9_000,
        ));
        let s = step(&mut r, &seen(ok, rolled), 9_500);
        assert_eq!(s.finished, Some(REVERTED));
        assert_eq!(
            r.row.reason,
            "wave 0 failed: w-1: 0.2.0: rolled back: exited with exit status: 3 during the trial"
        );

        // Silence until the timeout.
        let policy = AgentPolicy {
            trial_s: 5,
            settle_s: 1,
            ..AgentPolicy::default()
        };
        let mut r = rollout(&targets, policy);
        let s = step(&mut r, &seen(None, None), 2_000);
        sent(&mut r, &s.send, 2_000);
        let limit = 1_000 + r.policy.timeout_ms();
        assert!(step(&mut r, &seen(None, None), limit - 1)
            .finished
            .is_none());
        let s = step(&mut r, &seen(None, None), limit);
        assert_eq!(s.finished, Some(REVERTED));
        assert!(
            r.row
                .reason
                .starts_with("wave 0 did not pass within 66 s: w-1 reports 0.1.0"),
            "{}",
            r.row.reason
        );
    }

    #[test]
    fn a_member_sent_before_a_conductor_restart_passes_on_its_version() {
        let policy = AgentPolicy {
            settle_s: 1,
            ..AgentPolicy::default()
        };
        let mut r = rollout(&[target("w-1", true, "x86_64", "0.1.0")], policy);
        let seen: HashMap<String, Observed> = [("w-1".to_string(), at("0.1.0"))].into();
        let s = step(&mut r, &seen, 2_000);
        sent(&mut r, &s.send, 2_000);
        let trial: HashMap<String, Observed> = [("w-1".to_string(), at("0.2.0"))].into();
        step(&mut r, &trial, 2_500);
        assert_eq!(r.members["w-1"].at_version_since_ms, None, "on trial");
        // This run started after the command: the AgentUpdated event may
        // have gone to the previous one.
        let restarted = Observed {
            noting_since_ms: 3_000,
            ..at("0.2.0")
        };
        let seen: HashMap<String, Observed> = [("w-1".to_string(), restarted)].into();
        step(&mut r, &seen, 4_000);
        assert_eq!(r.members["w-1"].at_version_since_ms, Some(4_000));
        step(&mut r, &seen, 5_000);
        assert_eq!(state(&r, "w-1"), MemberState::Updated);
    }

    #[test]
    fn going_back_to_the_old_version_restarts_the_settle_time() {
        let mut r = rollout(
            &[target("w-1", true, "x86_64", "0.1.0")],
            AgentPolicy {
                settle_s: 10,
                ..AgentPolicy::default()
            },
        );
        let mut seen: HashMap<String, Observed> = [("w-1".to_string(), at("0.1.0"))].into();
        let s = step(&mut r, &seen, 2_000);
        sent(&mut r, &s.send, 2_000);
        seen.insert("w-1".into(), switched("0.2.0", 2_500));
        step(&mut r, &seen, 3_000);
        seen.insert("w-1".into(), at("0.1.0"));
        assert!(step(&mut r, &seen, 4_000).changed, "since forgotten");
        assert_eq!(r.members["w-1"].at_version_since_ms, None);
        seen.insert("w-1".into(), switched("0.2.0", 2_500));
        step(&mut r, &seen, 5_000);
        step(&mut r, &seen, 14_999);
        assert_eq!(state(&r, "w-1"), MemberState::Sent);
        step(&mut r, &seen, 15_000);
        assert_eq!(state(&r, "w-1"), MemberState::Updated);
    }

    #[test]
    fn the_command_carries_the_release() {
        let rel = AgentReleaseRow {
            version: "0.2.0".into(),
            arch: "aarch64".into(),
            sha256: "ab".repeat(32),
            size: 1234,
            signature: "cd".repeat(64),
            created_ms: 0,
        };
        let policy = AgentPolicy {
            trial_s: 30,
            allow_downgrade: true,
            ..AgentPolicy::default()
        };
        match update_action(&rel, &policy).unwrap() {
            Action::UpdateAgent(u) => {
                assert_eq!(u.version.as_str(), "0.2.0");
                assert_eq!(u.arch.as_str(), "aarch64");
                assert_eq!(u.sha256, [0xab; 32]);
                assert_eq!(u.size, 1234);
                assert_eq!(u.signature.as_slice(), [0xcd; 64]);
                assert!(u.allow_downgrade);
                assert_eq!(u.trial_s, 30);
            }
            other => panic!("{other:?}"),
        }
        let broken = AgentReleaseRow {
            signature: "cd".repeat(63),
            ..rel
        };
        assert!(update_action(&broken, &policy).is_err());
    }

    #[test]
    fn a_row_round_trips_its_json_columns() {
        let mut r = rollout(
            &[target("w-1", true, "x86_64", "0.1.0")],
            AgentPolicy::default(),
        );
        r.selector.insert("site".into(), "shop".into());
        r.sync();
        let back = AgentRollout::from_row(r.row.clone());
        assert_eq!(back, r);
        let v = r.to_json();
        assert_eq!(v["members"][0]["worker_id"], "w-1");
        assert_eq!(v["members"][0]["state"], "pending");
        assert_eq!(v["policy"]["trial_s"], 60);
        assert_eq!(v["selector"]["site"], "shop");
        assert_eq!(v["counts"]["pending"], 1);
    }
}
