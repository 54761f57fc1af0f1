//! Fleet deployment through the real binary, a real mosquitto and real GStreamer: running
//! cameras take new model versions by MQTT push, by file drop and by SIGHUP without
//! restarting; older, re-signed and foreign bundles are refused while they keep working;
//! a restart keeps the pushed model; a rotation during a broker outage loses and
//! duplicates nothing; `fhecam fleet` and `fhecam models --broker` show who runs what.

use fhecam::wire::envelope;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{
    bin, daemon, log, ok, on, s, spawn_agent, stop_daemon as stop, subscribe, wait_for, Broker,
    Messages,
};

/// A live test source: a moving ball, so every frame is new.
const LIVE: &str = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=32,height=32,framerate=2/1 ! videoconvert ! appsink";

struct Fleet {
    dir: PathBuf,
    owner: common::Owner,
}

impl Fleet {
    fn new(dir: &Path) -> Fleet {
        Fleet {
            dir: dir.into(),
            owner: common::owner(dir),
        }
    }

    /// A new version of the tiny model (fresh keys): its id.
    fn protect(&self) -> String {
        let out = ok(&[
            "protect",
            s(&self.dir.join("tiny.json")),
            "--db",
            s(&self.owner.db),
            "--name",
            "tiny",
        ]);
        out.trim().lines().last().unwrap().to_string()
    }

    /// `fhecam deploy` of model `id` with `extra` arguments, however it ends.
    fn deploy_output(&self, id: &str, extra: &[&str]) -> std::process::Output {
        let key = self.dir.join("keys/owner.key");
        let mut args = vec![
            "deploy",
            "--db",
            s(&self.owner.db),
            "--model",
            id,
            "--signing-key",
            s(&key),
        ];
        args.extend_from_slice(extra);
        bin().args(&args).output().unwrap()
    }

    /// `fhecam deploy`, which must succeed: its stdout.
    fn deploy(&self, id: &str, extra: &[&str]) -> String {
        let out = self.deploy_output(id, extra);
        assert!(
            out.status.success(),
            "deploy {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn state(&self, device: &str) -> PathBuf {
        self.dir.join(format!("state-{device}"))
    }

    fn drop_dir(&self, device: &str) -> PathBuf {
        self.dir.join(format!("drop-{device}"))
    }

    fn outbox(&self, device: &str) -> PathBuf {
        self.dir.join(format!("outbox-{device}"))
    }

    /// edge.toml of camera `device`/cam0 with fleet deployment on.
    fn config(&self, device: &str, port: u16, bundle: &Path, extra: &str) -> PathBuf {
        let p = self.dir.join(format!("{device}.toml"));
        std::fs::write(
            &p,
            format!(
                "device_id = \"{device}\"\nbundle = \"{}\"\nowner_key = \"{}\"\n{extra}\n\
                 [source]\npipeline = \"{LIVE}\"\n\
                 [infer]\ninput_mode = \"device-clear\"\n\
                 [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nstats_interval_s = 1.0\n\
                 reconnect_backoff_initial_s = 0.2\nreconnect_backoff_max_s = 1.0\n\
                 [outbox]\ndir = \"{}\"\n\
                 [deploy]\nstate_dir = \"{}\"\ndrop_dir = \"{}\"\nscan_interval_s = 0.5\n",
                s(bundle),
                s(&self.dir.join("keys/owner.pub")),
                s(&self.outbox(device)),
                s(&self.state(device)),
                s(&self.drop_dir(device)),
            ),
        )
        .unwrap();
        p
    }

    fn agent(&self, port: u16) -> common::Agent {
        spawn_agent(&self.owner.agent_config("agent", port, "", ""), &[])
    }

    /// Envelopes waiting in a camera's outbox.
    fn outbox_envelopes(&self, device: &str) -> Vec<envelope::Envelope> {
        std::fs::read_dir(self.outbox(device))
            .map(|d| {
                d.filter_map(|e| {
                    let p = e.ok()?.path();
                    (p.extension()? == "env")
                        .then(|| envelope::decode(&std::fs::read(p).ok()?).ok())?
                })
                .collect()
            })
            .unwrap_or_default()
    }
}

/// Cockpit results of `device` for model version `v`.
fn results_of(msgs: &Messages, device: &str, v: u64) -> usize {
    on(msgs, &format!("cockpit/{device}/"))
        .iter()
        .filter(|r| r["model_version"].as_u64() == Some(v))
        .count()
}

/// The last retained status of `device`/cam0 (model version and refusal counters).
fn status(msgs: &Messages, device: &str) -> serde_json::Value {
    on(msgs, &format!("fhecam/{device}/cam0/stats"))
        .pop()
        .unwrap_or_default()
}

/// `deploy` flags pushing to dev1's cameras through `broker`, confirmed within
/// `confirm_s` seconds.
fn push_to_dev1<'a>(broker: &'a str, confirm_s: &'a str) -> [&'a str; 7] {
    [
        "--push",
        "--broker",
        broker,
        "--devices",
        "dev1",
        "--confirm-s",
        confirm_s,
    ]
}

