//! Helpers shared by the integration tests: the real binary, a real mosquitto on a free
//! loopback port, an MQTT subscriber that records what it sees, and a tiny protected model.
#![allow(dead_code)]

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PASS: &str = "integration test passphrase";

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhecam"));
    c.env("FHECAM_OWNER_PASSPHRASE", PASS);
    c
}

/// Runs the binary with `pass` as the owner's passphrase (`None`: unset) and echoes what it
/// printed, so a failing test shows every command before it.
pub fn run(args: &[&str], pass: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhecam"));
    c.args(args).env("RUST_LOG", "warn");
    match pass {
        Some(p) => c.env("FHECAM_OWNER_PASSPHRASE", p),
        None => c.env_remove("FHECAM_OWNER_PASSPHRASE"),
    };
    let out = c.output().expect("run fhecam");
    eprintln!(
        "$ fhecam {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the binary and returns its stdout; panics with its stderr on failure.
pub fn ok(args: &[&str]) -> String {
    let out = run(args, Some(PASS));
    assert!(
        out.status.success(),
        "fhecam {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A command that must fail cleanly (exit code 1, no panic); returns its stderr.
pub fn refused_with(args: &[&str], pass: Option<&str>) -> String {
    let out = run(args, pass);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "fhecam {args:?} should have failed");
    assert_eq!(out.status.code(), Some(1), "exit code of {args:?}");
    assert!(!err.contains("panicked"), "panic on {args:?}: {err}");
    err
}

/// [`refused_with`] the usual passphrase.
pub fn refused(args: &[&str]) -> String {
    refused_with(args, Some(PASS))
}

/// `fhecam deploy` of model `id` in `db`, signed with `key`, written to `out`.
pub fn deploy_out(db: &Path, id: &str, key: &Path, out: &Path) -> String {
    ok(&[
        "deploy",
        "--db",
        s(db),
        "--model",
        id,
        "--signing-key",
        s(key),
        "--out",
        s(out),
    ])
}

/// A small digits CNN (ternary weights: fewer carry PBS, so encrypted runs stay short)
/// trained for a few epochs, and the test split.
pub fn tiny_trained(
    conv_channels: usize,
    epochs: usize,
) -> (fhecam::model::Model, fhecam::data::Dataset) {
    use fhecam::data::{load_digits, stratified_split};
    let ds = load_digits().unwrap_or_else(|e| panic!("{e}"));
    let (tr, te) = stratified_split(&ds, 0.25, 42);
    let cfg = fhecam::train::TrainConfig {
        conv_channels,
        epochs,
        weight_levels: [-1, 1],
        ..Default::default()
    };
    let r = fhecam::train::train(&cfg, &tr, &te, &|_, _| {}).expect("training");
    eprintln!(
        "tiny model: integer accuracy {:.3}",
        r.scores.accuracy_plain
    );
    (r.model, te)
}

pub fn free_port() -> u16 {
    fhecam::broker::free_port().unwrap()
}

/// A child process killed on drop.
pub struct Killed(pub Child);

impl Killed {
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.pid()]).status();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mosquitto broker with persistence in `dir`, unlimited queues (a backlog must wait at
/// the broker, not be dropped), killed on drop. `user root`: started as root, mosquitto
/// would otherwise switch to its own user and fail to save sessions in a root-owned `dir`.
pub struct Broker {
    inner: fhecam::broker::LocalBroker,
    pub port: u16,
}

impl Broker {
    /// A broker on a free port, and the port.
    pub fn on_free_port(dir: &Path) -> (u16, Broker) {
        let port = free_port();
        (port, Broker::start(dir, port))
    }

    pub fn start(dir: &Path, port: u16) -> Broker {
        let conf = format!(
            "allow_anonymous true\nuser root\npersistence true\n\
             persistence_location {}/\nmax_queued_messages 0\n\
             log_dest file {}/mosquitto-{port}.log\n",
            dir.display(),
            dir.display()
        );
        let inner = fhecam::broker::LocalBroker::start(dir, port, &conf).unwrap();
        Broker { inner, port }
    }

    /// SIGTERM: mosquitto saves its sessions and exits.
    pub fn stop(self) {
        self.inner.stop();
    }
}

pub type Messages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Subscribes to `filters` (QoS 1) on a persistent session and records every message.
/// The agent's surroundings on a broker: a cockpit recording results and dead letters, and
/// a client publishing as the cameras, both named after `tag`.
pub fn cockpit_and_cameras(port: u16, tag: &str) -> (Messages, Publisher) {
    let cockpit = subscribe(
        port,
        &format!("cockpit-{tag}"),
        &["cockpit/#", "backend/deadletter"],
    );
    (cockpit, Publisher::new(port, &format!("cameras-{tag}")))
}

/// A broker on a free port in `dir` with the agent's surroundings on it
/// ([`cockpit_and_cameras`]): `(port, broker, cockpit, cameras)`.
pub fn agent_site(dir: &Path, tag: &str) -> (u16, Broker, Messages, Publisher) {
    let (port, broker) = Broker::on_free_port(dir);
    let (cockpit, cams) = cockpit_and_cameras(port, tag);
    (port, broker, cockpit, cams)
}

pub fn subscribe(port: u16, id: &str, filters: &[&str]) -> Messages {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    // what is published while we reconnect is kept for us
    o.set_clean_session(false);
    let (client, mut conn) = Client::new(o, 64);
    let msgs: Messages = Arc::default();
    let m = msgs.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
    std::thread::spawn(move || {
        let mut acks = 0;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(a))) if !a.session_present => {
                    for f in &filters {
                        let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    acks += 1;
                    if acks == filters.len() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    m.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
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

/// The JSON messages on topics starting with `prefix`.
pub fn on(msgs: &Messages, prefix: &str) -> Vec<serde_json::Value> {
    msgs.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.starts_with(prefix))
        .map(|(_, p)| serde_json::from_slice(p).unwrap())
        .collect()
}

pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An MQTT client that publishes (QoS 1) from a background thread.
pub struct Publisher {
    pub client: Client,
}

impl Publisher {
    pub fn new(port: u16, id: &str) -> Publisher {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_clean_session(false);
        let (client, mut conn) = Client::new(o, 256);
        std::thread::spawn(move || {
            for ev in conn.iter() {
                if ev.is_err() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Publisher { client }
    }

    pub fn send(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .unwrap();
    }
}

/// How many cockpit results each (device, camera, epoch, sequence) got.
pub fn result_counts(results: &[serde_json::Value]) -> HashMap<(String, String, u64, u64), usize> {
    let mut m = HashMap::new();
    for r in results {
        let k = (
            r["device_id"].as_str().unwrap().to_string(),
            r["camera_id"].as_str().unwrap().to_string(),
            r["epoch"].as_u64().unwrap(),
            r["sequence"].as_u64().unwrap(),
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// The owner side, once: a tiny trained model, protected and deployed, and one real
/// encrypted inference of it to reuse as the ciphertext of many envelopes.
pub struct Owner {
    pub dir: PathBuf,
    pub db: PathBuf,
    pub id: String,
    pub bundle: PathBuf,
    pub header: fhecam::bundle::BundleHeader,
    pub ciphertext: Vec<u8>,
    pub label: usize,
    pub model: fhecam::model::Model,
}

pub fn owner(dir: &Path) -> Owner {
    let (model, te) = tiny_trained(1, 5);
    let model_path = dir.join("tiny.json");
    std::fs::write(&model_path, serde_json::to_string(&model).unwrap()).unwrap();
    ok(&["owner-key", "init", "--out", s(&dir.join("keys"))]);
    let db = dir.join("owner.db");
    let id = ok(&["protect", s(&model_path), "--db", s(&db), "--name", "tiny"]);
    let id = id.trim().lines().last().unwrap().to_string();
    let bundle_path = dir.join("m.bundle");
    deploy_out(&db, &id, &dir.join("keys/owner.key"), &bundle_path);
    let key = fhecam::bundle::read_owner_key(&dir.join("keys/owner.pub")).unwrap();
    let b = fhecam::bundle::load_file(&bundle_path, &key).unwrap();
    let rt = fhecam::fhe::EdgeRuntime::new(&b.model, b.public, 0).unwrap();
    let x = model.input.quantize(&te.images[0]);
    let label = fhecam::reference::argmax(&fhecam::reference::evaluate(&model, &x).unwrap());
    let (out, _) = rt.infer(&rt.encrypt(&x)).unwrap();
    Owner {
        dir: dir.into(),
        db,
        id,
        bundle: bundle_path,
        header: b.header.clone(),
        ciphertext: out.to_bytes().unwrap(),
        label,
        model,
    }
}

impl Owner {
    /// An envelope of this model's inference as camera `device`/`camera` would send it.
    pub fn envelope(&self, device: &str, camera: &str, epoch: u64, seq: u64) -> Vec<u8> {
        fhecam::wire::envelope::encode(&fhecam::wire::envelope::Envelope {
            device_id: device.into(),
            camera_id: camera.into(),
            model_id: self.header.model_id,
            model_version: self.header.version,
            sequence: seq,
            epoch,
            frame_timestamp_ms: 1_700_000_000_000 + seq,
            ciphertext: self.ciphertext.clone(),
        })
        .unwrap()
    }

    /// A backend.toml for an agent on `port`; `extra` is appended verbatim (TOML).
    /// [`Owner::agent_config`], and the agent started on it.
    pub fn start_agent(
        &self,
        name: &str,
        port: u16,
        mqtt_extra: &str,
        extra: &str,
    ) -> (PathBuf, Agent) {
        let cfg = self.agent_config(name, port, mqtt_extra, extra);
        let agent = spawn_agent(&cfg, &[]);
        (cfg, agent)
    }

    pub fn agent_config(&self, name: &str, port: u16, mqtt_extra: &str, extra: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "db = \"{}\"\nstate_db = \"{}\"\n{extra}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n{mqtt_extra}\n",
                s(&self.db),
                s(&self.dir.join(format!("{name}-state.db"))),
            ),
        )
        .unwrap();
        p
    }
}

/// A running `fhecam agent` and its log file.
pub struct Agent {
    pub proc: Killed,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `fhecam agent --config cfg`, logs to a file beside the config.
pub fn spawn_agent(cfg: &Path, envs: &[(&str, &str)]) -> Agent {
    let log = cfg.with_extension("log");
    let mut c = bin();
    c.args(["agent", "--config", s(cfg)])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in envs {
        c.env(k, v);
    }
    Agent {
        proc: Killed(c.spawn().unwrap()),
        log,
    }
}

/// SIGTERM, then the agent's closing stats line; asserts it exits 0 within `limit`.
pub fn stop_agent(mut a: Agent, limit: Duration) -> serde_json::Value {
    a.proc.signal("-TERM");
    let t = Instant::now();
    loop {
        if let Some(st) = a.proc.0.try_wait().unwrap() {
            assert!(st.success(), "agent exit status {st}\n{}", a.log_text());
            break;
        }
        assert!(
            t.elapsed() < limit,
            "agent did not exit within {limit:?} of SIGTERM\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    use std::io::Read;
    a.proc
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    serde_json::from_str(out.trim().lines().last().unwrap_or("null")).unwrap()
}

/// Sends `signal` (`-TERM`, `-HUP`...) to a child that must still be there to take it.
pub fn kill(child: &Child, signal: &str) {
    assert!(Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits for a daemon to exit (killed after `limit`); prints its stderr for the test log.
pub fn finish(mut child: Child, limit: Duration) -> std::process::Output {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("daemon did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "--- daemon stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `fhecam run --config config` (RUST_LOG=info), logging to a file beside the config.
pub fn daemon(config: &Path) -> (Child, PathBuf) {
    let log = config.with_extension("log");
    let child = bin()
        .args(["run", "--config", s(config)])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

/// What a daemon (or any process) logged to `p` so far.
pub fn log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// SIGTERM to a daemon still running; it must exit 0 within 300 s. Its closing counters.
pub fn stop_daemon(mut child: Child, log_path: &Path) -> fhecam::edge::stats::Snapshot {
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited by itself\n{}",
        log(log_path)
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "daemon did not stop\n{}",
            log(log_path)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", log(log_path));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET path` from the HTTP server at `addr` (`host:port`): the status line and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

/// tests/fixtures/onnx/`name`.
pub fn onnx_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// `fhecam import` of the fixture `model`.onnx, calibrated on calib_x.npy, into
/// `dir/<model>.json`: the run's output.
pub fn import_fixture(dir: &Path, model: &str) -> Output {
    let out = dir.join(format!("{model}.json"));
    run(
        &[
            "import",
            &onnx_fixture(&format!("{model}.onnx")),
            "--calibration",
            &onnx_fixture("calib_x.npy"),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    )
}
