//! End to end through the real binary: `fhecam demo --frames 1` trains the built-in
//! secret-table model (the demo's default: every neuron a table the owner encrypts),
//! protects and deploys it, starts mosquitto, runs the edge daemon on a GStreamer
//! multifilesrc of a real test digit, runs the backend agent, and its cockpit subscriber
//! checks the decrypted label and logits against the plaintext model's; the command fails
//! otherwise.

use std::process::Command;

#[test]
fn frames_daemon_broker_agent_cockpit() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhecam"))
        .args(["demo", "--frames", "1"])
        .env("FHECAM_CACHE_DIR", cache.path())
        .env(
            "FHECAM_DATA_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/data"),
        )
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed");
    assert!(
        stdout.contains("[owner] tables digits model") && stdout.contains("secret lookup tables"),
        "the demo's default model is the secret-table network: {stdout}"
    );
    assert!(
        stdout.contains(
            "1 decrypted by the backend, agreement with the plaintext model (label and logits) 1/1"
        ),
        "{stdout}"
    );
}
