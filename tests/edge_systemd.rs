//! The edge daemon as systemd sees it, through the real binary with a real mosquitto and a
//! real GStreamer pipeline: READY=1, the watchdog, a drain that follows the model's time
//! (EXTEND_TIMEOUT_USEC, STOPPING=1, exit 0), the last will after SIGKILL, a read-only
//! and a read-only `validate`.

mod common;

use common::{bin, finish, free_port, kill, s, wait_for, Broker};
use fhecam::edge::infer::{drain_extension, frame_estimate, ASSUMED_PBS_S};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const LIVE: &str = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=32,height=32,framerate=5/1 ! videoconvert ! appsink";
/// Keep-alive of the daemon's MQTT session in these tests: the last will comes quickly.
const KEEP_ALIVE_S: u64 = 5;

type Timed = Arc<Mutex<Vec<(Instant, String, Vec<u8>)>>>;

/// Subscribes to `topic` and records every message with its arrival time.
fn subscribe(port: u16, id: &str, topic: &str) -> Timed {
    let (client, mut conn) = Client::new(MqttOptions::new(id, "127.0.0.1", port), 16);
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let msgs: Timed = Arc::default();
    let m = msgs.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _client = client; // the connection ends with the test process
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    m.lock()
                        .unwrap()
                        .push((Instant::now(), p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    msgs
}

/// The owner side, once for all tests: the tiniest trained model, protected and deployed.
struct Shared {
    bundle: PathBuf,
    owner_pub: PathBuf,
}

fn owner() -> &'static Shared {
    static OWNER: OnceLock<Shared> = OnceLock::new();
    OWNER.get_or_init(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        let o = common::owner(dir.path());
        Shared {
            owner_pub: o.dir.join("keys/owner.pub"),
            bundle: o.bundle,
        }
    })
}

/// An edge config in `dir` for camera `cam` on the broker at `port`.
fn config(dir: &Path, cam: &str, port: u16, outbox: &Path, extra: &str) -> PathBuf {
    let o = owner();
    let p = dir.join(format!("{cam}.toml"));
    std::fs::write(
        &p,
        format!(
            "device_id = \"dev1\"\ncamera_id = \"{cam}\"\nbundle = \"{}\"\nowner_key = \"{}\"\n\
             [source]\npipeline = \"{LIVE}\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive_s = {KEEP_ALIVE_S}\nstats_interval_s = 1.0\n\
             reconnect_backoff_initial_s = 0.2\nreconnect_backoff_max_s = 1.0\n\
             [outbox]\ndir = \"{}\"\n{extra}",
            s(&o.bundle),
            s(&o.owner_pub),
            s(outbox)
        ),
    )
    .unwrap();
    p
}

type Datagrams = Arc<Mutex<Vec<(Instant, String)>>>;

fn notified(d: &Datagrams, what: &str) -> Vec<(Instant, String)> {
    d.lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l.starts_with(what)))
        .cloned()
        .collect()
}

#[test]
fn ready_watchdog_drain_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker) = Broker::on_free_port(dir.path());
    // a 1 s floor: only the model-based deadline keeps the running frame from being abandoned
    let cfg = config(
        dir.path(),
        "notify",
        port,
        &dir.path().join("outbox"),
        "[infer]\ndrain_timeout_s = 1.0\n",
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let got: Datagrams = Arc::default();
    {
        let got = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    got.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
    }
    // as systemd does: WATCHDOG_PID is the daemon's own pid, known here through exec
    let watchdog = Duration::from_secs(2);
    let child = Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"",
            env!("CARGO_BIN_EXE_fhecam"),
            s(&cfg),
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    wait_for("READY=1", Duration::from_secs(180), || {
        !notified(&got, "READY=1").is_empty()
    });
    // fed at half the period: at least 3 within 4 periods, however noisy the machine
    let t = Instant::now();
    wait_for("3 WATCHDOG=1", watchdog * 4, || {
        notified(&got, "WATCHDOG=1")
            .iter()
            .filter(|(at, _)| *at >= t)
            .count()
            >= 3
    });

    std::thread::sleep(Duration::from_secs(2)); // a frame is in inference now
    kill(&child, "-TERM");
    let out = finish(child, Duration::from_secs(240));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(notified(&got, "STOPPING=1").len(), 1);
    // the running frame outlived the 1 s floor: the deadline followed the model and systemd
    // was told to wait longer
    let extend = notified(&got, "EXTEND_TIMEOUT_USEC=");
    assert!(!extend.is_empty(), "{err}");
    let usec: u64 = extend[0]
        .1
        .trim()
        .split('=')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(usec > 31_000_000, "{usec}");
    assert!(err.contains("draining:"), "{err}");
    assert!(!err.contains("abandoned"), "{err}");
    let stats: fhecam::edge::stats::Snapshot =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert!(stats.inferences >= 1, "{stats:?}");
    assert_eq!(stats.published, stats.inferences, "{stats:?}");
}

