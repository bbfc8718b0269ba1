//! The MQTT topic tree.
//!
//! ```text
//! aerekos/v1/<worker_id>/status        retained text "online" | "offline" (LWT)
//! aerekos/v1/<worker_id>/birth         retained Birth frame (postcard)
//! aerekos/v1/<worker_id>/metrics       Metrics and MetricsBatch frames
//! aerekos/v1/<worker_id>/events        Event frames
//! aerekos/v1/<worker_id>/cmd           Command frames, conductor -> worker, QoS 1
//! aerekos/v1/<worker_id>/cmd/stored    Stored acknowledgements (Command frames), conductor -> worker, QoS 0
//! aerekos/v1/<worker_id>/reply         Reply frames, worker -> conductor
//! aerekos/v1/<worker_id>/services      ServiceStatus frames, worker -> conductor
//! aerekos/v1/<worker_id>/logs          LogChunk frames, worker -> conductor (answers Logs)
//! aerekos/v1/<worker_id>/service-metrics  ServiceMetrics frames, worker -> conductor
//! aerekos/v1/<worker_id>/board         retained Board frame (a Raspberry Pi's identity and health), worker -> conductor
//! aerekos/v1/<worker_id>/json/birth    retained JSON mirror in plain units (written by the conductor)
//! aerekos/v1/<worker_id>/json/metrics  retained JSON mirror in plain units (written by the conductor)
//! aerekos/v1/<worker_id>/json/board    retained JSON mirror of a Pi's board (written by the conductor)
//! ```
//!
//! Worker ids are restricted to `[a-z0-9-]` so they can never contain MQTT
//! wildcards or separators.
//!
//! On a NATS cluster with several active conductors (`conductor nats-auth
//! --partitions N`), the servers move every worker-published frame topic
//! ([`TopicKind::partitioned`]: all but `status`) into a partitioned tree;
//! agents publish as above and never see it:
//!
//! ```text
//! aerekos/v1/part/<n>/<worker_id>/<leaf>  the frame of aerekos/v1/<worker_id>/<leaf>, n = partition_of(worker_id, N)
//! ```
//!
//! Limits: `<n>` is decimal without leading zeros, below
//! [`crate::partition::MAX_PARTITIONS`] ([`crate::partition::partition_of`]);
//! `part` is not a worker id a conductor issues (`w-` + 12 hex digits), and
//! [`Topic::parse`] reads `aerekos/v1/part/<n>/…` as nothing (it has too
//! many levels for any leaf), so the two trees never overlap.

/// Root of every aerekos topic; the `v1` segment versions the tree itself.
pub const ROOT: &str = "aerekos/v1";

/// The single filter the conductor subscribes to for everything workers send.
/// One filter (rather than one per kind) keeps a worker's frames in publish
/// order on brokers that order per subscription.
pub const CONDUCTOR_FILTER: &str = "aerekos/v1/+/+";

/// Every worker's JSON mirror topics (`json/birth`, `json/metrics`, `json/board`).
pub const MIRROR_FILTER: &str = "aerekos/v1/+/json/+";

/// Root of the partitioned tree ([`partitioned_topic`]).
pub const PARTITION_ROOT: &str = "aerekos/v1/part";

/// Payload of the retained `status` topic while the worker is connected.
pub const STATUS_ONLINE: &str = "online";
/// Payload of the `status` last-will (and of a clean shutdown).
pub const STATUS_OFFLINE: &str = "offline";

/// The kinds of leaf topic under a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Retained plain text, `online` / `offline`.
    Status,
    /// Retained inventory frame.
    Birth,
    /// Periodic metrics frames.
    Metrics,
    /// Worker events.
    Events,
    /// Conductor → worker commands.
    Cmd,
    /// Worker → conductor command replies.
    Reply,
    /// Conductor-written JSON mirror of the birth frame.
    JsonBirth,
    /// Conductor-written JSON mirror of the latest metrics frame.
    JsonMetrics,
    /// Worker → conductor service status frames.
    Services,
    /// Worker → conductor service log chunks.
    Logs,
    /// Worker → conductor metrics published by hosted services.
    ServiceMetrics,
    /// Conductor → worker `Action::Stored` acknowledgements. Two levels
    /// deep like the JSON mirror, so outside [`CONDUCTOR_FILTER`]: the
    /// conductor's own acknowledgements do not come back to it, and agents
    /// that predate them (not subscribed) never see one.
    Stored,
    /// Retained Raspberry Pi board frame (identity, throttling flags).
    Board,
    /// Conductor-written JSON mirror of the board frame.
    JsonBoard,
}

