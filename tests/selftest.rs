//! `fhecam selftest` as a device runs it: the real binary, real TFHE, a real GStreamer
//! pipeline. It must pass here, and must fail (non-zero, saying why) on a wrong result or a
//! broken camera pipeline.

use std::process::{Command, Output};

fn selftest(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fhecam"))
        .arg("selftest")
        .args(args)
        .output()
        .expect("run fhecam");
    eprintln!(
        "fhecam selftest {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn selftest_passes_and_reports_every_step() {
    let out = selftest(&[]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for step in [
        "camera",
        "network",
        "preprocess",
        "keygen",
        "infer",
        "check",
    ] {
        assert!(stdout.contains(step), "no `{step}` step in:\n{stdout}");
    }
    assert!(stdout.contains("== plaintext reference, bit for bit"));
    assert!(stdout.contains("selftest passed"));
}

#[test]
fn selftest_fails_on_a_result_that_differs_from_the_reference() {
    let out = selftest(&["--inject-mismatch"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differ from the plaintext reference"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("selftest passed"));
}

#[test]
fn selftest_fails_without_a_frame_before_generating_keys() {
    let out = selftest(&["--pipeline", "nosuchsrc ! appsink"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("selftest step `camera` failed"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("keygen"));
}
