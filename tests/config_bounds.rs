//! Every numeric and string field of the three configurations, set to out-of-range and
//! hostile values through the real binary (`fhecam validate`, `fhecam agent --check`,
//! `fhecam cockpit --check`): each is refused
//! with an error naming the field, and nothing panics. Values that are legitimately valid
//! (0 for `sample_interval_s`, an empty password) are not refused for that field.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// (section, key, TOML value); section "" is the top level.
type Fields = Vec<(&'static str, &'static str, String)>;

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out += &format!("\\u{:04X}", c as u32),
            c => out.push(c),
        }
    }
    out + "\""
}

/// A valid `[mqtt]` connection named `client_id`, as in every configuration.
fn mqtt_base(client_id: &str) -> Fields {
    vec![
        ("mqtt", "host", q("localhost")),
        ("mqtt", "port", "1883".into()),
        ("mqtt", "client_id", q(client_id)),
        ("mqtt", "keep_alive_s", "30".into()),
        ("mqtt", "reconnect_backoff_initial_s", "0.5".into()),
        ("mqtt", "reconnect_backoff_max_s", "30.0".into()),
        ("mqtt", "username", q("user")),
        ("mqtt", "password", q("pass")),
    ]
}

/// The topics of a valid agent or cockpit configuration.
fn roles_base() -> Fields {
    vec![
        ("mqtt", "edge_prefix", q("fhecam")),
        ("mqtt", "cockpit_prefix", q("cockpit")),
        ("mqtt", "dead_letter_topic", q("backend/deadletter")),
    ]
}

fn edge_base(d: &Path) -> Fields {
    let p = |n: &str| q(d.join(n).to_str().unwrap());
    let mut f = mqtt_base("cam-1");
    f.extend([
        ("", "device_id", q("dev1")),
        ("", "camera_id", q("cam0")),
        ("", "bundle", p("missing.bundle")),
        ("", "owner_key", p("owner.pub")),
        (
            "source",
            "pipeline",
            q("videotestsrc ! videoconvert ! appsink"),
        ),
        ("source", "stall_timeout_s", "10.0".into()),
        ("source", "restart_backoff_initial_s", "1.0".into()),
        ("source", "restart_backoff_max_s", "60.0".into()),
        ("preprocess", "sample_interval_s", "0.5".into()),
        ("preprocess", "motion_threshold", "0.1".into()),
        ("infer", "max_in_flight", "1".into()),
        ("infer", "threads", "2".into()),
        ("infer", "drain_timeout_s", "120.0".into()),
        ("infer", "input_mode", q("encrypted")),
        ("mqtt", "topic_prefix", q("fhecam")),
        ("mqtt", "stats_interval_s", "60.0".into()),
        ("outbox", "dir", p("outbox")),
        ("outbox", "max_entries", "10".into()),
        ("deploy", "state_dir", p("state")),
        ("deploy", "push", "true".into()),
        ("deploy", "drop_dir", p("drop")),
        ("deploy", "scan_interval_s", "2.0".into()),
        ("deploy", "keep_refused", "16".into()),
        ("metrics", "listen", q("127.0.0.1:9464")),
    ]);
    f
}

fn agent_base(d: &Path) -> Fields {
    let p = |n: &str| q(d.join(n).to_str().unwrap());
    let mut f = [mqtt_base("agent-1"), roles_base()].concat();
    f.extend([
        ("", "db", p("owner.db")),
        ("", "state_db", p("state.db")),
        ("", "passphrase_file", p("pass")),
        ("", "logits_for", "[]".into()),
        ("mqtt", "group", q("fhecam-agents")),
        ("limits", "max_payload_bytes", "60000".into()),
        ("limits", "per_device_per_minute", "60.0".into()),
        ("limits", "burst", "10.0".into()),
        ("limits", "max_held", "64".into()),
        ("metrics", "listen", q("127.0.0.1:9465")),
    ]);
    f
}

fn cockpit_base() -> Fields {
    let mut f = [mqtt_base("cockpit-1"), roles_base()].concat();
    f.extend([
        ("http", "listen", q("127.0.0.1:9480")),
        ("http", "allow_remote", "false".into()),
        ("limits", "max_cameras", "1000".into()),
        ("limits", "max_payload_bytes", "1048576".into()),
        ("limits", "max_streams", "64".into()),
    ]);
    f
}