/// Who may publish on a topic kind: the broker's authorisation rules
/// ([`worker_may_publish`], [`worker_may_subscribe`]) are derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Publisher {
    /// The worker the topic belongs to (and nobody else).
    Worker,
    /// The conductor only.
    Conductor,
}

impl TopicKind {
    /// Every kind, in declaration order (tests keep documented tables in step with it).
    pub const ALL: [TopicKind; 14] = [
        TopicKind::Status,
        TopicKind::Birth,
        TopicKind::Metrics,
        TopicKind::Events,
        TopicKind::Cmd,
        TopicKind::Reply,
        TopicKind::JsonBirth,
        TopicKind::JsonMetrics,
        TopicKind::Services,
        TopicKind::Logs,
        TopicKind::ServiceMetrics,
        TopicKind::Stored,
        TopicKind::Board,
        TopicKind::JsonBoard,
    ];

    /// Who publishes on this kind of topic.
    pub fn publisher(self) -> Publisher {
        match self {
            TopicKind::Status
            | TopicKind::Birth
            | TopicKind::Metrics
            | TopicKind::Events
            | TopicKind::Reply
            | TopicKind::Services
            | TopicKind::Logs
            | TopicKind::ServiceMetrics
            | TopicKind::Board => Publisher::Worker,
            TopicKind::Cmd
            | TopicKind::Stored
            | TopicKind::JsonBirth
            | TopicKind::JsonMetrics
            | TopicKind::JsonBoard => Publisher::Conductor,
        }
    }

    /// The leaf path segment(s) for this kind.
    pub fn leaf(self) -> &'static str {
        match self {
            TopicKind::Status => "status",
            TopicKind::Birth => "birth",
            TopicKind::Metrics => "metrics",
            TopicKind::Events => "events",
            TopicKind::Cmd => "cmd",
            TopicKind::Reply => "reply",
            TopicKind::JsonBirth => "json/birth",
            TopicKind::JsonMetrics => "json/metrics",
            TopicKind::Services => "services",
            TopicKind::Logs => "logs",
            TopicKind::ServiceMetrics => "service-metrics",
            TopicKind::Stored => "cmd/stored",
            TopicKind::Board => "board",
            TopicKind::JsonBoard => "json/board",
        }
    }

    /// Whether a NATS fleet with partitions moves this kind into the
    /// partitioned tree ([`partitioned_topic`]): every kind a worker
    /// publishes except [`TopicKind::Status`], which stays where it is (it
    /// is plain text, and Home Assistant reads it as the availability topic
    /// at `aerekos/v1/<id>/status`).
    pub fn partitioned(self) -> bool {
        self.publisher() == Publisher::Worker && self != TopicKind::Status
    }

    /// Which body a frame on this topic must carry (`None` for non-frame topics).
    pub fn expected_body(self) -> Option<crate::BodyKind> {
        use crate::BodyKind as B;
        match self {
            TopicKind::Birth => Some(B::Birth),
            TopicKind::Metrics => Some(B::Metrics),
            TopicKind::Events => Some(B::Event),
            TopicKind::Cmd | TopicKind::Stored => Some(B::Command),
            TopicKind::Reply => Some(B::Reply),
            TopicKind::Services => Some(B::ServiceStatus),
            TopicKind::Logs => Some(B::LogChunk),
            TopicKind::ServiceMetrics => Some(B::ServiceMetrics),
            TopicKind::Board => Some(B::Board),
            TopicKind::Status
            | TopicKind::JsonBirth
            | TopicKind::JsonMetrics
            | TopicKind::JsonBoard => None,
        }
    }

    /// May a frame on this topic carry `body`? The body
    /// [`Self::expected_body`] names, and on the metrics topic a
    /// [`crate::Body::MetricsBatch`] too ([`crate::batch`]).
    pub fn accepts(self, body: crate::BodyKind) -> bool {
        self.expected_body() == Some(body)
            || (self == TopicKind::Metrics && body == crate::BodyKind::MetricsBatch)
    }
}

/// A parsed aerekos topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The worker the topic belongs to.
    pub worker_id: &'a str,
    /// Which leaf.
    pub kind: TopicKind,
}