#[test]
fn sigkill_leaves_the_last_will_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker) = Broker::on_free_port(dir.path());
    let msgs = subscribe(port, "will-sub", "fhecam/dev1/will/availability");
    let cfg = config(dir.path(), "will", port, &dir.path().join("outbox"), "");
    let child = bin()
        .args(["run", "--config", s(&cfg)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let last = |m: &Timed| m.lock().unwrap().last().map(|(_, _, p)| p.clone());
    wait_for("online", Duration::from_secs(180), || {
        last(&msgs).as_deref() == Some(b"online")
    });
    let mut child = child;
    kill(&child, "-KILL");
    let killed = Instant::now();
    child.wait().unwrap();
    let limit = Duration::from_secs_f64(KEEP_ALIVE_S as f64 * 1.5) + Duration::from_secs(3);
    wait_for("the last will", limit, || {
        last(&msgs).as_deref() == Some(b"offline")
    });
    eprintln!("last will after {:?}", killed.elapsed());
}

#[test]
fn validate_creates_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listing = |d: &Path| {
        let mut v: Vec<_> = walk(d);
        v.sort();
        v
    };
    let validate = |outbox: &Path| {
        let cfg = config(dir.path(), "v", port, outbox, "");
        let before = listing(dir.path());
        let out = bin()
            .args(["validate", "--config", s(&cfg)])
            .output()
            .unwrap();
        assert_eq!(listing(dir.path()), before, "validate wrote something");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    // missing: the nearest existing parent is checked, nothing is created
    let missing = dir.path().join("state/outbox");
    let (good, text) = validate(&missing);
    assert!(good, "{text}");
    assert!(text.contains("will create it in"), "{text}");
    assert!(!dir.path().join("state").exists());
    // present and writable
    std::fs::create_dir(dir.path().join("ob")).unwrap();
    let (good, text) = validate(&dir.path().join("ob"));
    assert!(
        good && text.contains("exists, writable directory"),
        "{text}"
    );
    // /proc: root's access(2) says yes, but it is no place for files; nor is `/`
    let (good, text) = validate(Path::new("/proc/self"));
    assert!(!good && text.contains("system directory /proc"), "{text}");
    let (good, text) = validate(Path::new("/"));
    assert!(
        !good && text.contains("outbox.dir / is the system directory"),
        "{text}"
    );
    // a file, and a write-protected directory (root would still pass access(2))
    std::fs::write(dir.path().join("afile"), b"").unwrap();
    let (good, text) = validate(&dir.path().join("afile"));
    assert!(!good && text.contains("not a directory"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let (good, text) = validate(&ro.join("outbox"));
    assert!(!good && text.contains("not"), "{text}");
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        }
        v.push(p);
    }
    v
}

#[test]
fn the_drain_deadline_follows_the_frame_time() {
    let s = Duration::from_secs;
    // before any frame finished: planned PBS at the assumed rate over the FHE threads
    let e = frame_estimate(None, 1000, 2, 1);
    assert_eq!(e, Duration::from_secs_f64(1000.0 * ASSUMED_PBS_S / 2.0));
    assert_eq!(frame_estimate(Some(s(200)), 1000, 2, 1), s(200));
    // the remaining time of the longest-running estimate, × 1.25; none in flight: nothing
    assert_eq!(drain_extension(s(200), &[s(40), s(120)]), s(200));
    assert_eq!(drain_extension(s(200), &[s(250)]), s(0));
    assert_eq!(drain_extension(s(200), &[]), s(0));
}