const LONG: Duration = Duration::from_secs(240);

#[test]
fn cameras_take_pushed_dropped_and_reloaded_versions_and_refuse_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path());
    let (port, _broker) = Broker::on_free_port(dir.path());
    let msgs = subscribe(
        port,
        "fleet-test",
        &["cockpit/#", "backend/deadletter", "fhecam/+/+/stats"],
    );
    let agent = f.agent(port);
    let v1 = f.owner.id.clone();
    let v1_bundle = dir.path().join("v1.bundle");
    std::fs::copy(&f.owner.bundle, &v1_bundle).unwrap();
    let v2 = f.protect();
    let v3 = f.protect();

    // dev1 runs continuously; dev2 infers once and then idles (one frame an hour)
    let cfg1 = f.config("dev1", port, &f.owner.bundle, "");
    let v = ok(&["validate", "--config", s(&cfg1)]);
    assert!(v.contains("no model accepted yet"), "{v}");
    assert!(
        v.contains("pushed bundles: fhecam/_deploy/all, fhecam/_deploy/dev1"),
        "{v}"
    );
    let (cam1, log1) = daemon(&cfg1);
    let (cam2, log2) = daemon(&f.config(
        "dev2",
        port,
        &f.owner.bundle,
        "[preprocess]\nsample_interval_s = 3600.0",
    ));
    wait_for("a version-1 result from each camera", LONG, || {
        results_of(&msgs, "dev1", 1) >= 1 && results_of(&msgs, "dev2", 1) >= 1
    });

    // push version 2 to dev1 only, without writing a file
    let addr = format!("127.0.0.1:{port}");
    let out = f.deploy(&v2, &push_to_dev1(&addr, "120"));
    assert!(out.contains("acknowledged by the broker"), "{out}");
    assert!(
        out.contains(&format!("confirmed: 1 device(s) run model {v2}")),
        "{out}"
    );
    wait_for("a version-2 result from dev1", LONG, || {
        results_of(&msgs, "dev1", 2) >= 1
    });
    assert!(
        log(&log1).contains("now running tiny version 2"),
        "{}",
        log(&log1)
    );

    // `fhecam fleet` lists both cameras with the versions they run
    wait_for("dev1 reporting version 2", Duration::from_secs(20), || {
        status(&msgs, "dev1")["model_version"] == 2
    });
    let fleet = ok(&["fleet", "--broker", &format!("127.0.0.1:{port}"), "--json"]);
    let cams: Vec<serde_json::Value> = fleet
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(String, u64, String)> = cams
        .iter()
        .map(|c| {
            (
                c["device_id"].as_str().unwrap().to_string(),
                c["model_version"].as_u64().unwrap(),
                c["availability"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("dev1".into(), 2, "online".into()),
            ("dev2".into(), 1, "online".into())
        ],
        "{fleet}"
    );
    let models = ok(&[
        "models",
        "--db",
        s(&f.owner.db),
        "--broker",
        &format!("127.0.0.1:{port}"),
        "--json",
    ]);
    for line in models.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let want: Vec<&str> = match m["id"].as_str().unwrap() {
            id if id == v1 => vec!["dev2/cam0"],
            id if id == v2 => vec!["dev1/cam0"],
            _ => vec![],
        };
        assert_eq!(m["cameras"], serde_json::json!(want), "{models}");
    }

    // version 3 by file drop
    let drop1 = f.drop_dir("dev1");
    f.deploy(&v3, &["--out", s(&drop1.join("v3.bundle"))]);
    wait_for("a version-3 result from dev1", LONG, || {
        results_of(&msgs, "dev1", 3) >= 1
    });
    assert!(!drop1.join("v3.bundle").exists(), "taken files are removed");

    // refused, each with its reason, while dev1 keeps running version 3:
    // an older version pushed (a replay of a validly signed bundle): the broker takes it,
    // the camera refuses it, and --confirm-s says so ...
    let addr = format!("127.0.0.1:{port}");
    let out = f.deploy_output(&v1, &push_to_dev1(&addr, "15"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("not every camera runs model") && err.contains("rollback refused"),
        "{err}"
    );
    // ... an older version dropped, the same version re-signed with other bytes, and a
    // bundle signed by someone else
    std::fs::copy(&f.owner.bundle, drop1.join("old.bundle")).unwrap();
    let v3_bytes = {
        let p = dir.path().join("v3.bundle");
        f.deploy(&v3, &["--out", s(&p)]);
        std::fs::read(p).unwrap()
    };
    let owner_key = fhecam::bundle::read_signing_key(&dir.path().join("keys/owner.key")).unwrap();
    let resign = |created_delta: i64, key: &ed25519_dalek::SigningKey| {
        let v = fhecam::bundle::verify(&v3_bytes, &owner_key.verifying_key()).unwrap();
        let h = v.header.clone();
        fhecam::bundle::build(
            fhecam::bundle::BundleMeta {
                model_id: h.model_id,
                name: h.name,
                version: h.version,
                created_unix: h.created_unix + created_delta,
                input: h.input,
                num_classes: h.num_classes,
            },
            v.encrypted_model,
            v.public_key,
            v.server_key,
            key,
        )
        .unwrap()
    };
    std::fs::write(drop1.join("resigned.bundle"), resign(1, &owner_key)).unwrap();
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    std::fs::write(drop1.join("stranger.bundle"), resign(10, &stranger)).unwrap();
    wait_for("four refusals", Duration::from_secs(60), || {
        status(&msgs, "dev1")["bundles_refused"].as_u64() >= Some(4)
    });
    for name in ["old", "resigned", "stranger"] {
        assert!(
            drop1.join(format!("{name}.bundle.refused")).exists(),
            "{name} kept as .refused"
        );
    }
    let l = log(&log1);
    assert!(l.contains("rollback refused"), "{l}");
    assert!(l.contains("same version, other bytes"), "{l}");
    assert!(l.contains("signature does not verify"), "{l}");
    let before = results_of(&msgs, "dev1", 3);
    wait_for("dev1 still working on version 3", LONG, || {
        results_of(&msgs, "dev1", 3) > before
    });
    assert_eq!(status(&msgs, "dev1")["model_version"], 3);

    // SIGHUP: the configured bundle file, replaced by version 4
    let v4 = f.protect();
    f.deploy(&v4, &["--out", s(&f.owner.bundle)]);
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &cam2.id().to_string()])
        .status();
    wait_for("dev2 reporting version 4", LONG, || {
        status(&msgs, "dev2")["model_version"] == 4
    });

    // a restart keeps the deployed model: dev1's configured file (version 1) is older
    let s1 = stop(cam1, &log1);
    assert_eq!((s1.bundles_accepted, s1.bundles_refused), (2, 4), "{s1:?}");
    let cfg1 = f.config("dev1", port, &v1_bundle, "");
    let v = ok(&["validate", "--config", s(&cfg1)]);
    assert!(v.contains("tiny up to version 3"), "{v}");
    let (cam1, log1) = daemon(&cfg1);
    let before = results_of(&msgs, "dev1", 3);
    wait_for("dev1 on version 3 after a restart", LONG, || {
        results_of(&msgs, "dev1", 3) > before
    });
    assert!(log(&log1).contains("not taken"), "{}", log(&log1));
    let _ = stop(cam1, &log1);
    let _ = stop(cam2, &log2);
    let stats = common::stop_agent(agent, Duration::from_secs(60));
    assert!(on(&msgs, "backend/deadletter").is_empty(), "{stats}");
}

