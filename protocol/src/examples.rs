//! Example frames: the ones shown in `protocol/README.md`, pinned by the
//! golden tests, and the largest frames the bounded types allow (used to
//! prove [`crate::MAX_FRAME_LEN`] holds).

use heapless::Vec;

use crate::frame::*;

fn push_all<T, const N: usize>(items: impl IntoIterator<Item = T>) -> Vec<T, N> {
    let mut v = Vec::new();
    for item in items {
        if v.push(item).is_err() {
            break;
        }
    }
    v
}

/// A typical Pi 4 metrics sample.
pub fn metrics() -> Metrics {
    Metrics {
        cpu_total: 1250,
        cpu_per_core: push_all([1000, 1500, 900, 1600]),
        load: [42, 35, 30],
        memory_used: 812_000_000,
        memory_available: 3_100_000_000,
        memory_total: 3_981_000_000,
        swap_used: 0,
        swap_total: 104_853_504,
        disks: push_all([Disk {
            mount: bounded("/"),
            used: 5_900_000_000,
            total: 29_800_000_000,
        }]),
        net: push_all([NetRate {
            name: bounded("eth0"),
            rx_bps: 1_520,
            tx_bps: 880,
        }]),
        temperatures: push_all([Temperature {
            name: bounded("cpu-thermal"),
            millicelsius: 47_236,
        }]),
        uptime_s: 86_400,
        processes: 142,
        dropped: 0,
    }
}

/// A typical Pi 4 birth frame.
pub fn birth() -> Birth {
    Birth {
        hostname: bounded("pi-shop-1"),
        os: bounded("Debian GNU/Linux 12 (bookworm)"),
        kernel: bounded("6.6.31+rpt-rpi-v8"),
        arch: bounded("aarch64"),
        cpu_model: bounded("Cortex-A72"),
        cores: 4,
        memory_total: 3_981_000_000,
        disks: push_all([Disk {
            mount: bounded("/"),
            used: 5_900_000_000,
            total: 29_800_000_000,
        }]),
        device_model: bounded("Raspberry Pi 4 Model B Rev 1.4"),
        agent_version: bounded("0.1.0"),
        boot_id: bounded("5f1c0b9e-8d2a-4c1e-9f3b-2a7d6e4c8b10"),
        labels: push_all([Label {
            key: bounded("site"),
            value: bounded("shop"),
        }]),
        interval_ms: 10_000,
    }
}

/// A Pi Zero W that was under-volted since boot and is throttled now
/// (`get_throttled` = `0x50005`).
pub fn board() -> Board {
    Board {
        throttled: Some(0x50005),
        revision: Some(0x9000c1),
        serial: bounded("00000000a1b2c3d4"),
        sd: Some(SdCard {
            name: bounded("SC16G"),
            serial: bounded("0x8a3d2f11"),
            date: bounded("03/2021"),
            manfid: 3,
        }),
    }
}

/// The worker id of the examples.
pub const WORKER_ID: &str = "w-0123456789ab";

/// Wraps `body` in a format-1 envelope from worker [`WORKER_ID`].
pub fn envelope(seq: u64, body: Body) -> Envelope {
    Envelope {
        version: crate::FORMAT_VERSION,
        worker_id: bounded(WORKER_ID),
        seq,
        sent_at_ms: 1_764_201_600_000,
        body,
    }
}

/// The secret used by the examples: bytes 0x00..=0x1f.
pub fn secret() -> crate::Secret {
    let mut key = [0u8; 32];
    for (i, b) in (0u8..).zip(key.iter_mut()) {
        *b = i;
    }
    crate::Secret::from_bytes(key)
}

fn full<const N: usize>(c: char) -> heapless::String<N> {
    let mut s = heapless::String::new();
    // Multi-byte chars make the UTF-8 (and so the frame) as large as possible.
    while s.push(c).is_ok() {}
    s
}

/// Every list full, every string at capacity with 1-byte chars, every integer at its
/// maximum varint width: the largest metrics frame the types can express.
pub fn largest_metrics() -> Metrics {
    Metrics {
        cpu_total: u16::MAX,
        cpu_per_core: push_all(core::iter::repeat_n(u16::MAX, MAX_CORES)),
        load: [u32::MAX; 3],
        memory_used: u64::MAX,
        memory_available: u64::MAX,
        memory_total: u64::MAX,
        swap_used: u64::MAX,
        swap_total: u64::MAX,
        disks: push_all(core::iter::repeat_n(
            Disk {
                mount: full('x'),
                used: u64::MAX,
                total: u64::MAX,
            },
            MAX_DISKS,
        )),
        net: push_all(core::iter::repeat_n(
            NetRate {
                name: full('x'),
                rx_bps: u64::MAX,
                tx_bps: u64::MAX,
            },
            MAX_NETS,
        )),
        temperatures: push_all(core::iter::repeat_n(
            Temperature {
                name: full('x'),
                millicelsius: i32::MIN,
            },
            MAX_TEMPS,
        )),
        uptime_s: u64::MAX,
        processes: u32::MAX,
        dropped: u32::MAX,
    }
}

/// The largest board frame the types can express.
pub fn largest_board() -> Board {
    let full = || bounded(&"x".repeat(32));
    Board {
        throttled: Some(u32::MAX),
        revision: Some(u32::MAX),
        serial: full(),
        sd: Some(SdCard {
            name: full(),
            serial: full(),
            date: full(),
            manfid: u16::MAX,
        }),
    }
}

