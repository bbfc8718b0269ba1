//! The container images and compose files, end to end: builds the static
//! musl binaries (profile `image-test`) and both `FROM scratch` images from
//! `images/`, brings up `compose/conductor.yml` and two `compose/worker.yml`
//! projects (two "Pis" on one host), and watches the fleet through the HTTP
//! API from the host: both workers enrol and report the host's metrics, a
//! stopped worker goes offline, the conductor keeps its store across a
//! restart, and `down -v` leaves nothing behind (also on failure: the
//! projects and images are removed by drop guards).
//!
//! Nothing is pulled: the images are `FROM scratch`. The Docker engine must
//! be local (the test reaches published ports on 127.0.0.1 and compares
//! host files with what the containerised worker reports). Where no engine
//! answers, the test prints `skipped: <reason>` and passes, unless
//! `AEREKOS_REQUIRE_DOCKER=1` (set by CI) makes that a failure.
//!
//! Needs the musl target and a musl C compiler for SQLite:
//! `rustup target add x86_64-unknown-linux-musl` and
//! `apt-get install musl-tools` (`.ci/run` installs both).
//!
//! `pi_worker_images_run_from_compose_on_their_own_arch` is the "docker
//! compose on a Pi" path on the Pi's architecture: the edge-worker image for
//! linux/arm64, linux/arm/v7 and linux/arm/v6 (classic builder, one
//! `--platform` at a time), each run by `compose/worker.yml` under qemu-user
//! through binfmt_misc against a local conductor. The aarch64 agent is built
//! when missing; a 32-bit platform is skipped, saying so, until
//! `deploy/build-pi.sh` has built its agent, unless `AEREKOS_REQUIRE_ARM32=1`
//! (the rule of `tests/tests/qemu.rs`).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::docker::{
    docker, docker_compose_or_skip, fleet_ca_pem, must, platform, repo, run, static_bins,
    ComposeProject, HostApi,
};
use e2e::{free_port, http, static_test_service_bin, wait_for};
use serde_json::{json, Value};

const ADMIN_PASSWORD: &str = "compose-admin-password-Jw3";
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// An image this test built, removed (with any container still using it)
/// on drop.
struct OwnedImage {
    tag: String,
}

impl OwnedImage {
    /// The test service in an image FROM scratch.
    fn test_service(suffix: &str) -> OwnedImage {
        let tag = format!("aerekos-test-svc:{suffix}");
        let ctx = tempfile::tempdir().unwrap();
        fs::copy(static_test_service_bin(), ctx.path().join("test-service")).unwrap();
        fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY test-service /test-service\nENTRYPOINT [\"/test-service\"]\n",
        )
        .unwrap();
        must(
            docker().args(["build", "-q", "-t", &tag]).arg(ctx.path()),
            SECS(120),
        );
        OwnedImage { tag }
    }
}

impl Drop for OwnedImage {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("ancestor={}", self.tag)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

/// Locally built images, removed on drop.
struct Images {
    conductor: String,
    worker: String,
}

impl Images {
    fn build(bin_dir: &Path, platform: &str, suffix: &str) -> Images {
        let ctx = tempfile::tempdir().unwrap();
        must(
            Command::new("sh")
                .arg(repo().join("images/stage.sh"))
                .arg(ctx.path())
                .arg(platform)
                .arg(bin_dir),
            SECS(60),
        );
        let images = Images {
            conductor: format!("aerekos-test-conductor:{suffix}"),
            worker: format!("aerekos-test-edge-worker:{suffix}"),
        };
        for (file, tag) in [
            ("conductor.Dockerfile", &images.conductor),
            ("edge-worker.Dockerfile", &images.worker),
        ] {
            // --no-cache: the classic builder's cache ignores the platform,
            // and edge-worker.Dockerfile's first layer (`state/`) is the same
            // for every platform (images/README.md, 3a).
            must(
                docker()
                    .args(["build", "-q", "--no-cache", "-f"])
                    .arg(repo().join("images").join(file))
                    .args(["--build-arg", &format!("BIN_DIR={platform}"), "-t", tag])
                    .arg(ctx.path()),
                SECS(300),
            );
        }
        images
    }