/// `fields` with `section.key` set to `value` (added when absent), as TOML.
fn render(fields: &Fields, section: &'static str, key: &'static str, value: &str) -> String {
    let mut f = fields.clone();
    match f.iter_mut().find(|(s, k, _)| *s == section && *k == key) {
        Some(e) => e.2 = value.to_string(),
        None => f.push((section, key, value.to_string())),
    }
    let mut sections: Vec<&str> = vec![""];
    for (s, _, _) in &f {
        if !sections.contains(s) {
            sections.push(s);
        }
    }
    let mut out = String::new();
    for s in sections {
        if !s.is_empty() {
            out += &format!("[{s}]\n");
        }
        for (_, k, v) in f.iter().filter(|(fs, _, _)| *fs == s) {
            out += &format!("{k} = {v}\n");
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Float,
    Int,
    Str,
    Path,
}

/// The values tried for a field of `kind`.
fn values(kind: Kind) -> Vec<String> {
    let huge = q(&"x".repeat(100 * 1024));
    match kind {
        Kind::Float | Kind::Int => vec![
            "1e20".into(),
            "inf".into(),
            "-inf".into(),
            "nan".into(),
            "-1".into(),
            "0".into(),
            "\"\"".into(),
            huge,
        ],
        Kind::Str => vec!["\"\"".into(), huge, q("a\u{0}b")],
        Kind::Path => vec!["\"\"".into(), huge, q("a\u{0}b")],
    }
}

struct Case {
    what: &'static str,
    toml: String,
    /// Dotted field name expected in the refusal, or that must not be blamed when `valid`.
    field: String,
    valid: bool,
}

/// The broker connection's fields: the same in the edge's, the agent's and the cockpit's
/// configurations.
const MQTT_CONNECTION: &[(&str, &str, Kind)] = &[
    ("mqtt", "host", Kind::Str),
    ("mqtt", "port", Kind::Int),
    ("mqtt", "client_id", Kind::Str),
    ("mqtt", "keep_alive_s", Kind::Int),
    ("mqtt", "reconnect_backoff_initial_s", Kind::Float),
    ("mqtt", "reconnect_backoff_max_s", Kind::Float),
    ("mqtt", "username", Kind::Str),
    ("mqtt", "password", Kind::Str),
    ("mqtt.tls", "ca", Kind::Path),
];

/// The topics the agent and the cockpit agree on.
const MQTT_ROLES: &[(&str, &str, Kind)] = &[
    ("mqtt", "edge_prefix", Kind::Str),
    ("mqtt", "cockpit_prefix", Kind::Str),
    ("mqtt", "dead_letter_topic", Kind::Str),
];

fn cases(
    what: &'static str,
    base: &Fields,
    fields: &[(&'static str, &'static str, Kind)],
    extra: &[(&'static str, &'static str, &str)],
    valid: &[(&str, &str)],
) -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |section: &'static str, key: &'static str, v: &str| {
        let field = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        out.push(Case {
            what,
            toml: render(base, section, key, v),
            valid: valid.contains(&(field.as_str(), v)),
            field,
        });
    };
    for &(section, key, kind) in fields {
        for v in values(kind) {
            add(section, key, &v);
        }
    }
    for &(section, key, v) in extra {
        add(section, key, v);
    }
    out
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhecam"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // only the file under test configures the binary
    for (k, _) in std::env::vars() {
        if k.starts_with("FHECAM_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    // read stderr meanwhile: an error quoting a 100 KB value fills the pipe
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).unwrap();
        buf
    });
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("fhecam {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    (status.code(), String::from_utf8_lossy(&err).into_owned())
}

/// Runs every case (4 at a time) and returns the failures.
fn check_all(dir: &Path, cases: Vec<Case>) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..4 {
            let (next, failures, cases) = (&next, &failures, &cases);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let file = dir.join(format!("case-{w}.toml"));
                std::fs::write(&file, &c.toml).unwrap();
                let f = file.to_str().unwrap();
                let (code, err) = match c.what {
                    "edge" => run(&["validate", "--config", f]),
                    "cockpit" => run(&["cockpit", "--config", f, "--check"]),
                    _ => run(&["agent", "--config", f, "--check"]),
                };
                let value = c
                    .toml
                    .lines()
                    .find(|l| l.starts_with(c.field.rsplit('.').next().unwrap()))
                    .map(|l| l.chars().take(60).collect::<String>())
                    .unwrap_or_default();
                let short: String = err.chars().take(300).collect();
                let problem = if code.is_none() || code == Some(101) || err.contains("panicked") {
                    Some("panicked or killed")
                } else if c.valid && err.contains(&c.field) {
                    Some("valid value refused")
                } else if !c.valid && code == Some(0) {
                    Some("accepted")
                } else if !c.valid && !err.contains(&c.field) {
                    Some("error does not name the field")
                } else {
                    None
                };
                if let Some(p) = problem {
                    failures.lock().unwrap().push(format!(
                        "{} {} [{value}]: {p} (exit {code:?}): {short}",
                        c.what, c.field
                    ));
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn every_field_is_bounded_and_named() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    use Kind::*;
    let edge = cases(
        "edge",
        &edge_base(dir),
        &[
            MQTT_CONNECTION,
            &[
                ("mqtt", "topic_prefix", Str),
                ("mqtt", "stats_interval_s", Float),
            ],
            &[
                ("", "device_id", Str),
                ("", "camera_id", Str),
                ("", "bundle", Path),
                ("", "owner_key", Path),
                ("source", "pipeline", Str),
                ("source", "stall_timeout_s", Float),
                ("source", "restart_backoff_initial_s", Float),
                ("source", "restart_backoff_max_s", Float),
                ("preprocess", "sample_interval_s", Float),
                ("preprocess", "motion_threshold", Float),
                ("infer", "max_in_flight", Int),
                ("infer", "threads", Int),
                ("infer", "drain_timeout_s", Float),
                ("outbox", "dir", Path),
                ("outbox", "max_entries", Int),
                ("deploy", "state_dir", Path),
                ("deploy", "drop_dir", Path),
                ("deploy", "scan_interval_s", Float),
                ("deploy", "keep_refused", Int),
                ("metrics", "listen", Str),
            ],
        ]
        .concat(),
        &[
            ("mqtt", "port", "70000"),
            ("mqtt", "keep_alive_s", "70000"),
            ("mqtt", "keep_alive_s", "4"),
            ("mqtt", "host", "\"a b\""),
            ("mqtt", "host", &q(&"h".repeat(254))),
            ("mqtt", "client_id", &q(&"c".repeat(65))),
            ("mqtt", "client_id", "\"a/b\""),
            ("mqtt", "reconnect_backoff_initial_s", "31.0"),
            ("source", "restart_backoff_initial_s", "61.0"),
            ("mqtt", "stats_interval_s", "86401"),
            ("infer", "threads", "100000000"),
            ("infer", "max_in_flight", "65"),
            ("infer", "input_mode", "\"plain\""),
            ("infer", "input_mode", "3"),
            ("outbox", "max_entries", "1000001"),
            ("preprocess", "motion_threshold", "1.5"),
            ("source", "pipeline", "\"videotestsrc ! fakesink\""),
            ("mqtt.tls", "ca", "\"/nonexistent/ca.pem\""),
            ("", "device_id", "\"_deploy\""),
            ("deploy", "scan_interval_s", "3601"),
            ("deploy", "keep_refused", "10001"),
            ("deploy", "push", "\"maybe\""),
            ("metrics", "listen", "\"0.0.0.0:9464\""),
            ("metrics", "listen", "\"127.0.0.1:70000\""),
            ("metrics", "allow_remote", "\"maybe\""),
        ],
        &[
            ("preprocess.sample_interval_s", "0"),
            ("preprocess.motion_threshold", "0"),
            ("infer.threads", "0"),
            // the config crate rounds a float into an integer field (`as`): NaN and -inf
            // become 0, which is "one thread per core"
            ("infer.threads", "nan"),
            ("infer.threads", "-inf"),
            ("infer.drain_timeout_s", "0"),
            ("infer.input_mode", "\"device-clear\""),
            // 0 keeps no refused file; NaN and -inf become 0 as above
            ("deploy.keep_refused", "0"),
            ("deploy.keep_refused", "nan"),
            ("deploy.keep_refused", "-inf"),
            ("mqtt.password", "\"\""),
        ],
    );
    let model = "0123456789abcdef0123456789abcdef";
    let many = format!("[{}]", vec![q(model); 10_001].join(","));
    let huge_list = format!("[{}]", q(&"x".repeat(100 * 1024)));
    let agent = cases(
        "agent",
        &agent_base(dir),
        &[
            MQTT_CONNECTION,
            MQTT_ROLES,
            &[
                ("", "db", Path),
                ("", "state_db", Path),
                ("", "passphrase_file", Path),
                ("mqtt", "group", Str),
                ("limits", "max_payload_bytes", Int),
                ("limits", "per_device_per_minute", Float),
                ("limits", "burst", Float),
                ("limits", "max_held", Int),
                ("metrics", "listen", Str),
            ],
        ]
        .concat(),
        &[
            ("", "logits_for", "[\"\"]"),
            ("", "logits_for", &huge_list),
            ("", "logits_for", &many),
            ("", "logits_for", "-1"),
            ("mqtt", "port", "70000"),
            ("mqtt", "keep_alive_s", "70000"),
            ("mqtt", "dead_letter_topic", "\"$share/g/x\""),
            ("mqtt", "dead_letter_topic", "\"cockpit/x\""),
            ("mqtt", "dead_letter_topic", "\"fhecam/x\""),
            ("mqtt", "dead_letter_topic", "\"a/+/b\""),
            ("mqtt", "dead_letter_topic", "\"a/#\""),
            ("mqtt", "group", &q(&"g".repeat(65))),
            ("limits", "per_device_per_minute", "2e6"),
            ("limits", "burst", "0.5"),
            ("limits", "max_payload_bytes", "1e9"),
            ("limits", "max_held", "1"),
            ("limits", "max_held", "5000"),
            ("metrics", "listen", "\"0.0.0.0:9465\""),
            ("metrics", "listen", "\"localhost\""),
            ("mqtt.tls", "ca", "\"/nonexistent/ca.pem\""),
        ],
        &[("mqtt.password", "\"\"")],
    );
    let cockpit = cases(
        "cockpit",
        &cockpit_base(),
        &[
            MQTT_CONNECTION,
            MQTT_ROLES,
            &[
                ("http", "listen", Str),
                ("limits", "max_cameras", Int),
                ("limits", "max_payload_bytes", Int),
                ("limits", "max_streams", Int),
            ],
        ]
        .concat(),
        &[
            ("mqtt", "port", "70000"),
            ("mqtt", "dead_letter_topic", "\"cockpit/x\""),
            ("mqtt", "dead_letter_topic", "\"a/#\""),
            ("mqtt", "cockpit_prefix", "\"fhecam\""),
            ("http", "listen", "\"0.0.0.0:9480\""),
            ("http", "listen", "\"127.0.0.1:70000\""),
            ("http", "listen", "\"localhost\""),
            ("http", "allow_remote", "\"maybe\""),
            ("limits", "max_cameras", "100001"),
            ("limits", "max_payload_bytes", "1023"),
            ("limits", "max_payload_bytes", "16777217"),
            ("limits", "max_streams", "10001"),
            ("mqtt.tls", "ca", "\"/nonexistent/ca.pem\""),
        ],
        &[("mqtt.password", "\"\"")],
    );
    let n = edge.len() + agent.len() + cockpit.len();
    let t = Instant::now();
    let mut failures = check_all(dir, edge);
    failures.extend(check_all(dir, agent));
    failures.extend(check_all(dir, cockpit));
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{n} cases in {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn client_cert_and_key_go_together() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("edge.toml");
    let base = edge_base(d.path());
    let toml = render(&base, "mqtt.tls", "ca", "\"/nonexistent/ca.pem\"")
        + "client_cert = \"/nonexistent/c.pem\"\n";
    std::fs::write(&f, toml).unwrap();
    let (code, err) = run(&["validate", "--config", f.to_str().unwrap()]);
    assert!(code.is_some_and(|c| c != 0 && c != 101), "{err}");
    assert!(err.contains("mqtt.tls.client_key"), "{err}");
}
