//! The backend agent under load and failure, through the real binary against a real
//! mosquitto: retained messages at start, a burst of 2,000 mixed messages, a backlog of 200
//! inferences from 5 cameras after a broker outage, a restart on the default config, a
//! camera over its rate limit, a crash between decryption and publication, and a camera
//! whose outbox was reset. Every valid inference reaches the cockpit exactly once, every
//! other message the dead-letter topic, and SIGTERM ends the agent within seconds.

mod common;

use common::*;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn shared_owner() -> &'static Owner {
    static OWNER: OnceLock<Owner> = OnceLock::new();
    OWNER.get_or_init(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        owner(dir.path())
    })
}

fn topic(device: &str, camera: &str) -> String {
    format!("fhecam/{device}/{camera}/inference")
}

/// Every key of `want` exactly once among the cockpit results, and nothing else.
fn assert_exactly_once(msgs: &Messages, want: &[(String, String, u64, u64)]) {
    let results = on(msgs, "cockpit/");
    let counts = result_counts(&results);
    let label = shared_owner().label;
    for r in &results {
        assert_eq!(r["label"], label, "{r}");
    }
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    let missing: Vec<_> = want.iter().filter(|k| !counts.contains_key(*k)).collect();
    assert!(missing.is_empty(), "never published: {missing:?}");
    assert_eq!(counts.len(), want.len(), "unexpected results");
}

fn key(d: &str, c: &str, e: u64, q: u64) -> (String, String, u64, u64) {
    (d.into(), c.into(), e, q)
}

/// Publishes inference `seq` of `device`/`camera` in `epoch`, to reach the cockpit once.
fn expect(
    cams: &Publisher,
    want: &mut Vec<(String, String, u64, u64)>,
    device: &str,
    camera: &str,
    epoch: u64,
    seq: u64,
) {
    let e = shared_owner().envelope(device, camera, epoch, seq);
    cams.send(&topic(device, camera), e, false);
    want.push(key(device, camera, epoch, seq));
}

/// Waits until the cockpit holds `n` results.
fn wait_results(cockpit: &Messages, what: &str, n: usize, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || {
        on(cockpit, "cockpit/").len() >= n
    });
}

/// Junk of every kind, one per `i`: random bytes, a truncated envelope, an envelope on
/// another camera's topic, an unknown model.
fn junk(o: &Owner, i: u64) -> (String, Vec<u8>) {
    match i % 4 {
        0 => (
            topic("junk", "c0"),
            (0..300).map(|_| rand::random::<u8>()).collect(),
        ),
        1 => {
            let e = o.envelope("junk", "c0", 1, i);
            (topic("junk", "c0"), e[..e.len() / 3].to_vec())
        }
        2 => (topic("other", "c0"), o.envelope("junk", "c0", 1, i)),
        _ => {
            let mut e = o.envelope("junk", "c0", 1, i);
            e[4 + 2 + 1 + 4 + 1 + 2] ^= 0xff; // a byte of the model id
            (topic("junk", "c0"), e)
        }
    }
}