#[test]
fn a_rotation_during_a_broker_outage_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path());
    let (port, broker) = Broker::on_free_port(dir.path());
    let msgs = subscribe(port, "rotation-test", &["cockpit/#", "backend/deadletter"]);
    let agent = f.agent(port);
    let (cam, log1) = daemon(&f.config("dev1", port, &f.owner.bundle, ""));
    wait_for("a version-1 result", LONG, || {
        results_of(&msgs, "dev1", 1) >= 1
    });

    // the broker goes down; version-1 inferences wait in the outbox
    broker.stop();
    wait_for("a version-1 inference in the outbox", LONG, || {
        f.outbox_envelopes("dev1")
            .iter()
            .any(|e| e.model_version == 1)
    });
    // the owner protects version 2 (fresh keys) and drops it on the camera meanwhile
    let v2 = f.protect();
    f.deploy(&v2, &["--out", s(&f.drop_dir("dev1").join("v2.bundle"))]);
    wait_for("a version-2 inference in the outbox", LONG, || {
        f.outbox_envelopes("dev1")
            .iter()
            .any(|e| e.model_version == 2)
    });
    let _broker = Broker::start(dir.path(), port);
    // what waited in the outbox goes out once the camera is back on the broker
    wait_for("the outbox drained", LONG, || {
        f.outbox_envelopes("dev1")
            .iter()
            .all(|e| e.model_version != 1)
            && results_of(&msgs, "dev1", 2) >= 1
    });
    let stats = stop(cam, &log1);
    assert_eq!(stats.outbox_dropped, 0);
    assert_eq!(stats.published, stats.inferences, "{stats:?}");
    let n = stats.inferences as usize;
    wait_for(
        "every inference decrypted",
        Duration::from_secs(120),
        || on(&msgs, "cockpit/dev1/").len() >= n,
    );
    std::thread::sleep(Duration::from_secs(2)); // a duplicate would arrive by now
    let results = on(&msgs, "cockpit/dev1/");
    let counts = common::result_counts(&results);
    assert_eq!(counts.len(), n, "every inference, none lost");
    assert!(
        counts.values().all(|&c| c == 1),
        "none duplicated: {counts:?}"
    );
    let versions: BTreeSet<u64> = results
        .iter()
        .map(|r| r["model_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, BTreeSet::from([1, 2]));
    assert!(on(&msgs, "backend/deadletter").is_empty());
    common::stop_agent(agent, Duration::from_secs(60));
}

/// A retained report too large for one camera (1.5 MB: over the 1 MB a status may be; 5 MB:
/// over what `fhecam fleet` accepts, so the broker does not send it) is that camera's note
/// or absence, never a failure of the whole fleet view.
#[test]
fn an_oversized_retained_status_does_not_hide_the_fleet() {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker) = Broker::on_free_port(dir.path());
    let mut o = MqttOptions::new("retainer", "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut conn) = Client::new(o, 16);
    let messages: Vec<(String, Vec<u8>)> = vec![
        ("fhecam/good/cam0/availability".into(), b"online".to_vec()),
        ("fhecam/big/cam0/availability".into(), b"online".to_vec()),
        ("fhecam/big/cam0/stats".into(), vec![b' '; 1_500_000]),
        ("fhecam/huge/cam0/availability".into(), b"online".to_vec()),
        ("fhecam/huge/cam0/stats".into(), vec![b'{'; 5_000_000]),
    ];
    for (t, p) in &messages {
        client
            .publish(t.clone(), QoS::AtLeastOnce, true, p.clone())
            .unwrap();
    }
    let mut acked = 0;
    for ev in conn.iter() {
        if let Event::Incoming(Packet::PubAck(_)) = ev.unwrap() {
            acked += 1;
            if acked == messages.len() {
                break;
            }
        }
    }
    let broker = format!("127.0.0.1:{port}");
    let out = ok(&["fleet", "--broker", &broker, "--json", "--wait-s", "1"]);
    let cams: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let devices: Vec<&str> = cams
        .iter()
        .map(|c| c["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["big", "good", "huge"], "{out}");
    for c in &cams {
        assert_eq!(c["availability"], "online", "{c}");
    }
    let note = cams[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("1500000 bytes, over the 1048576-byte limit"),
        "{out}"
    );
    assert!(
        cams[1]["note"].is_null() && cams[2]["note"].is_null(),
        "{out}"
    );
    let table = ok(&["fleet", "--broker", &broker, "--wait-s", "1"]);
    assert!(table.contains("over the 1048576-byte limit"), "{table}");
}