impl<'a> Topic<'a> {
    /// Parses `aerekos/v1/<id>/<leaf>`; `None` for anything else.
    pub fn parse(topic: &'a str) -> Option<Topic<'a>> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let (worker_id, leaf) = rest.split_once('/')?;
        if !is_valid_worker_id(worker_id) {
            return None;
        }
        let kind = match leaf {
            "status" => TopicKind::Status,
            "birth" => TopicKind::Birth,
            "metrics" => TopicKind::Metrics,
            "events" => TopicKind::Events,
            "cmd" => TopicKind::Cmd,
            "reply" => TopicKind::Reply,
            "json/birth" => TopicKind::JsonBirth,
            "json/metrics" => TopicKind::JsonMetrics,
            "services" => TopicKind::Services,
            "logs" => TopicKind::Logs,
            "service-metrics" => TopicKind::ServiceMetrics,
            "cmd/stored" => TopicKind::Stored,
            "board" => TopicKind::Board,
            "json/board" => TopicKind::JsonBoard,
            _ => return None,
        };
        Some(Topic { worker_id, kind })
    }
}

/// Builds the topic string for `kind` under `worker_id`.
pub fn topic(worker_id: &str, kind: TopicKind) -> String {
    format!("{ROOT}/{worker_id}/{}", kind.leaf())
}

/// `aerekos/v1/part/<partition>/<worker_id>/<leaf>`: where NATS's subject
/// mapping puts the frames a worker publishes on
/// `topic(worker_id, kind)` when [`TopicKind::partitioned`].
pub fn partitioned_topic(partition: u16, worker_id: &str, kind: TopicKind) -> String {
    format!("{PARTITION_ROOT}/{partition}/{worker_id}/{}", kind.leaf())
}

/// `aerekos/v1/part/<partition>/+/+`: the filter a conductor owning
/// `partition` subscribes to (every partitioned kind is one level deep,
/// like [`CONDUCTOR_FILTER`]).
pub fn partition_filter(partition: u16) -> String {
    format!("{PARTITION_ROOT}/{partition}/+/+")
}

/// Parses `aerekos/v1/part/<n>/<id>/<leaf>` into the partition and the
/// topic the worker published on; `None` for anything else: another
/// tree, a partition with leading zeros or not below
/// [`crate::partition::MAX_PARTITIONS`], an invalid id, or a kind that is
/// not [`TopicKind::partitioned`].
pub fn parse_partitioned(topic: &str) -> Option<(u16, Topic<'_>)> {
    let rest = topic.strip_prefix(PARTITION_ROOT)?.strip_prefix('/')?;
    let (n, rest) = rest.split_once('/')?;
    // Decimal as NATS writes it: digits only, no leading zero.
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    let partition: u16 = n.parse().ok()?;
    if partition >= crate::partition::MAX_PARTITIONS {
        return None;
    }
    let (worker_id, leaf) = rest.split_once('/')?;
    if !is_valid_worker_id(worker_id) {
        return None;
    }
    let kind = *TopicKind::ALL
        .iter()
        .find(|k| k.leaf() == leaf && k.partitioned())?;
    Some((partition, Topic { worker_id, kind }))
}

/// Whether worker `worker_id` may publish on `topic`: only its own topics
/// whose [`TopicKind::publisher`] is the worker (never another worker's,
/// never the JSON mirror or commands). The broker refuses anything else.
pub fn worker_may_publish(worker_id: &str, topic: &str) -> bool {
    Topic::parse(topic)
        .is_some_and(|t| t.worker_id == worker_id && t.kind.publisher() == Publisher::Worker)
}

/// The filters worker `worker_id` may subscribe to: exactly its own `cmd`
/// and `cmd/stored` topics (no wildcard: it can read nothing else).
pub fn worker_may_subscribe(worker_id: &str, filter: &str) -> bool {
    Topic::parse(filter).is_some_and(|t| {
        t.worker_id == worker_id && matches!(t.kind, TopicKind::Cmd | TopicKind::Stored)
    })
}

