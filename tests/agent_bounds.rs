//! The backend agent's own bounds and its transient refusals, through the real binary
//! against a real mosquitto: one device flooding 20,000 valid envelopes over its rate limit
//! (one real encrypted inference replayed under fresh sequence numbers) while the agent
//! holds at most `limits.max_held` and stays under a stated peak RSS; an owner database
//! replaced by rename under a running agent; a key sealed under another passphrase left
//! unacknowledged until an agent with that passphrase serves it; a wrong passphrase fatal at
//! start; a default client id that a neighbour cannot take over.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// Connects once as `id` with a clean session (what wipes a session the broker holds for
/// that id) and disconnects.
fn clean_connect(port: u16, id: &str) {
    use rumqttc::{Client, Event, MqttOptions, Packet};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(true);
    let (client, mut conn) = Client::new(o, 4);
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_disconnect();
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => panic!("neighbour: {e}"),
        }
    }
}

fn topic(device: &str, camera: &str) -> String {
    format!("fhecam/{device}/{camera}/inference")
}

/// Peak resident set of a process (kB), from /proc/<pid>/status.
fn vm_hwm_kb(pid: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// How much the flood may raise the agent's peak RSS over its peak after its first
/// inference (which includes loading the model): the unbounded agent grew by ~130 MB
/// holding 19,188 of these inferences.
const FLOOD_RSS_GROWTH_MB: u64 = 32;

#[test]
fn a_flood_over_the_rate_limit_is_held_to_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let o = owner(dir.path());
    let (port, _broker, cockpit, cams) = agent_site(dir.path(), "f");
    let (_, agent) = o.start_agent(
        "agent-f",
        port,
        "",
        "[limits]\nper_device_per_minute = 600.0\nburst = 10.0\nmax_held = 64\n",
    );
    let count = |device: &str| {
        on(&cockpit, "cockpit/")
            .iter()
            .filter(|r| r["device_id"] == device)
            .count()
    };
    std::thread::sleep(Duration::from_secs(2));
    cams.send(&topic("calm", "c0"), o.envelope("calm", "c0", 1, 0), false);
    wait_for("a first result", Duration::from_secs(30), || {
        count("calm") == 1
    });
    let rest_mb = vm_hwm_kb(&agent.proc.pid()) / 1024;

    let envelope = o.envelope("flood", "c0", 1, 0);
    eprintln!("envelope: {} bytes", envelope.len());
    for seq in 0..20_000u64 {
        cams.send(
            &topic("flood", "c0"),
            o.envelope("flood", "c0", 1, seq),
            false,
        );
    }
    // a camera within its limit, behind the flood
    for seq in 1..6u64 {
        cams.send(
            &topic("calm", "c0"),
            o.envelope("calm", "c0", 1, seq),
            false,
        );
    }
    wait_for(
        "the calm camera's 5 results during the flood",
        Duration::from_secs(90),
        || count("calm") >= 6,
    );
    wait_for(
        "200 of the flood's results",
        Duration::from_secs(90),
        || count("flood") >= 200,
    );
    let hwm_mb = vm_hwm_kb(&agent.proc.pid()) / 1024;
    let st = stop_agent(agent, Duration::from_secs(10));
    eprintln!("agent stats {st}; peak RSS {rest_mb} MB after one inference, {hwm_mb} MB flooded");
    let peak = st["held_peak"].as_u64().unwrap();
    assert!(peak <= 64, "held {peak}, over limits.max_held: {st}");
    assert!(peak >= 32, "the flood filled its half: {st}");
    assert!(st["shed"].as_u64().unwrap() > 0, "{st}");
    assert!(st["redelivery_reconnects"].as_u64().unwrap() > 0, "{st}");
    assert!(st["rate_limited"].as_u64().unwrap() > 0, "{st}");
    assert!(
        hwm_mb < rest_mb + FLOOD_RSS_GROWTH_MB,
        "peak RSS {hwm_mb} MB, over {rest_mb} + {FLOOD_RSS_GROWTH_MB} MB"
    );
    let twice: Vec<_> = result_counts(&on(&cockpit, "cockpit/"))
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    assert!(
        on(&cockpit, "backend/deadletter").is_empty(),
        "nothing refused"
    );
}

