//! The Prometheus endpoints of the camera daemon and the agent, scraped while they run
//! against a real mosquitto: `promtool check metrics` (Debian's prometheus package) accepts
//! both, and the counters equal what happened — one inference on the camera (its PBS,
//! its model), and on the agent every decryption by model and every refusal by code,
//! equal to the agent's own closing stats.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn scrape(port: u16) -> Option<String> {
    let (status, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics").ok()?;
    status.starts_with("HTTP/1.1 200").then_some(body)
}

/// Scrapes `port` until `done` holds for the text (the last text scraped).
fn scrape_until(what: &str, port: u16, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    wait_for(what, timeout, || {
        text = scrape(port).unwrap_or_default();
        done(&text)
    });
    text
}

/// The value of the sample `name` (with its labels, as written) in `text`.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn promtool(text: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed by scripts/setup.sh");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn camera_and_agent_metrics_count_what_happened_and_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), free_port());
    let o = owner(dir.path());

    let agent_port = free_port();
    let acfg = o.agent_config(
        "agent",
        broker.port,
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{agent_port}\""),
    );
    let agent = spawn_agent(&acfg, &[]);
    wait_for("the agent's subscription", Duration::from_secs(30), || {
        agent.log_text().contains("subscribing")
    });

    // one inference: the interval gate lets the first frame through and no other
    let cam_port = free_port();
    let ecfg = dir.path().join("edge.toml");
    std::fs::write(
        &ecfg,
        format!(
            "device_id = \"dev1\"\ncamera_id = \"cam0\"\nbundle = \"{}\"\nowner_key = \"{}\"\n\
             [source]\npipeline = \"videotestsrc pattern=ball ! video/x-raw,width=64,height=64,framerate=10/1 ! videoconvert ! appsink\"\n\
             [preprocess]\nsample_interval_s = 3600.0\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\nstats_interval_s = 1.0\n\
             [outbox]\ndir = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{cam_port}\"\n",
            s(&o.bundle),
            s(&dir.path().join("keys/owner.pub")),
            broker.port,
            s(&dir.path().join("outbox")),
        ),
    )
    .unwrap();
    let (cam, cam_log) = daemon(&ecfg);
    let cam_text = scrape_until(
        "the camera's published inference",
        cam_port,
        Duration::from_secs(120),
        |t| value(t, "fhecam_camera_published_total") == Some(1.0),
    );
    promtool(&cam_text);
    let pbs: f64 = log(&cam_log)
        .lines()
        .find_map(|l| {
            l.split("inference done: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("the daemon logs the PBS of its inference");
    assert_eq!(
        value(&cam_text, "fhecam_camera_inferences_total"),
        Some(1.0)
    );
    assert_eq!(value(&cam_text, "fhecam_camera_pbs_total"), Some(pbs));
    assert_eq!(
        value(&cam_text, "fhecam_camera_inference_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(value(&cam_text, "fhecam_camera_mqtt_connected"), Some(1.0));
    assert_eq!(value(&cam_text, "fhecam_camera_outbox_entries"), Some(0.0));
    let info = format!(
        "fhecam_camera_model_info{{model_id=\"{}\",model_name=\"tiny\",model_version=\"1\",input_mode=\"encrypted\"}}",
        o.id
    );
    assert_eq!(value(&cam_text, &info), Some(1.0), "{cam_text}");
    let closing = stop_daemon(cam, &cam_log);
    assert_eq!(closing.inferences, 1);
    assert_eq!(closing.published, 1);

    // the agent: the camera's inference, four more, two malformed
    let publisher = Publisher::new(broker.port, "metrics-test");
    for seq in 0..4 {
        publisher.send(
            "fhecam/dev9/cam0/inference",
            o.envelope("dev9", "cam0", 1, seq),
            false,
        );
    }
    for _ in 0..2 {
        publisher.send("fhecam/dev9/cam0/inference", b"junk".to_vec(), false);
    }
    let decrypted = format!("fhecam_agent_decrypted_total{{model_id=\"{}\"}}", o.id);
    let refused = "fhecam_agent_refused_total{code=\"malformed_envelope\"}";
    let agent_text = scrape_until(
        "the agent's decryptions and refusals",
        agent_port,
        Duration::from_secs(60),
        |t| value(t, &decrypted) == Some(5.0) && value(t, refused) == Some(2.0),
    );
    promtool(&agent_text);
    assert_eq!(
        value(&agent_text, "fhecam_agent_envelopes_received_total"),
        Some(7.0)
    );
    assert_eq!(
        value(&agent_text, "fhecam_agent_dead_letters_total"),
        Some(2.0)
    );
    assert_eq!(
        value(&agent_text, "fhecam_agent_decrypt_duration_seconds_count"),
        Some(5.0)
    );
    assert_eq!(value(&agent_text, "fhecam_agent_mqtt_connected"), Some(1.0));
    // every series the Grafana dashboard in docs/ queries is one of these
    let dashboard = include_str!("../docs/grafana-dashboard.json");
    let mut queried = 0;
    for (i, _) in dashboard.match_indices("fhecam_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name == "fhecam_" || name.starts_with("fhecam_fleet") {
            continue;
        }
        queried += 1;
        let served = |t: &str| {
            t.lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        };
        assert!(
            served(&cam_text) || served(&agent_text),
            "the dashboard queries {name}, which neither endpoint serves"
        );
    }
    assert!(queried >= 10, "{queried} series queried");
    let stats = stop_agent(agent, Duration::from_secs(30));
    assert_eq!(stats["received"], 7);
    assert_eq!(stats["decrypted"], 5);
    assert_eq!(stats["dead_lettered"], 2);
}