/// The largest birth frame the types can express.
pub fn largest_birth() -> Birth {
    Birth {
        hostname: full('x'),
        os: full('x'),
        kernel: full('x'),
        arch: full('x'),
        cpu_model: full('x'),
        cores: u16::MAX,
        memory_total: u64::MAX,
        disks: largest_metrics().disks,
        device_model: full('x'),
        agent_version: full('x'),
        boot_id: full('x'),
        labels: push_all(core::iter::repeat_n(
            Label {
                key: full('x'),
                value: full('x'),
            },
            MAX_LABELS,
        )),
        interval_ms: u32::MAX,
    }
}

/// The largest envelope around `body`.
pub fn largest_envelope(body: Body) -> Envelope {
    Envelope {
        version: crate::FORMAT_VERSION,
        worker_id: full('w'),
        seq: u64::MAX,
        sent_at_ms: u64::MAX,
        body,
    }
}

/// A process service: a command already on the device.
pub fn service_spec() -> ServiceSpec {
    ServiceSpec {
        name: bounded("sensor-relay"),
        version: 3,
        command: bounded("/usr/local/bin/sensor-relay"),
        args: push_all([bounded("--port"), bounded("8080")]),
        env: push_all([EnvVar {
            name: bounded("RUST_LOG"),
            value: bounded("info"),
        }]),
        working_dir: bounded(""),
        restart: RestartPolicy::OnFailure,
        max_restarts: 5,
        restart_window_s: 60,
        backoff_ms: 1000,
    }
}

/// The status a worker reports for [`service_spec`] once it runs.
pub fn service_status() -> ServiceStatus {
    ServiceStatus {
        name: bounded("sensor-relay"),
        version: 3,
        state: ServiceState::Running,
        pid: 4242,
        restarts: 0,
        exit_code: None,
        detail: bounded(""),
    }
}

/// The largest service spec the types can express.
pub fn largest_service_spec() -> ServiceSpec {
    ServiceSpec {
        name: full('x'),
        version: u32::MAX,
        command: full('x'),
        args: push_all(core::iter::repeat_n(full('x'), MAX_ARGS)),
        env: push_all(core::iter::repeat_n(
            EnvVar {
                name: full('x'),
                value: full('x'),
            },
            MAX_ENV,
        )),
        working_dir: full('x'),
        restart: RestartPolicy::Never,
        max_restarts: u16::MAX,
        restart_window_s: u32::MAX,
        backoff_ms: u32::MAX,
    }
}

/// A manifest: an artifact process service with an HTTP health check.
pub fn manifest() -> crate::Manifest {
    use crate::manifest::*;
    crate::Manifest {
        name: "sensor-relay".into(),
        version: 4,
        runtime: Runtime::Process(ProcessRuntime {
            program: Program::Artifacts(vec![ArtifactRef {
                arch: "aarch64".into(),
                sha256: [0xab; 32],
                size: 1_048_576,
            }]),
            args: vec!["--port".into(), "8080".into()],
            env: [("RUST_LOG".to_string(), "info".to_string())].into(),
            working_dir: String::new(),
        }),
        restart: RestartPolicy::OnFailure,
        max_restarts: 5,
        restart_window_s: 60,
        backoff_ms: 1000,
        health: Some(HealthCheck {
            probe: Probe::Http {
                port: 8080,
                path: "/healthz".into(),
            },
            interval_ms: 2000,
            timeout_ms: 1000,
            retries: 3,
            start_period_ms: 5000,
        }),
        limits: Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(500),
            pids: None,
        },
        config: [("site".to_string(), "shop".to_string())].into(),
        secrets: [("api_key".to_string(), "s3cr3t".to_string())].into(),
    }
}

/// The command that deploys [`manifest`].
pub fn manifest_ref() -> ManifestRef {
    ManifestRef {
        name: bounded("sensor-relay"),
        version: 4,
        digest: [0x5a; 32],
    }
}

/// A log chunk answering a `Logs` command.
pub fn log_chunk() -> LogChunk {
    LogChunk {
        cmd_id: 5,
        name: bounded("sensor-relay"),
        index: 0,
        data: push_all(b"listening on :8080\n".iter().copied()),
        last: true,
    }
}

/// Metrics a service published.
pub fn service_metrics() -> ServiceMetrics {
    ServiceMetrics {
        name: bounded("sensor-relay"),
        samples: push_all([
            Sample {
                key: bounded("readings"),
                value: 1200,
            },
            Sample {
                key: bounded("queue_depth"),
                value: -1,
            },
        ]),
    }
}

/// A Pi 4 batch of three samples 10 s apart: [`metrics`], then two deltas
/// (CPU, memory, disk, network, temperature and uptime moved).
pub fn metrics_batch() -> crate::MetricsBatch {
    let first = metrics();
    let mut second = first.clone();
    second.cpu_total = 1410;
    second.cpu_per_core = push_all([1200, 1500, 1000, 1900]);
    second.memory_used += 4096;
    second.memory_available -= 4096;
    second.disks[0].used += 12_288;
    second.net[0].rx_bps = 1_600;
    second.temperatures[0].millicelsius = 47_723;
    second.uptime_s += 10;
    let mut third = second.clone();
    third.cpu_total = 1180;
    third.load = [41, 35, 30];
    third.uptime_s += 10;
    third.processes = 143;
    let mut w = crate::batch::BatchWriter::new();
    for m in [&first, &second, &third] {
        // Three small samples fit (tested in `batch`).
        let _ = w.push(m);
    }
    w.finish(10_000, 300_000, 250)
}

/// The largest batch frame the limits allow: the stream full of bytes
/// (the limits test does not decode it).
pub fn largest_metrics_batch() -> crate::MetricsBatch {
    crate::MetricsBatch {
        interval_ms: u32::MAX,
        period_ms: u32::MAX,
        age_ms: u32::MAX,
        count: u16::MAX,
        samples: push_all(core::iter::repeat_n(0xff, crate::batch::MAX_BATCH_BYTES)),
    }
}