/// A new model version's encrypted inference: the model protected into `db`, deployed and
/// run by the camera runtime on one digit. Its model id, version and ciphertext.
fn new_version(o: &Owner, db: &Path, pass: &str, name: &str) -> (String, u32, Vec<u8>) {
    let model = o.dir.join("tiny.json");
    let out = run(
        &["protect", s(&model), "--db", s(db), "--name", "tiny"],
        Some(pass),
    );
    assert!(out.status.success(), "protect");
    let id = String::from_utf8(out.stdout).unwrap();
    let id = id.trim().lines().last().unwrap().to_string();
    let bundle = o.dir.join(format!("{name}.bundle"));
    let out = run(
        &[
            "deploy",
            "--db",
            s(db),
            "--model",
            &id,
            "--signing-key",
            s(&o.dir.join("keys/owner.key")),
            "--out",
            s(&bundle),
        ],
        Some(PASS),
    );
    assert!(out.status.success(), "deploy");
    let key = fhecam::bundle::read_owner_key(&o.dir.join("keys/owner.pub")).unwrap();
    let b = fhecam::bundle::load_file(&bundle, &key).unwrap();
    let rt = fhecam::fhe::EdgeRuntime::new(&b.model, b.public, 0).unwrap();
    let digits = fhecam::data::load_digits().unwrap();
    let x = o.model.input.quantize(&digits.images[0]);
    let (ct, _) = rt.infer(&rt.encrypt(&x)).unwrap();
    (id, b.header.version, ct.to_bytes().unwrap())
}

fn envelope_of(id: &str, version: u32, ct: &[u8], device: &str, seq: u64) -> Vec<u8> {
    fhecam::wire::envelope::encode(&fhecam::wire::envelope::Envelope {
        device_id: device.into(),
        camera_id: "c0".into(),
        model_id: id.parse().unwrap(),
        model_version: version,
        sequence: seq,
        epoch: 1,
        frame_timestamp_ms: 1_700_000_000_000,
        ciphertext: ct.to_vec(),
    })
    .unwrap()
}

/// A database replaced by rename (rsync, Ansible `copy`, `mv`) under a running agent: the
/// new version's inferences decrypt without a restart. A version sealed under another
/// passphrase is refused for now but left unacknowledged, and an agent started with that
/// passphrase serves it; a wrong passphrase stops the agent at start.
#[test]
fn owner_db_replaced_by_rename_and_transient_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let o = owner(dir.path());
    let (port, _broker, cockpit, cams) = agent_site(dir.path(), "r");
    let (cfg, agent) = o.start_agent("agent-r", port, "", "");
    std::thread::sleep(Duration::from_secs(2));

    // the README's rotation: protect into a copy, then move it over the agent's database
    let next = dir.path().join("owner.db.new");
    std::fs::copy(&o.db, &next).unwrap();
    let (id2, v2, ct2) = new_version(&o, &next, PASS, "v2");
    assert_eq!(v2, 2);
    std::fs::rename(&next, &o.db).unwrap();
    cams.send(
        &topic("rot", "c0"),
        envelope_of(&id2, v2, &ct2, "rot", 0),
        false,
    );
    wait_for(
        "the new version's result without a restart",
        Duration::from_secs(30),
        || !on(&cockpit, "cockpit/").is_empty(),
    );
    let r = &on(&cockpit, "cockpit/")[0];
    assert_eq!(r["model_id"], id2.as_str(), "{r}");
    assert_eq!(r["label"], o.label, "{r}");

    // a database whose new version is sealed under another passphrase
    const OTHER: &str = "another owner passphrase entirely";
    let next = dir.path().join("owner.db.other");
    let (id3, v3, ct3) = new_version(&o, &next, OTHER, "v3");
    std::fs::rename(&next, &o.db).unwrap();
    cams.send(
        &topic("rot", "c0"),
        envelope_of(&id3, v3, &ct3, "rot", 1),
        false,
    );
    wait_for("its dead letter", Duration::from_secs(30), || {
        !on(&cockpit, "backend/deadletter").is_empty()
    });
    let dl = &on(&cockpit, "backend/deadletter")[0];
    assert_eq!(dl["code"], "model_unusable", "{dl}");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("left unacknowledged"),
        "{dl}"
    );
    let st = stop_agent(agent, Duration::from_secs(10));
    assert_eq!(st["released"], 1, "{st}");
    assert_eq!(on(&cockpit, "cockpit/").len(), 1);

    // the wrong passphrase for this database: fatal at start, without --check
    let mut wrong = bin();
    wrong
        .args(["agent", "--config", s(&cfg)])
        .env("FHECAM_OWNER_PASSPHRASE", PASS);
    let out = wrong.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot unseal"), "{err}");

    // the right one: the inference left unacknowledged is redelivered and decrypted
    let agent = spawn_agent(&cfg, &[("FHECAM_OWNER_PASSPHRASE", OTHER)]);
    wait_for(
        "the inference left unacknowledged, served",
        Duration::from_secs(30),
        || on(&cockpit, "cockpit/").len() >= 2,
    );
    let r = &on(&cockpit, "cockpit/")[1];
    assert_eq!(r["model_id"], id3.as_str(), "{r}");
    assert_eq!(r["label"], o.label, "{r}");
    stop_agent(agent, Duration::from_secs(10));
}