#[test]
fn retained_burst_outage_and_restart_lose_nothing() {
    let o = shared_owner();
    let dir = tempfile::tempdir().unwrap();
    let (port, broker, cockpit, cams) = agent_site(dir.path(), "a");
    let mut want = Vec::new();
    let mut junk_sent = 0usize;
    // no client id: the default must be stable across restarts
    let (cfg, agent) = o.start_agent(
        "agent-a",
        port,
        "",
        "[limits]\nper_device_per_minute = 100000.0\nburst = 100000.0\n",
    );

    // 1. 100 retained messages on inference topics before the agent starts (retained is
    // one message per topic): 50 valid from 50 cameras, 50 junk
    for i in 0..50u64 {
        let cam = format!("r{i}");
        cams.send(&topic("ret", &cam), o.envelope("ret", &cam, 7, 0), true);
        want.push(key("ret", &cam, 7, 0));
        let (_, p) = junk(o, i);
        cams.send(&topic(&format!("rj{i}"), "c0"), p, true);
        junk_sent += 1;
    }
    std::thread::sleep(Duration::from_secs(1));
    wait_results(&cockpit, "the 50 retained inferences", 50, 60);
    wait_for(
        "the 50 retained junk messages",
        Duration::from_secs(60),
        || on(&cockpit, "backend/deadletter").len() >= 50,
    );

    // 2. a burst of 2,000: 500 valid from 5 cameras, 1,500 junk, all at once
    let t0 = Instant::now();
    for i in 0..2000u64 {
        if i % 4 == 0 {
            let cam = format!("b{}", i % 5);
            expect(&cams, &mut want, "burst", &cam, 9, i);
        } else {
            let (t, p) = junk(o, i);
            cams.send(&t, p, false);
            junk_sent += 1;
        }
    }
    wait_results(&cockpit, "the burst's 500 results", 550, 300);
    wait_for(
        "the burst's 1,500 dead letters",
        Duration::from_secs(120),
        || on(&cockpit, "backend/deadletter").len() >= junk_sent,
    );
    eprintln!(
        "burst of 2,000 handled in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // still responsive: one more is handled within seconds
    let t = Instant::now();
    expect(&cams, &mut want, "late", "c0", 9, 1);
    wait_results(&cockpit, "the message after the burst", 551, 10);
    eprintln!("handled {:.2} s after the burst", t.elapsed().as_secs_f64());

    // 3. broker outage; 5 cameras replay a backlog of 200 when it is back
    broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    let broker = Broker::start(dir.path(), port);
    for i in 0..200u64 {
        let cam = format!("o{}", i % 5);
        expect(&cams, &mut want, "outage", &cam, 3, i);
    }
    wait_results(&cockpit, "the backlog's 200 results", 751, 180);

    // 4. SIGTERM: out within 5 s
    let st = stop_agent(agent, Duration::from_secs(5));
    eprintln!("agent stats: {st}");

    // 5. restarted on the same (default) config: what arrived meanwhile is all delivered
    for i in 0..10u64 {
        expect(&cams, &mut want, "down", "c0", 4, i);
    }
    let agent = spawn_agent(&cfg, &[]);
    wait_results(&cockpit, "the 10 sent while the agent was down", 761, 60);
    std::thread::sleep(Duration::from_secs(2)); // nothing more should arrive
    stop_agent(agent, Duration::from_secs(5));
    assert_exactly_once(&cockpit, &want);
    let dead = on(&cockpit, "backend/deadletter");
    assert_eq!(
        dead.len(),
        junk_sent,
        "each junk message dead-lettered once"
    );
    drop(broker);
}

#[test]
fn rate_limit_crash_window_and_outbox_reset() {
    let o = shared_owner();
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker, cockpit, cams) = agent_site(dir.path(), "b");
    let (cfg, agent) = o.start_agent(
        "agent-b",
        port,
        "client_id = \"agent-b\"",
        "[limits]\nper_device_per_minute = 60.0\nburst = 3.0\n",
    );
    let mut want = Vec::new();

    // a crash after decryption, before the result is handed to the broker
    let crashing = spawn_agent(&cfg, &[("FHECAM_FAILPOINT", "agent-after-decrypt")]);
    std::thread::sleep(Duration::from_secs(2));
    expect(&cams, &mut want, "crash", "c0", 5, 0);
    let mut crashing = crashing;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = crashing.proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the failpoint never fired"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "aborted");
    assert!(on(&cockpit, "cockpit/").is_empty());
    wait_for(
        "the crashed inference, redelivered",
        Duration::from_secs(30),
        || !on(&cockpit, "cockpit/").is_empty(),
    );

    // a camera over its rate limit (burst 3, then 1 a second): all 12 arrive, later
    let t = Instant::now();
    for seq in 0..12u64 {
        expect(&cams, &mut want, "fast", "c0", 8, seq);
    }
    wait_results(&cockpit, "the 12 rate-limited results", 13, 60);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(7),
        "the limit held them back: {took:?}"
    );

    // an outbox reset: sequence numbers start again under a new epoch and are new results;
    // a replay of the old epoch is not
    for seq in 0..4u64 {
        expect(&cams, &mut want, "reset", "c0", 100, seq);
    }
    wait_results(&cockpit, "epoch 100", 17, 30);
    for seq in 0..4u64 {
        expect(&cams, &mut want, "reset", "c0", 200, seq);
    }
    cams.send(
        &topic("reset", "c0"),
        o.envelope("reset", "c0", 100, 2),
        false,
    );
    wait_results(&cockpit, "epoch 200", 21, 30);
    std::thread::sleep(Duration::from_secs(2));
    let st = stop_agent(agent, Duration::from_secs(5));
    assert_eq!(st["duplicates"], 1, "the replay: {st}");
    assert!(st["rate_limited"].as_u64().unwrap() >= 1, "{st}");
    assert_exactly_once(&cockpit, &want);
    assert!(
        on(&cockpit, "backend/deadletter").is_empty(),
        "nothing refused: {:?}",
        on(&cockpit, "backend/deadletter")
    );
}

