//! MQTT over TLS with client certificates against a real mosquitto: a CA, a server
//! certificate and client certificates made with the `openssl` CLI; clients connect through
//! `fhecam::mqtt::tls_transport` (the function the daemon and the agent use), under the
//! shipped config/mosquitto.acl: the agent's shared subscription gets a camera's inference,
//! and a camera publishing as another device is refused. A client that trusts another CA is
//! refused with a certificate error, promptly; `fhecam agent --check` names a missing CA file.
//!
//! The helpers (`Pki`, `Broker::start`) are meant for reuse by end-to-end tests.

mod common;

use fhecam::mqtt::{tls_transport, TlsConfig};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `openssl args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed by scripts/setup.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate and its key (PEM files).
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority in a directory (P-256 keys: fast to make).
pub struct Pki {
    dir: PathBuf,
    pub ca: Issued,
}

impl Pki {
    /// A self-signed CA named `name`, its files `<name>-ca.pem` / `<name>-ca.key` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let ca = Issued {
            cert: dir.join(format!("{name}-ca.pem")),
            key: dir.join(format!("{name}-ca.key")),
        };
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                ca.key.to_str().unwrap(),
                "-out",
                ca.cert.to_str().unwrap(),
            ],
        );
        Pki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    fn issue(&self, file: &str, cn: &str, ext: &str) -> Issued {
        let out = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        let csr = self.dir.join(format!("{file}.csr"));
        let ext_file = self.dir.join(format!("{file}.ext"));
        std::fs::write(&ext_file, ext).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                out.key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.ca.cert.to_str().unwrap(),
                "-CAkey",
                self.ca.key.to_str().unwrap(),
                "-set_serial",
                &format!("{}", rand_serial()),
                "-days",
                "2",
                "-extfile",
                ext_file.to_str().unwrap(),
                "-out",
                out.cert.to_str().unwrap(),
            ],
        );
        out
    }

    /// A broker certificate for 127.0.0.1 and localhost.
    pub fn server(&self, file: &str) -> Issued {
        self.issue(
            file,
            "127.0.0.1",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
    }

    /// A client certificate whose CN is `cn` (the broker's user name with
    /// `use_identity_as_username`: a camera's device id).
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        self.issue(
            file,
            cn,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
    }
}

fn rand_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (t & 0xffff_ffff_ffff) + N.fetch_add(1, Ordering::Relaxed)
}

/// A mosquitto killed on drop.
pub struct Broker {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// mosquitto on a free loopback port with one TLS listener that requires a client
    /// certificate signed by `ca` and takes its CN as the user name. `extra` is appended to
    /// the configuration (e.g. an `acl_file` line).
    pub fn start(dir: &Path, ca: &Path, server: &Issued, extra: &str) -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let log = dir.join(format!("mosquitto-{port}.log"));
        // as root mosquitto would switch to the `mosquitto` user, which cannot read the
        // tempdir's keys; a non-root user ignores `user`
        let user = if is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "{user}persistence false\nlog_dest stderr\nlog_type all\n\
                 per_listener_settings false\nallow_anonymous false\n\
                 listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nuse_identity_as_username true\n{extra}\n",
                ca.display(),
                server.cert.display(),
                server.key.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("mosquitto is installed by scripts/setup.sh");
        let mut b = Broker { child, port, log };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("mosquitto exited ({st}): {}", b.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen: {}",
                b.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A v5 client of `port` over TLS, trusting `ca`, authenticated by `client`.
fn client(id: &str, port: u16, ca: &Path, client: &Issued) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(
        tls_transport(&TlsConfig {
            ca: ca.to_path_buf(),
            client_cert: Some(client.cert.clone()),
            client_key: Some(client.key.clone()),
        })
        .unwrap(),
    );
    AsyncClient::new(o, 16)
}

/// Polls until `want` matches an event; the error of the first failed poll otherwise.
async fn until(
    ev: &mut EventLoop,
    limit: Duration,
    mut want: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    tokio::time::timeout(limit, async {
        loop {
            match ev.poll().await {
                Ok(e) if want(&e) => return Ok(e),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| format!("no answer within {limit:?}"))?
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    other: Pki,
    camera: Issued,
    agent: Issued,
    broker: Broker,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d, "city");
    let other = Pki::new(d, "other");
    let server = pki.server("broker");
    let camera = pki.client("cam-a", "cam-a");
    let agent = pki.client("agent", "fhecam-agent");
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto.acl");
    let broker = Broker::start(
        d,
        &pki.ca.cert,
        &server,
        &format!("acl_file {}", acl.display()),
    );
    Setup {
        _dir: dir,
        pki,
        other,
        camera,
        agent,
        broker,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip_and_refusals() {
    let s = tokio::task::block_in_place(setup);
    let port = s.broker.port;
    let limit = Duration::from_secs(10);

    // (a) round trip: the agent takes the shared subscription, the camera publishes
    let (agent, mut agent_ev) = client("tls-agent", port, &s.pki.ca.cert, &s.agent);
    agent
        .subscribe(
            "$share/fhecam-agents/fhecam/+/+/inference",
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let ack = until(&mut agent_ev, limit, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap_or_else(|e| panic!("agent: {e}\n{}", s.broker.log_text()));
    let Event::Incoming(Packet::SubAck(ack)) = ack else {
        unreachable!()
    };
    assert!(
        matches!(ack.return_codes[..], [SubscribeReasonCode::Success(_)]),
        "the ACL refused the agent's shared subscription: {ack:?}"
    );
    let (camera, mut camera_ev) = client("tls-cam-a", port, &s.pki.ca.cert, &s.camera);
    // the ACL refuses cam-a publishing as cam-b: nothing reaches the agent
    camera
        .publish(
            "fhecam/cam-b/cam0/inference",
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
    camera
        .publish(
            "fhecam/cam-a/cam0/inference",
            QoS::AtLeastOnce,
            false,
            b"over tls".to_vec(),
        )
        .await
        .unwrap();
    let cam = tokio::spawn(async move {
        let mut reasons = Vec::new();
        while reasons.len() < 2 {
            if let Event::Incoming(Packet::PubAck(a)) = until(&mut camera_ev, limit, |e| {
                matches!(e, Event::Incoming(Packet::PubAck(_)))
            })
            .await?
            {
                reasons.push(a.reason);
            }
        }
        Ok::<_, String>(reasons)
    });
    let got = until(&mut agent_ev, limit, |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .unwrap_or_else(|e| panic!("agent: {e}\n{}", s.broker.log_text()));
    let Event::Incoming(Packet::Publish(p)) = got else {
        unreachable!()
    };
    assert_eq!(
        &p.payload[..],
        b"over tls",
        "the forged publish got through"
    );
    let reasons = cam.await.unwrap().unwrap();
    // mosquitto 2 acknowledges a refused QoS 1 publish and drops it (v5: "not authorized")
    assert_eq!(
        reasons,
        [PubAckReason::NotAuthorized, PubAckReason::Success],
        "PUBACKs of (forged, genuine)"
    );

    // (b) a client that trusts another CA refuses the broker's certificate, promptly
    let (_c, mut wrong) = client("tls-wrong-ca", port, &s.other.ca.cert, &s.camera);
    let t = Instant::now();
    let e = until(&mut wrong, limit, |_| false).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert!(t.elapsed() < limit, "the refusal took {:?}", t.elapsed());

    // a key that belongs to another certificate is refused at setup, not at connect
    let e = tls_transport(&TlsConfig {
        ca: s.pki.ca.cert.clone(),
        client_cert: Some(s.camera.cert.clone()),
        client_key: Some(s.agent.key.clone()),
    })
    .err()
    .expect("a mismatched key is refused")
    .to_string();
    assert!(e.starts_with("mqtt.tls.client_key"), "{e}");
}

#[test]
fn agent_check_names_a_missing_ca() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("backend.toml");
    std::fs::write(
        &conf,
        format!(
            "db = \"{0}/owner.db\"\nstate_db = \"{0}/state.db\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = 8883\nclient_id = \"agent-1\"\n\
             [mqtt.tls]\nca = \"{0}/missing-ca.pem\"\n",
            d.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhecam"))
        .args(["agent", "--config", conf.to_str().unwrap(), "--check"])
        .env_remove("FHECAM_MQTT__HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101), "{err}");
    assert!(
        err.contains("mqtt.tls.ca") && err.contains("missing-ca.pem"),
        "{err}"
    );
}

/// `[mqtt.tls]` of a daemon or agent configuration.
/// An agent's `[mqtt]` lines (`lines`, without a trailing newline) and its `[mqtt.tls]`.
fn tls_mqtt(lines: &str, ca: &Path, who: &Issued) -> String {
    format!("{lines}\n{}", tls_section(ca, who))
}

fn tls_section(ca: &Path, who: &Issued) -> String {
    format!(
        "[mqtt.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        ca.display(),
        who.cert.display(),
        who.key.display()
    )
}

/// The whole path over TLS with client certificates and the shipped ACL: the edge daemon
/// (GStreamer frames, encrypted inference) publishes as its device, the agent decrypts and
/// publishes to the cockpit, the cockpit reads. An agent trusting another CA says why it
/// cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_and_agent_over_tls() {
    let s = tokio::task::block_in_place(setup);
    let port = s.broker.port;
    let d = s._dir.path();
    let o = tokio::task::block_in_place(|| common::owner(d));
    let cockpit_cert = s.pki.client("cockpit", "cockpit");

    // the cockpit, over TLS
    let (cockpit, mut cockpit_ev) = client("cockpit", port, &s.pki.ca.cert, &cockpit_cert);
    cockpit
        .subscribe("cockpit/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut cockpit_ev, Duration::from_secs(10), |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap_or_else(|e| panic!("cockpit: {e}\n{}", s.broker.log_text()));

    // the agent, over TLS (CN fhecam-agent in the ACL)
    let agent_cfg = o.agent_config(
        "tls-agent",
        port,
        &tls_mqtt("client_id = \"tls-agent\"", &s.pki.ca.cert, &s.agent),
        "",
    );
    let agent = common::spawn_agent(&agent_cfg, &[]);

    // the daemon, over TLS, as device cam-a: two test-pattern frames, then end of stream
    let edge_cfg = d.join("edge-tls.toml");
    std::fs::write(
        &edge_cfg,
        format!(
            "device_id = \"cam-a\"\ncamera_id = \"c0\"\nbundle = \"{}\"\nowner_key = \"{}\"\n\
             [source]\npipeline = \"videotestsrc num-buffers=2 pattern=ball ! videoconvert ! appsink\"\n\
             every_frame = true\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_backoff_initial_s = 0.2\n\
             reconnect_backoff_max_s = 1.0\n{}\
             [outbox]\ndir = \"{}\"\n",
            o.bundle.display(),
            d.join("keys/owner.pub").display(),
            tls_section(&s.pki.ca.cert, &s.camera),
            d.join("outbox-tls").display()
        ),
    )
    .unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_fhecam"))
        .args(["run", "--config", edge_cfg.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("edge-tls.log")).unwrap())
        .spawn()
        .unwrap();
    let _daemon = common::Killed(daemon);

    let mut results = Vec::new();
    while results.len() < 2 {
        let ev = until(&mut cockpit_ev, Duration::from_secs(240), |e| {
            matches!(e, Event::Incoming(Packet::Publish(_)))
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cockpit result: {e}\nedge: {}\nagent: {}",
                std::fs::read_to_string(d.join("edge-tls.log")).unwrap_or_default(),
                std::fs::read_to_string(agent_cfg.with_extension("log")).unwrap_or_default()
            )
        });
        let Event::Incoming(Packet::Publish(p)) = ev else {
            unreachable!()
        };
        assert_eq!(&p.topic[..], b"cockpit/cam-a/c0");
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert!(v["label"].as_u64().unwrap() < 10, "{v}");
        results.push(v);
    }
    // the cockpit can see a result before the agent has its acknowledgement and records
    // it: stop the agent once its state database holds both
    let state = d.join("tls-agent-state.db");
    tokio::task::block_in_place(|| {
        common::wait_for(
            "the agent's record of both results",
            Duration::from_secs(30),
            || {
                rusqlite::Connection::open_with_flags(
                    &state,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .and_then(|c| {
                    c.query_row("SELECT count(*) FROM results", [], |r| r.get::<_, i64>(0))
                })
                .is_ok_and(|n| n == 2)
            },
        )
    });
    let st = tokio::task::block_in_place(|| common::stop_agent(agent, Duration::from_secs(5)));
    assert_eq!(st["published"], 2, "{st}");

    // an agent that trusts another CA: refused, and it says why
    let wrong = o.agent_config(
        "tls-agent-wrong-ca",
        port,
        &tls_mqtt("client_id = \"tls-agent-2\"", &s.other.ca.cert, &s.agent),
        "",
    );
    let a = common::spawn_agent(&wrong, &[]);
    let log = wrong.with_extension("log");
    tokio::task::block_in_place(|| {
        common::wait_for("the certificate error", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("invalid peer certificate")
        })
    });
    tokio::task::block_in_place(|| common::stop_agent(a, Duration::from_secs(5)));

    // results the ACL refuses (a cockpit prefix the agent may not write): retried, the
    // inference stays unacknowledged, and a corrected agent publishes it — nothing lost
    let denied = o.agent_config(
        "tls-agent-denied",
        port,
        &tls_mqtt(
            "client_id = \"tls-agent\"\ncockpit_prefix = \"elsewhere\"",
            &s.pki.ca.cert,
            &s.agent,
        ),
        "",
    );
    let a = common::spawn_agent(&denied, &[]);
    let (camera, mut camera_ev) = client("cam-a-direct", port, &s.pki.ca.cert, &s.camera);
    camera
        .publish(
            "fhecam/cam-a/c0/inference",
            QoS::AtLeastOnce,
            false,
            o.envelope("cam-a", "c0", 77, 0),
        )
        .await
        .unwrap();
    until(&mut camera_ev, Duration::from_secs(10), |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_)))
    })
    .await
    .unwrap();
    let log = denied.with_extension("log");
    tokio::task::block_in_place(|| {
        common::wait_for("the refusal", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("the broker refused a result")
        })
    });
    let st = tokio::task::block_in_place(|| common::stop_agent(a, Duration::from_secs(5)));
    assert_eq!(st["published"], 0, "{st}");
    let a = common::spawn_agent(&agent_cfg, &[]);
    let ev = until(&mut cockpit_ev, Duration::from_secs(30), |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .unwrap();
    let Event::Incoming(Packet::Publish(p)) = ev else {
        unreachable!()
    };
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(
        (v["epoch"].as_u64(), v["sequence"].as_u64()),
        (Some(77), Some(0)),
        "{v}"
    );
    tokio::task::block_in_place(|| common::stop_agent(a, Duration::from_secs(5)));
}