/// The default client id carries a random part kept beside the state database: stable
/// across restarts, and a neighbour connecting with the predictable
/// `fhecam-agent-<host>-<group>` and a clean session takes nothing from the agent; one
/// connecting with the real id does wipe its session (how an orphan session is cleared).
#[test]
fn the_default_client_id_cannot_be_guessed_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let o = owner(dir.path());
    let (port, _broker) = Broker::on_free_port(dir.path());
    let cockpit = subscribe(port, "cockpit-c", &["cockpit/#"]);
    let cams = Publisher::new(port, "cameras-c");
    let (cfg, agent) = o.start_agent("agent-c", port, "", "");
    std::thread::sleep(Duration::from_secs(2));
    stop_agent(agent, Duration::from_secs(10));
    let id_file = dir.path().join("agent-c-state.db.client-id");
    let id = std::fs::read_to_string(&id_file)
        .unwrap()
        .trim()
        .to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let predictable: String = format!("fhecam-agent-{}-fhecam-agents", host.trim())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    assert!(id.len() > predictable.len() && id != predictable, "{id}");

    // 10 inferences wait at the broker for the stopped agent; a neighbour connects with
    // the predictable id and a clean session
    for seq in 0..10u64 {
        cams.send(&topic("cid", "c0"), o.envelope("cid", "c0", 1, seq), false);
    }
    clean_connect(port, &predictable);
    let agent = spawn_agent(&cfg, &[]);
    wait_for("the 10 results", Duration::from_secs(30), || {
        on(&cockpit, "cockpit/").len() >= 10
    });
    stop_agent(agent, Duration::from_secs(10));
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap().trim(),
        id,
        "kept across restarts"
    );

    // whoever knows the id wipes the session: what clears an orphan, and why the id must
    // not be guessable
    for seq in 10..13u64 {
        cams.send(&topic("cid", "c0"), o.envelope("cid", "c0", 1, seq), false);
    }
    clean_connect(port, &id);
    let agent = spawn_agent(&cfg, &[]);
    std::thread::sleep(Duration::from_secs(2));
    cams.send(&topic("cid", "c0"), o.envelope("cid", "c0", 1, 99), false);
    wait_for(
        "the result published after the wipe",
        Duration::from_secs(30),
        || on(&cockpit, "cockpit/").iter().any(|r| r["sequence"] == 99),
    );
    stop_agent(agent, Duration::from_secs(10));
    let seqs: Vec<u64> = on(&cockpit, "cockpit/")
        .iter()
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs.len(),
        11,
        "the 3 queued for the wiped session are gone: {seqs:?}"
    );
}