    /// `docker image inspect` of one image.
    fn inspect(tag: &str) -> Value {
        let out = must(docker().args(["image", "inspect", tag]), SECS(30));
        serde_json::from_str::<Value>(&out).unwrap()[0].clone()
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = run(
            docker().args(["rmi", "-f", &self.conductor, &self.worker]),
            SECS(60),
        );
    }
}

/// The conductor's API once it answers, logged in as admin.
fn login(url: String, ca_pem: &str) -> HostApi {
    let mut api = HostApi::new(url, ca_pem);
    wait_for("the conductor's API", SECS(60), || {
        api.healthy().then_some(())
    });
    api.login(ADMIN_PASSWORD);
    api
}

/// `PRETTY_NAME` of the host's os-release, if any.
fn host_os() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    let v = text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME="))?;
    Some(v.trim().trim_matches('"').to_string())
}

/// Host memory in bytes from /proc/meminfo.
fn host_memory() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Host network interfaces other than `lo`.
fn host_interfaces() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default()
}

/// Processes on the host: numeric entries of /proc.
fn host_processes() -> usize {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .count()
}

#[test]
fn conductor_and_two_workers_from_compose_files() {
    let started = Instant::now();
    let Some(cli) = docker_compose_or_skip() else {
        return;
    };
    let Some((triple, platform)) = platform() else {
        println!("skipped: no musl target for {}", std::env::consts::ARCH);
        return;
    };

    let bin_dir = static_bins(triple);
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let suffix = format!(
        "{}-{}",
        std::process::id(),
        stamp.as_millis() % 1_000_000_000
    );
    let images = Images::build(&bin_dir, platform, &suffix);
    eprintln!("images built at {:?}", started.elapsed());

    // The images: unprivileged, the conductor's ports and volume declared.
    let ci = Images::inspect(&images.conductor);
    assert_eq!(ci["Config"]["User"], "65532:65532", "{ci}");
    assert_eq!(ci["Os"], "linux");
    for port in ["3000/tcp", "8883/tcp", "1883/tcp"] {
        assert!(ci["Config"]["ExposedPorts"][port].is_object(), "{ci}");
    }
    assert!(ci["Config"]["Volumes"]["/data"].is_object(), "{ci}");
    let wi = Images::inspect(&images.worker);
    assert_eq!(wi["Config"]["User"], "65532:65532", "{wi}");
    assert!(
        wi["Config"]["Volumes"]["/var/lib/aerekos"].is_object(),
        "{wi}"
    );

    // The conductor on random loopback ports; workers get the MQTT port
    // through AEREKOS_MQTT_PUBLIC_URL, as the .env.example describes.
    let dir = tempfile::tempdir().unwrap();
    let (http_port, mqtt_port, mqtts_port) = (free_port(), free_port(), free_port());
    let mut conductor = ComposeProject::new(
        &cli,
        &format!("aerekos-test-{suffix}-c"),
        "conductor.yml",
        &[
            ("AEREKOS_CONDUCTOR_IMAGE", images.conductor.clone()),
            ("AEREKOS_ADMIN_PASSWORD", ADMIN_PASSWORD.into()),
            ("AEREKOS_HTTP_PORT", format!("127.0.0.1:{http_port}")),
            ("AEREKOS_MQTT_PORT", format!("127.0.0.1:{mqtt_port}")),
            ("AEREKOS_MQTTS_PORT", format!("127.0.0.1:{mqtts_port}")),
            (
                "AEREKOS_MQTT_PUBLIC_URL",
                format!("mqtts://127.0.0.1:{mqtts_port}"),
            ),
            ("AEREKOS_TLS_SAN", "127.0.0.1".into()),
        ],
        dir.path(),
    );
    conductor.run(&["up", "-d"]);
    // From the host, the conductor in its container is another host: plain
    // HTTP is refused, HTTPS verifies against the fleet CA from the volume.
    let ca_pem = fleet_ca_pem(&conductor.container("conductor"), dir.path());
    let (status, body) = e2e::read(
        http()
            .get(format!("http://127.0.0.1:{http_port}/api/v1/health"))
            .call(),
    );
    assert_eq!(status, 403, "plain HTTP from outside the container: {body}");
    let api = login(format!("https://127.0.0.1:{http_port}"), &ca_pem);
    let (status, body) = api.call("POST", "/api/v1/registration-token/rotate", None);
    assert_eq!(status, 200, "rotate: {body}");
    let token = body["token"].as_str().unwrap().to_string();

    // The engine socket's group, so the unprivileged worker can host containers.
    let docker_gid = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata("/var/run/docker.sock").map_or(0, |m| m.gid())
    };

    // Two "Pis", each its own worker.yml project, on the host network.
    let machine = |n: u32| format!("compose-{suffix}-{n}");
    let worker_env = |n: u32| {
        vec![
            ("AEREKOS_WORKER_IMAGE", images.worker.clone()),
            ("AEREKOS_CONDUCTOR", format!("http://127.0.0.1:{http_port}")),
            ("AEREKOS_REGISTRATION_TOKEN", token.clone()),
            ("AEREKOS_INTERVAL", "1s".into()),
            ("AEREKOS_BATCH", "1s".into()),
            ("AEREKOS_HOSTNAME", format!("pi-{n}")),
            ("AEREKOS_MACHINE_ID", machine(n)),
            ("AEREKOS_LABELS", format!("via=compose,n={n}")),
            ("AEREKOS_DOCKER_GID", docker_gid.to_string()),
        ]
    };
    let mut w1 = ComposeProject::new(
        &cli,
        &format!("aerekos-test-{suffix}-w1"),
        "worker.yml",
        &worker_env(1),
        dir.path(),
    );
    let mut w2 = ComposeProject::new(
        &cli,
        &format!("aerekos-test-{suffix}-w2"),
        "worker.yml",
        &worker_env(2),
        dir.path(),
    );
    w1.run(&["up", "-d"]);
    w2.run(&["up", "-d"]);

    // Both enrol and report.
    let ids: Vec<String> = wait_for("both workers online with metrics", SECS(90), || {
        let list = api.workers();
        let ids: Vec<String> = ["pi-1", "pi-2"]
            .iter()
            .filter_map(|h| {
                let w = list.iter().find(|w| w["hostname"] == *h)?;
                let id = w["id"].as_str()?.to_string();
                let d = api.worker(&id);
                (d["status"] == "online" && !d["metrics"].is_null()).then_some(id)
            })
            .collect();
        (ids.len() == 2).then_some(ids)
    });
    eprintln!("both workers online at {:?}", started.elapsed());
    let (id1, id2) = (ids[0].clone(), ids[1].clone());
    assert_ne!(id1, id2);

    // What a containerised worker reports is the host's.
    let d = api.worker(&id1);
    let (inv, m) = (&d["inventory"], &d["metrics"]["metrics"]);
    assert_eq!(d["machine_id"], machine(1).as_str(), "{d}");
    assert_eq!(d["labels"]["via"], "compose", "{d}");
    assert_eq!(inv["memory_total"].as_u64(), Some(host_memory()), "{inv}");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(inv["boot_id"], boot_id.trim(), "{inv}");
    if let Some(os) = host_os() {
        // Mounted from the host: the image itself has no os-release.
        assert_eq!(inv["os"], os.as_str(), "{inv}");
    }
    // AEREKOS_HOST_ROOT=/host: the model comes from the host's /sys (its
    // device tree on a Pi, DMI here), past the masks Docker lays over the
    // container's own /sys/firmware.
    let model = fs::read_to_string("/sys/firmware/devicetree/base/model")
        .or_else(|_| fs::read_to_string("/sys/class/dmi/id/product_name"))
        .unwrap_or_default();
    let model = model.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    if !model.is_empty() {
        assert_eq!(inv["device_model"], model, "{inv}");
    }
    // pid: host — a container of its own would count 1 or 2 processes.
    let procs = m["processes"].as_u64().unwrap();
    assert!(
        procs > 5 && usize::try_from(procs).unwrap() >= host_processes() / 2,
        "processes {procs} vs host {}",
        host_processes()
    );
    // network_mode: host — the reported interfaces are the host's, among them
    // the bridge of the conductor's compose network.
    let host_ifs = host_interfaces();
    let nets: Vec<&str> = m["net"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(!nets.is_empty(), "{m}");
    let net_id = must(
        docker().args([
            "network",
            "inspect",
            "-f",
            "{{.Id}}",
            &format!("{}_default", conductor.name),
        ]),
        SECS(30),
    );
    let bridge = format!("br-{}", &net_id.trim()[..12]);
    if host_ifs.len() <= protocol::frame::MAX_NETS {
        assert!(nets.contains(&bridge.as_str()), "{bridge} not in {nets:?}");
    }
    let foreign: Vec<&&str> = nets
        .iter()
        .filter(|n| !host_ifs.iter().any(|h| h == *n))
        .collect();
    assert!(foreign.len() < nets.len(), "{nets:?} vs host {host_ifs:?}");
    // /:/host:ro — the host's filesystems, when its root is real storage.
    let disks = m["disks"].as_array().unwrap();
    let root_fs = fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(1) == Some(&"/")).then(|| f.get(2).unwrap_or(&"").to_string())
        })
        .next_back()
        .unwrap_or_default();
    if ["ext4", "xfs", "btrfs", "f2fs", "ext3", "ext2"].contains(&root_fs.as_str()) {
        assert!(
            disks
                .iter()
                .any(|d| d["mount"].as_str().unwrap().starts_with("/host")),
            "{disks:?}"
        );
    }

    // The containerised worker hosts a container service through the
    // mounted engine socket: an image FROM scratch with the static test service.
    let svc = OwnedImage::test_service(&suffix);
    let (status, body) = api.call(
        "POST",
        "/api/v1/services",
        Some(
            &json!({"name": "ctr-on-pi", "kind": "container", "image": svc.tag,
                     "args": ["--port", "0", "--tag", "compose"], "restart": "always"}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.call(
        "PUT",
        "/api/v1/services/ctr-on-pi/deployment",
        Some(&json!({"workers": [id1]})),
    );
    assert_eq!(status, 200, "{body}");
    let actual_state = |api: &HostApi| -> Option<String> {
        let (_, v) = api.call("GET", &format!("/api/v1/workers/{id1}/services"), None);
        v["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "ctr-on-pi")?["actual"]["state"]
            .as_str()
            .map(str::to_string)
    };
    let ours = || {
        must(
            docker().args([
                "ps",
                "-q",
                "--filter",
                "label=io.aerekos.service=ctr-on-pi",
                "--filter",
                &format!("label=io.aerekos.worker={id1}"),
            ]),
            SECS(30),
        )
    };
    wait_for("container service running on pi-1", SECS(90), || {
        (actual_state(&api).as_deref() == Some("running")).then_some(())
    });
    assert_eq!(ours().lines().count(), 1, "one labelled container runs");
    let (status, body) = api.call("DELETE", "/api/v1/services/ctr-on-pi/deployment", None);
    assert!(status == 200 || status == 204, "{status} {body}");
    wait_for("container service removed", SECS(60), || {
        ours().trim().is_empty().then_some(())
    });
    drop(svc);
    eprintln!(
        "container service deployed and removed at {:?}",
        started.elapsed()
    );

    // A stopped worker goes offline (clean shutdown: retained `offline`);
    // the other keeps reporting.
    w2.run(&["stop", "-t", "10"]);
    wait_for("pi-2 offline", SECS(30), || {
        (api.worker(&id2)["status"] == "offline").then_some(())
    });
    assert_eq!(api.worker(&id1)["status"], "online");
    eprintln!("pi-2 offline at {:?}", started.elapsed());

    // The store lives in the volume: a restarted conductor (read-only root,
    // uid 65532) still knows both workers, and pi-1 reconnects and reports.
    conductor.run(&["restart", "-t", "10"]);
    let api = login(format!("https://127.0.0.1:{http_port}"), &ca_pem);
    let known: Vec<String> = api
        .workers()
        .iter()
        .filter_map(|w| w["id"].as_str().map(str::to_string))
        .collect();
    assert!(known.contains(&id1) && known.contains(&id2), "{known:?}");
    let seq = |api: &HostApi| api.worker(&id1)["metrics"]["seq"].as_u64().unwrap_or(0);
    let before = seq(&api);
    wait_for("pi-1 reporting after the restart", SECS(60), || {
        let d = api.worker(&id1);
        (d["status"] == "online" && seq(&api) > before).then_some(())
    });
    assert_eq!(api.worker(&id2)["status"], "offline");

    // Teardown leaves no container or volume behind.
    w1.down();
    w2.down();
    conductor.down();
    drop(images);
    eprintln!("done in {:?}", started.elapsed());
}

/// One Pi platform of the edge-worker image: where its agent comes from and
/// what the image and the running agent must say.
struct PiPlatform {
    /// Docker platform: `--platform`, the staged directory and `BIN_DIR`.
    platform: &'static str,
    /// `deploy/build-pi.sh`'s name for it.
    name: &'static str,
    /// Rust target triple.
    triple: &'static str,
    /// ELF machine of the agent (`EM_AARCH64`, `EM_ARM`).
    machine: u16,
    /// `docker image inspect`: `Architecture` and `Variant`.
    architecture: &'static str,
    variant: Option<&'static str>,
    /// The CPU qemu emulates in the container (`QEMU_CPU`, which qemu-user
    /// reads from the environment it runs in); `None`: qemu's default.
    qemu_cpu: Option<&'static str>,
    /// What the agent reports as `inventory.arch`.
    arch: &'static str,
}

const EM_AARCH64: u16 = 183;
const EM_ARM: u16 = 40;

/// The three Pi platforms, as `tests/tests/qemu.rs` emulates them.
static PI_PLATFORMS: [PiPlatform; 3] = [
    PiPlatform {
        platform: "linux/arm64",
        name: "aarch64",
        triple: e2e::PI_TARGET,
        machine: EM_AARCH64,
        architecture: "arm64",
        variant: None,
        qemu_cpu: None,
        arch: "aarch64",
    },
    // Pi 2 (Cortex-A7); also a Pi 3/4 on a 32-bit OS.
    PiPlatform {
        platform: "linux/arm/v7",
        name: "armv7",
        triple: "armv7-unknown-linux-musleabihf",
        machine: EM_ARM,
        architecture: "arm",
        variant: Some("v7"),
        qemu_cpu: Some("cortex-a7"),
        arch: "armv7l",
    },
    // Pi 1, Zero, Zero W (ARM1176JZF-S). qemu-arm's default CPU is an ARMv7
    // one and its `uname -m` says armv7l, so without QEMU_CPU the armv6
    // agent would (rightly) report armv7l.
    PiPlatform {
        platform: "linux/arm/v6",
        name: "armv6",
        triple: "arm-unknown-linux-musleabihf",
        machine: EM_ARM,
        architecture: "arm",
        variant: Some("v6"),
        qemu_cpu: Some("arm1176"),
        arch: "armv6l",
    },
];

/// The release agent for `pi`, or `None` (the platform is skipped, saying
/// why) when a 32-bit agent is not built, unless `AEREKOS_REQUIRE_ARM32=1`;
/// the rule of `tests/tests/qemu.rs`. The aarch64 agent is built when
/// missing ([`e2e::pi_worker_bin`]); a 32-bit one older than its sources is
/// rebuilt with `deploy/build-pi.sh`.
fn pi_agent(pi: &PiPlatform) -> Option<PathBuf> {
    if pi.machine == EM_AARCH64 {
        return Some(e2e::pi_worker_bin().to_path_buf());
    }
    let bin = e2e::target_dir()
        .join(pi.triple)
        .join("release")
        .join("edge-worker");
    let build = format!("sh deploy/build-pi.sh {} -p edge-worker", pi.name);
    if !bin.is_file() {
        assert!(
            std::env::var("AEREKOS_REQUIRE_ARM32").as_deref() != Ok("1"),
            "AEREKOS_REQUIRE_ARM32=1 but {} is not built: {build}",
            bin.display()
        );
        println!(
            "skipped {}: the {} agent is not built ({} missing); build it with `{build}` \
             (AEREKOS_REQUIRE_ARM32=1 makes this a failure)",
            pi.platform,
            pi.name,
            bin.display()
        );
        return None;
    }
    let sources = [
        "protocol/src",
        "protocol/Cargo.toml",
        "edge-worker/src",
        "edge-worker/Cargo.toml",
        "Cargo.lock",
    ];
    let newest = sources
        .iter()
        .map(|p| e2e::newest_mtime(&repo().join(p)))
        .max()
        .unwrap_or(UNIX_EPOCH);
    let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_none_or(|t| t < newest) {
        eprintln!("{} is stale: rebuilding it ({build})", bin.display());
        let mut cmd = Command::new("sh");
        cmd.arg(repo().join("deploy/build-pi.sh"))
            .args([pi.name, "-p", "edge-worker", "--target-dir"])
            .arg(e2e::target_dir())
            .current_dir(repo());
        // cargo hands .cargo/config.toml's [env] (CC_<target> = "clang") to
        // the test; inherited, it would win over Zig's compiler and build
        // ring's C for ARMv7 (`bfi`): the armv6 agent then dies of SIGILL on
        // an ARM1176 at its first key exchange.
        for (k, _) in std::env::vars() {
            if k.starts_with("CC_") || k.starts_with("CFLAGS_") {
                cmd.env_remove(k);
            }
        }
        must(&mut cmd, SECS(40 * 60));
    }
    Some(bin)
}

/// One platform under test: its compose project (taken down first on drop)
/// and its image.
struct PiRun {
    pi: &'static PiPlatform,
    hostname: String,
    machine_id: String,
    project: ComposeProject,
    image: OwnedImage,
}

/// The "docker compose on a Pi" path on the Pi's own architecture: for each
/// of linux/arm64, linux/arm/v7 and linux/arm/v6 whose agent is built, the
/// classic builder builds `images/edge-worker.Dockerfile` for that platform
/// from a context laid out by `images/stage.sh`, and `compose/worker.yml`
/// runs it through qemu-user (binfmt_misc) against a local conductor: the
/// agent enrols, reports metrics and names its own arch. The three projects
/// run at once.
#[test]
fn pi_worker_images_run_from_compose_on_their_own_arch() {
    let started = Instant::now();
    let Some(cli) = docker_compose_or_skip() else {
        return;
    };
    let pis: Vec<(&'static PiPlatform, PathBuf)> = PI_PLATFORMS
        .iter()
        .filter_map(|pi| Some((pi, pi_agent(pi)?)))
        .collect();
    for (pi, bin) in &pis {
        assert_eq!(
            e2e::elf_machine(bin),
            Some(pi.machine),
            "{} is not a {} ELF executable",
            bin.display(),
            pi.name
        );
        let registered = if pi.machine == EM_AARCH64 {
            e2e::ensure_binfmt_aarch64()
        } else {
            e2e::ensure_binfmt_arm()
        };
        registered.unwrap_or_else(|e| {
            panic!(
                "Docker runs {} images through binfmt_misc: {e}",
                pi.platform
            )
        });
    }
    eprintln!("agents ready at {:?}", started.elapsed());

    // One context for all platforms, as buildx would use it.
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let suffix = format!(
        "{}-{}",
        std::process::id(),
        stamp.as_millis() % 1_000_000_000
    );
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("context");
    for (pi, bin) in &pis {
        must(
            Command::new("sh")
                .arg(repo().join("images/stage.sh"))
                .arg(&ctx)
                .arg(pi.platform)
                .arg(bin.parent().unwrap()),
            SECS(60),
        );
    }

    let c = e2e::Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let docker_gid = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata("/var/run/docker.sock").map_or(0, |m| m.gid())
    };

    let mut runs = Vec::new();
    for (pi, _) in &pis {
        // The classic builder, one platform at a time. --no-cache: its layer
        // cache ignores --platform, so a cached layer of another platform
        // (the `state/` layer is the same for all) would come back with that
        // platform's Architecture.
        let image = OwnedImage {
            tag: format!("aerekos-test-edge-worker:{suffix}-{}", pi.name),
        };
        must(
            docker()
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "-q", "--no-cache", "--platform", pi.platform])
                .arg("-f")
                .arg(repo().join("images/edge-worker.Dockerfile"))
                .args(["--build-arg", &format!("BIN_DIR={}", pi.platform)])
                .args(["-t", &image.tag])
                .arg(&ctx),
            SECS(300),
        );
        let wi = Images::inspect(&image.tag);
        assert_eq!(wi["Os"], "linux", "{wi}");
        assert_eq!(wi["Architecture"], pi.architecture, "{}: {wi}", pi.platform);
        // The classic builder records the variant it was given (v7, v6) and
        // none for arm64; buildx may record v8 there.
        let variant = wi["Variant"].as_str().filter(|v| !v.is_empty());
        match pi.variant {
            Some(v) => assert_eq!(variant, Some(v), "{}: {wi}", pi.platform),
            None => assert!(matches!(variant, None | Some("v8")), "{wi}"),
        }
        assert_eq!(wi["Config"]["User"], "65532:65532", "{wi}");
        // `docker run --platform` of the image runs the agent under qemu.
        let mut run_it = docker();
        run_it.args(["run", "--rm", "--platform", pi.platform]);
        if let Some(cpu) = pi.qemu_cpu {
            run_it.args(["-e", &format!("QEMU_CPU={cpu}")]);
        }
        let version = must(run_it.args([&image.tag, "--version"]), SECS(60));
        assert!(version.contains("edge-worker"), "{version}");

        let hostname = format!("pi-{}", pi.name);
        let machine_id = format!("compose-{suffix}-{}", pi.name);
        let mut project = ComposeProject::new(
            &cli,
            &format!("aerekos-test-{suffix}-{}", pi.name),
            "worker.yml",
            &[
                ("AEREKOS_WORKER_IMAGE", image.tag.clone()),
                ("AEREKOS_CONDUCTOR", c.url()),
                ("AEREKOS_REGISTRATION_TOKEN", token.clone()),
                ("AEREKOS_INTERVAL", "1s".into()),
                ("AEREKOS_BATCH", "1s".into()),
                ("AEREKOS_HOSTNAME", hostname.clone()),
                ("AEREKOS_MACHINE_ID", machine_id.clone()),
                (
                    "AEREKOS_LABELS",
                    format!("via=compose,board=qemu-{}", pi.name),
                ),
                ("AEREKOS_DOCKER_GID", docker_gid.to_string()),
            ],
            dir.path(),
        );
        // The emulated CPU is the test's: worker.yml itself is unchanged.
        if let Some(cpu) = pi.qemu_cpu {
            let file = dir.path().join(format!("{}.override.yml", pi.name));
            fs::write(
                &file,
                format!("services:\n  edge-worker:\n    environment:\n      QEMU_CPU: {cpu}\n"),
            )
            .unwrap();
            project = project.with_override(file);
        }
        runs.push(PiRun {
            pi,
            hostname,
            machine_id,
            project,
            image,
        });
    }
    eprintln!("{} images built at {:?}", runs.len(), started.elapsed());

    std::thread::scope(|s| {
        for r in &runs {
            s.spawn(move || r.project.run(&["up", "-d"]));
        }
    });

    // All enrol and report, each from its own arch.
    let ids: Vec<String> = wait_for(
        "every emulated worker online with metrics",
        SECS(180),
        || {
            let list = c.workers();
            runs.iter()
                .map(|r| {
                    let w = list.iter().find(|w| w["hostname"] == *r.hostname)?;
                    let id = w["id"].as_str()?.to_string();
                    let d = c.worker(&id);
                    (d["status"] == "online" && !d["metrics"].is_null()).then_some(id)
                })
                .collect::<Option<Vec<String>>>()
        },
    );
    eprintln!("{} workers online at {:?}", ids.len(), started.elapsed());
    let memory = host_memory();
    for (r, id) in runs.iter().zip(&ids) {
        let d = c.worker(id);
        let inv = &d["inventory"];
        assert_eq!(inv["arch"], r.pi.arch, "{}: {d}", r.pi.platform);
        assert_eq!(d["machine_id"], r.machine_id.as_str(), "{d}");
        assert_eq!(d["labels"]["board"], format!("qemu-{}", r.pi.name), "{d}");
        // The compose file's host view holds under emulation too.
        assert_eq!(inv["memory_total"].as_u64(), Some(memory), "{inv}");
        if let Some(os) = host_os() {
            assert_eq!(inv["os"], os.as_str(), "{inv}");
        }
        let procs = d["metrics"]["metrics"]["processes"].as_u64().unwrap_or(0);
        assert!(procs > 5, "pid: host, but {procs} processes: {d}");
        // Its container runs the image built for its platform.
        let ps = must(&mut r.project.cmd(&["ps", "-q", "edge-worker"]), SECS(30));
        let image = must(
            docker().args(["inspect", "-f", "{{.Config.Image}}", ps.trim()]),
            SECS(30),
        );
        assert_eq!(image.trim(), r.image.tag);
    }
    // They keep reporting.
    let seq = |id: &str| c.worker(id)["metrics"]["seq"].as_u64().unwrap_or(0);
    let first: Vec<u64> = ids.iter().map(|id| seq(id)).collect();
    wait_for("every worker's next samples", SECS(60), || {
        ids.iter()
            .zip(&first)
            .all(|(id, f)| seq(id) >= f + 2)
            .then_some(())
    });

    // `down -v` leaves no container or volume; the images go with the guards.
    std::thread::scope(|s| {
        for r in &mut runs {
            s.spawn(move || r.project.down());
        }
    });
    let tags: Vec<String> = runs.iter().map(|r| r.image.tag.clone()).collect();
    drop(runs);
    for tag in &tags {
        let left = run(docker().args(["image", "inspect", tag]), SECS(30)).unwrap();
        assert!(!left.ok, "{tag} left behind");
    }
    eprintln!("done in {:?}", started.elapsed());
}
