//! End to end through the real binary: `fhecam demo --frames 1 --keep DIR` trains the
//! built-in secret-table model (the demo's default: every neuron a table the owner
//! encrypts), protects and deploys it, starts mosquitto, runs the edge daemon on a
//! GStreamer multifilesrc of a real test digit, runs the backend agent, and its cockpit
//! subscriber checks the decrypted label and logits against the plaintext model's; the
//! command fails otherwise. With `--keep` it stays up: the cockpit page it printed serves
//! the page and lists the demo camera, until SIGINT.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn frames_daemon_broker_agent_cockpit() {
    let cache = tempfile::tempdir().unwrap();
    let keep = cache.path().join("work");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhecam"))
        .args(["demo", "--frames", "1", "--keep"])
        .arg(&keep)
        .env("FHECAM_CACHE_DIR", cache.path())
        .env(
            "FHECAM_DATA_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/data"),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let demo = common::Killed(child);
    let mut lines = Vec::new();
    // training, protection and one encrypted frame: a few minutes on a loaded 2-core host
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let url = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let l = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the demo did not stay up: {lines:#?}"));
        eprintln!("{l}");
        lines.push(l.clone());
        if let Some(rest) = l.strip_prefix("[cockpit] staying up at ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let text = lines.join("\n");
    assert!(
        text.contains("[owner] tables digits model") && text.contains("secret lookup tables"),
        "the demo's default model is the secret-table network: {text}"
    );
    assert!(
        text.contains(
            "1 decrypted by the backend, agreement with the plaintext model (label and logits) 1/1"
        ),
        "{text}"
    );
    assert!(text.contains(&format!("[cockpit] {url}")), "{text}");
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let (status, page) = common::http_get(addr, "/").unwrap();
    assert!(
        status.starts_with("HTTP/1.1 200") && page.contains("fhecam cockpit"),
        "{status}\n{page}"
    );
    let (_, api) = common::http_get(addr, "/api/cameras").unwrap();
    assert!(api.contains("\"device_id\":\"demo-cam\""), "{api}");
    assert!(api.contains("\"results_last_hour\":1"), "{api}");

    demo.signal("-INT");
    let mut demo = demo;
    let status = demo.0.wait().unwrap();
    assert!(status.success(), "the demo exits 0 on Ctrl-C: {status}");
    assert!(
        keep.join("owner.db").exists(),
        "--keep keeps the work directory"
    );
}