/// `fhecam agent --check` verifies what its help says and writes nothing.
#[test]
fn check_verifies_and_writes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let o = shared_owner();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db_bytes = std::fs::read(&o.db).unwrap();
    let pass_file = |name: &str, text: &str, mode: u32| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let config =
        |name: &str, db: &std::path::Path, state: &std::path::Path, pass: &std::path::Path| {
            let p = d.join(format!("{name}.toml"));
            std::fs::write(
                &p,
                format!(
                    "db = \"{}\"\nstate_db = \"{}\"\npassphrase_file = \"{}\"\n",
                    s(db),
                    s(state),
                    s(pass)
                ),
            )
            .unwrap();
            p
        };
    let check = |cfg: &std::path::Path| {
        let out = bin()
            .args(["agent", "--config", s(cfg), "--check"])
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(101), "no panic");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let state = d.join("state.db");
    let good = pass_file("good.pass", &format!("{PASS}\n"), 0o600);

    let (ok, text) = check(&config("good", &o.db, &state, &good));
    assert!(ok, "{text}");
    assert!(text.contains("every key unseals"), "{text}");
    assert!(
        !state.exists(),
        "the state database is not created by a check"
    );

    let wrong = pass_file("wrong.pass", "not the passphrase at all", 0o600);
    let (ok, text) = check(&config("wrong", &o.db, &state, &wrong));
    assert!(!ok && text.contains("cannot unseal"), "{text}");

    let open = pass_file("open.pass", PASS, 0o644);
    let (ok, text) = check(&config("open", &o.db, &state, &open));
    assert!(
        !ok && text.contains("0644") && text.contains("0600"),
        "{text}"
    );

    let empty = d.join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, text) = check(&config("empty", &empty, &state, &good));
    assert!(!ok && text.contains("schema version 0"), "{text}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0, "left empty");

    let (ok, text) = check(&config("same", &o.db, &o.db, &good));
    assert!(
        !ok && text.contains("state_db is the owner database"),
        "{text}"
    );

    assert_eq!(
        std::fs::read(&o.db).unwrap(),
        db_bytes,
        "the owner database is untouched"
    );
}

/// mosquitto 2.0.11 forgets shared subscriptions when it restarts: agents with
/// `shared = true` renew theirs at every connection, so what is published after the
/// broker is back reaches them.
#[test]
fn a_shared_subscription_is_renewed_after_a_broker_restart() {
    let o = shared_owner();
    let dir = tempfile::tempdir().unwrap();
    let (port, broker) = Broker::on_free_port(dir.path());
    let (_, agent) = o.start_agent(
        "agent-c",
        port,
        "client_id = \"agent-c\"\nshared = true",
        "",
    );
    wait_for("the agent's subscription", Duration::from_secs(20), || {
        agent.log_text().matches("subscribing").count() >= 1
    });
    broker.stop();
    let _broker = Broker::start(dir.path(), port);
    wait_for("the renewed subscription", Duration::from_secs(30), || {
        agent.log_text().matches("subscribing").count() >= 2
    });
    std::thread::sleep(Duration::from_secs(1)); // the SUBACK
    let cockpit = subscribe(port, "cockpit-c", &["cockpit/#"]);
    let cams = Publisher::new(port, "cameras-c");
    let mut want = Vec::new();
    for seq in 0..3u64 {
        expect(&cams, &mut want, "shared", "c0", 6, seq);
    }
    wait_results(&cockpit, "3 results after the restart", 3, 30);
    stop_agent(agent, Duration::from_secs(5));
    assert_exactly_once(&cockpit, &want);
}