/// Worker ids: 1..=32 chars of `[a-z0-9-]`.
pub fn is_valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::frame::WORKER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for kind in TopicKind::ALL {
            let t = topic("w-0123abcd", kind);
            let parsed = Topic::parse(&t).expect("parses");
            assert_eq!(parsed.kind, kind);
            assert_eq!(parsed.worker_id, "w-0123abcd");
        }
    }

    #[test]
    fn workers_publish_only_their_own_worker_topics_and_read_only_their_commands() {
        let me = "w-000000000001";
        for kind in TopicKind::ALL {
            let mine = topic(me, kind);
            let theirs = topic("w-000000000002", kind);
            let worker_side = kind.publisher() == Publisher::Worker;
            assert_eq!(worker_may_publish(me, &mine), worker_side, "{mine}");
            assert!(!worker_may_publish(me, &theirs), "{theirs}");
            let reads = matches!(kind, TopicKind::Cmd | TopicKind::Stored);
            assert_eq!(worker_may_subscribe(me, &mine), reads, "{mine}");
            assert!(!worker_may_subscribe(me, &theirs), "{theirs}");
        }
        for other in [
            "aerekos/v1/+/cmd",
            "aerekos/v1/w-000000000001/#",
            "aerekos/v1/#",
            "#",
            "aerekos/v1/w-000000000001/json/metrics",
            "aerekos/v1/w-000000000001/metrics/extra",
            "$SYS/#",
            "",
        ] {
            assert!(!worker_may_publish(me, other), "{other}");
            assert!(!worker_may_subscribe(me, other), "{other}");
        }
        assert!(worker_may_publish(me, "aerekos/v1/w-000000000001/status"));
        assert!(!worker_may_publish(me, "aerekos/v1/w-000000000001/cmd"));
        assert!(!worker_may_publish(
            me,
            "aerekos/v1/w-000000000001/cmd/stored"
        ));
    }

    #[test]
    fn the_partitioned_kinds_are_the_worker_published_ones_but_status() {
        let partitioned: Vec<TopicKind> = TopicKind::ALL
            .into_iter()
            .filter(|k| k.partitioned())
            .collect();
        let expected: Vec<TopicKind> = TopicKind::ALL
            .into_iter()
            .filter(|k| k.publisher() == Publisher::Worker && *k != TopicKind::Status)
            .collect();
        assert_eq!(partitioned, expected);
        assert_eq!(
            partitioned,
            [
                TopicKind::Birth,
                TopicKind::Metrics,
                TopicKind::Events,
                TopicKind::Reply,
                TopicKind::Services,
                TopicKind::Logs,
                TopicKind::ServiceMetrics,
                TopicKind::Board,
            ]
        );
        // One level deep: `partition_filter`'s `+/+` matches them all.
        assert!(partitioned.iter().all(|k| !k.leaf().contains('/')));
    }

    #[test]
    fn partitioned_topics_and_filters_are_pinned_and_parse_back() {
        assert_eq!(PARTITION_ROOT, "aerekos/v1/part");
        assert_eq!(
            partitioned_topic(16, "w-1", TopicKind::Metrics),
            "aerekos/v1/part/16/w-1/metrics"
        );
        assert_eq!(
            partitioned_topic(0, "w-0123456789ab", TopicKind::ServiceMetrics),
            "aerekos/v1/part/0/w-0123456789ab/service-metrics"
        );
        assert_eq!(partition_filter(7), "aerekos/v1/part/7/+/+");
        assert_eq!(partition_filter(1023), "aerekos/v1/part/1023/+/+");
        for kind in TopicKind::ALL.into_iter().filter(|k| k.partitioned()) {
            let t = partitioned_topic(43, "alpha", kind);
            assert_eq!(
                parse_partitioned(&t),
                Some((
                    43,
                    Topic {
                        worker_id: "alpha",
                        kind
                    }
                )),
                "{t}"
            );
            // The ordinary parser (the fuzzer's, the frame checks') reads
            // none of the partitioned tree.
            assert!(Topic::parse(&t).is_none(), "{t}");
        }
        for other in [
            "aerekos/v1/part/16/w-1/status",
            "aerekos/v1/part/16/w-1/cmd",
            "aerekos/v1/part/16/w-1/json/metrics",
            "aerekos/v1/part/016/w-1/metrics",
            "aerekos/v1/part/-1/w-1/metrics",
            "aerekos/v1/part/+1/w-1/metrics",
            "aerekos/v1/part/1024/w-1/metrics",
            "aerekos/v1/part/99999/w-1/metrics",
            "aerekos/v1/part//w-1/metrics",
            "aerekos/v1/part/+/w-1/metrics",
            "aerekos/v1/part/16/+/metrics",
            "aerekos/v1/part/16/W-1/metrics",
            "aerekos/v1/part/16/w-1",
            "aerekos/v1/part/16/w-1/metrics/extra",
            "aerekos/v1/w-1/metrics",
            "aerekos/v2/part/16/w-1/metrics",
            "",
        ] {
            assert!(parse_partitioned(other).is_none(), "{other}");
        }
        assert_eq!(
            parse_partitioned("aerekos/v1/part/0/w-1/metrics").map(|(n, _)| n),
            Some(0)
        );
    }

    #[test]
    fn rejects_foreign_and_wildcard_topics() {
        assert!(Topic::parse("aerekos/v2/w1/metrics").is_none());
        assert!(Topic::parse("aerekos/v1/+/metrics").is_none());
        assert!(Topic::parse("aerekos/v1/W1/metrics").is_none());
        assert!(Topic::parse("aerekos/v1/w1/other").is_none());
        assert!(Topic::parse("aerekos/v1/w1").is_none());
        assert!(Topic::parse("").is_none());
    }
}
