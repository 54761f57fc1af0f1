//! The backend agent through the real binary against a real mosquitto: two agents share one
//! subscription and decrypt every inference exactly once; duplicates are released once;
//! tampered, truncated, oversized, unknown-model and wrong-topic envelopes, an encrypted
//! weight packed alone, an output under another key and a logit outside the model's range
//! end in the dead-letter topic with a reason; a device over its rate limit
//! gets all its results, later; and the agents keep running.

use fhecam::bundle;
use fhecam::fhe::eval::OutputLayout;
use fhecam::fhe::{pack_digits, EncryptedOutput};
use fhecam::wire::envelope::{self, Envelope};
use rumqttc::{Client, MqttOptions, QoS};
use std::time::Duration;

mod common;
use common::*;

#[test]
fn shared_agents_decrypt_once_and_dead_letter_every_attack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // owner: a tiny trained model, protected and deployed, and one real encrypted
    // inference of it, reused below
    let o = owner(d);
    let (db, id, label, ciphertext) = (o.db.clone(), o.id.clone(), o.label, o.ciphertext.clone());
    let header = o.header.clone();
    let key = bundle::read_owner_key(&d.join("keys/owner.pub")).unwrap();
    let b = bundle::load_file(&o.bundle, &key).unwrap();
    // an encrypted weight, which a camera could pack with its compression key
    let store = fhecam::store::Store::open(&db).unwrap();
    let keys = store
        .owner_keys(
            &id.parse().unwrap(),
            &fhecam::secret::Passphrase::new(PASS.into()).unwrap(),
        )
        .unwrap();
    let weight = b
        .model
        .params
        .iter()
        .flatten()
        .flat_map(|p| p.weights.iter())
        .map(|c| c.decompress())
        .next()
        .expect("an encrypted weight");
    let compression = keys.client.new_compression_key(&keys.compression);
    let layout = EncryptedOutput::from_bytes(&ciphertext).unwrap().layout;
    // every digit at 3: the largest value the layout can write, above the model's range
    let top: Vec<i64> = layout.logits(&vec![3; layout.ciphertexts()]);
    let hi = match o.model.infer().unwrap().last().unwrap().kind {
        fhecam::model::Kind::Acc { hi, .. } => hi,
        k => panic!("{k:?}"),
    };
    assert!(top.iter().any(|&v| v > hi), "{top:?} within ..={hi}");
    let out_of_range =
        EncryptedOutput::encrypt_digits(&keys, layout.clone(), &vec![3; layout.ciphertexts()])
            .unwrap();
    let other = fhecam::fhe::OwnerKeys::generate();
    let other_key =
        EncryptedOutput::encrypt_digits(&other, layout.clone(), &vec![1; layout.ciphertexts()])
            .unwrap();
    let env = |device: &str, seq: u64, ct: &[u8]| {
        envelope::encode(&Envelope {
            device_id: device.into(),
            camera_id: "cam0".into(),
            model_id: header.model_id,
            model_version: header.version,
            sequence: seq,
            epoch: 1,
            frame_timestamp_ms: 1_700_000_000_000 + seq,
            ciphertext: ct.to_vec(),
        })
        .unwrap()
    };

    // broker, cockpit, two agents in one group
    let (port, _broker) = Broker::on_free_port(d);
    let msgs = subscribe(port, "cockpit-test", &["cockpit/#", "backend/deadletter"]);
    let agent_cfg = |n: u32| {
        let p = d.join(format!("backend{n}.toml"));
        std::fs::write(
            &p,
            format!(
                "db = \"{}\"\nstate_db = \"{}\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"agent-{n}\"\nshared = true\n\
                 [limits]\nmax_payload_bytes = 60000\nper_device_per_minute = 60.0\nburst = 5.0\n",
                s(&db),
                s(&d.join("agent-state.db"))
            ),
        )
        .unwrap();
        p
    };
    let (c1, c2) = (agent_cfg(1), agent_cfg(2));
    assert!(ok(&["agent", "--config", s(&c1), "--check"])
        .contains("$share/fhecam-agents/fhecam/+/+/inference"));
    let agents = vec![spawn_agent(&c1, &[]), spawn_agent(&c2, &[])];
    std::thread::sleep(Duration::from_secs(2)); // both subscribed

    let mut o = MqttOptions::new("edge-test", "127.0.0.1", port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (edge, mut conn) = Client::new(o, 64);
    std::thread::spawn(move || for _ in conn.iter() {});
    let publish = |device: &str, payload: Vec<u8>| {
        edge.publish(
            format!("fhecam/{device}/cam0/inference"),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .unwrap();
    };

    // 1. eight inferences, one duplicate: eight results, each sequence once, the right label
    for seq in 0..8 {
        publish("dev1", env("dev1", seq, &ciphertext));
    }
    wait_for("8 cockpit results", Duration::from_secs(60), || {
        on(&msgs, "cockpit/").len() >= 8
    });
    publish("dev1", env("dev1", 3, &ciphertext));

    // 2. attacks, each from dev2 or on a bad topic
    let mut tampered = env("dev2", 100, &ciphertext);
    tampered[64] ^= 0x40; // the ciphertext container's format version
    publish("dev2", tampered);
    let full = env("dev2", 101, &ciphertext);
    publish("dev2", full[..full.len() / 2].to_vec());
    let mut unknown = env("dev2", 102, &ciphertext);
    unknown[4 + 2 + 1 + 4 + 1 + 4] ^= 0xff; // a byte of the model id
    publish("dev2", unknown);
    // over the agent's limit, under the packet size it announces to the broker
    publish("dev2", vec![0u8; 65_000]);
    publish("devX", env("dev2", 103, &ciphertext)); // envelope of dev2 on devX's topic
    publish("dev2", env("dev2", 104, &out_of_range.to_bytes().unwrap()));
    // an encrypted weight packed alone, in a layout of its own: only the model's layout is
    // ever decrypted
    let alone = EncryptedOutput {
        layout: OutputLayout {
            offsets: vec![0],
            digits: vec![1],
        },
        packed: pack_digits(&compression, &[weight]),
    };
    publish("dev2", env("dev2", 105, &alone.to_bytes().unwrap()));
    publish("dev2", env("dev2", 106, &other_key.to_bytes().unwrap()));

    // 3. dev3 over its rate limit: burst 5, then 1 a second, per agent: held back, not lost
    for seq in 0..12 {
        publish("dev3", env("dev3", seq, &ciphertext));
    }

    wait_for(
        "8 dead letters and 20 results",
        Duration::from_secs(90),
        || on(&msgs, "backend/deadletter").len() >= 8 && on(&msgs, "cockpit/").len() >= 20,
    );
    std::thread::sleep(Duration::from_secs(2)); // nothing more should arrive
    let results = on(&msgs, "cockpit/");
    let dead = on(&msgs, "backend/deadletter");
    for r in &results {
        assert_eq!(r["label"], label, "{r}");
        assert!(r.get("logits").is_none(), "logits are opt-in: {r}");
        assert_eq!(r["model_id"], id.as_str());
    }
    let dev1: Vec<u64> = results
        .iter()
        .filter(|r| r["device_id"] == "dev1")
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    let mut sorted = dev1.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..8).collect::<Vec<_>>(),
        "each dev1 inference exactly once"
    );
    let dev3 = results.iter().filter(|r| r["device_id"] == "dev3").count();
    assert!(
        results.iter().all(|r| r["device_id"] != "dev2"),
        "no attack was released"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|v| format!("{}: {}", v["code"], v["reason"]))
        .collect();
    eprintln!("dead letters: {reasons:#?}");
    // refusals are asserted by their stable code; the text is for people
    let has = |code: &str| dead.iter().filter(|v| v["code"] == code).count();
    assert!(
        dead.iter()
            .all(|v| !v["reason"].as_str().unwrap().is_empty()),
        "every refusal says why"
    );
    assert!(
        has("malformed_ciphertext") + has("malformed_envelope") >= 2,
        "tampered and truncated"
    );
    assert!(has("unknown_model") >= 1, "unknown model");
    assert!(has("oversized") >= 1, "oversized");
    assert!(has("wrong_sender") >= 1, "wrong topic");
    assert!(
        has("impossible_values") >= 1,
        "a logit outside the model's range"
    );
    assert!(has("decryption_check") >= 1, "another key");
    assert!(has("wrong_layout") >= 1, "weight alone");
    assert_eq!(dev3, 12, "every dev3 inference decrypted, none refused");
    assert_eq!(dead.len(), 8, "{reasons:#?}");

    // both agents worked, the duplicate was counted, and SIGTERM stops them cleanly
    let mut total = (0, 0, 0);
    let mut each = Vec::new();
    for a in &agents {
        a.proc.signal("-TERM");
    }
    for a in agents {
        let st = stop_agent(a, Duration::from_secs(10));
        eprintln!("agent stats: {st}");
        each.push(st["decrypted"].as_u64().unwrap());
        total.0 += st["decrypted"].as_u64().unwrap();
        total.1 += st["duplicates"].as_u64().unwrap();
        total.2 += st["dead_lettered"].as_u64().unwrap();
    }
    assert_eq!(
        total.0,
        8 + dev3 as u64,
        "dev1 and dev3, each decrypted once"
    );
    assert_eq!(total.1, 1, "the duplicate");
    assert_eq!(total.2, dead.len() as u64);
    assert!(
        each.iter().all(|&n| n > 0),
        "both agents got work: {each:?}"
    );
}
