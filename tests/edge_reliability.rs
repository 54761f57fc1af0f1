//! The edge daemon when its disk and its broker fail, through the real binary with a real
//! mosquitto and a real GStreamer pipeline: an outbox on a full file system (a small tmpfs
//! the test mounts) while the broker is down, rotten outbox entries, and a FIFO in place
//! of the bundle. Every inference is published once or left as a counted gap in the
//! sequence numbers, every failure is logged at once, and the daemon recovers on its own.

mod common;

use common::{daemon, log, s, stop_daemon as stop, wait_for, Broker, Messages};
use fhecam::wire::envelope;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIVE: &str = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=32,height=32,framerate=5/1 ! videoconvert ! appsink";
const LONG: Duration = Duration::from_secs(240);

/// An edge config for camera `cam` with its outbox in `outbox`; `bundle` is a copy of the
/// owner's, so a test may replace it.
fn config(o: &common::Owner, cam: &str, port: u16, outbox: &Path) -> PathBuf {
    let bundle = o.dir.join(format!("{cam}.bundle"));
    std::fs::copy(&o.bundle, &bundle).unwrap();
    let p = o.dir.join(format!("{cam}.toml"));
    std::fs::write(
        &p,
        format!(
            "device_id = \"dev1\"\ncamera_id = \"{cam}\"\nbundle = \"{}\"\nowner_key = \"{}\"\n\
             [source]\npipeline = \"{LIVE}\"\n\
             [infer]\ninput_mode = \"device-clear\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nstats_interval_s = 0.5\n\
             reconnect_backoff_initial_s = 0.2\nreconnect_backoff_max_s = 1.0\n\
             [outbox]\ndir = \"{}\"\n",
            s(&bundle),
            s(&o.dir.join("keys/owner.pub")),
            s(outbox)
        ),
    )
    .unwrap();
    p
}

/// Sequence numbers received on the camera's inference topic (duplicates removed).
fn sequences(msgs: &Messages, cam: &str) -> BTreeSet<u64> {
    msgs.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t == format!("fhecam/dev1/{cam}/inference"))
        .map(|(_, p)| envelope::decode(p).unwrap().sequence)
        .collect()
}

/// The last stats message of the camera.
fn status(msgs: &Messages, cam: &str) -> serde_json::Value {
    common::on(msgs, &format!("fhecam/dev1/{cam}/stats"))
        .pop()
        .unwrap_or_default()
}

/// A tmpfs of `size` mounted on `dir`, unmounted on drop. The test needs mount privileges
/// (root on Linux): without them it fails, saying so.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .args(["tmpfs", s(dir)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill the outbox's file system and needs the \
             privilege to: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.into())
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", s(&self.0)]).status();
    }
}

#[test]
fn a_full_outbox_and_a_broker_outage_lose_nothing_unseen_and_recover_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::owner(dir.path());
    let fs = Tmpfs::mount(&dir.path().join("small"), "4m");
    let (port, broker) = Broker::on_free_port(dir.path());
    let msgs = common::subscribe(port, "test-sub", &["fhecam/#"]);
    let cfg = config(&o, "full", port, &fs.0.join("outbox"));
    let (child, log_path) = daemon(&cfg);
    wait_for("the first inference", LONG, || {
        !sequences(&msgs, "full").is_empty()
    });

    // the broker goes down and the outbox's file system fills up
    broker.stop();
    let filler = fs.fill();
    wait_for("the outbox write error in the log", LONG, || {
        log(&log_path).contains("outbox: cannot store an inference")
    });
    let text = log(&log_path);
    assert!(text.contains("No space left on device"), "{text}");
    // more inferences finish meanwhile: kept in memory (or dropped as counted gaps)
    let before = text.matches("inference done").count();
    wait_for("two more inferences", LONG, || {
        log(&log_path).matches("inference done").count() >= before + 2
    });

    // space and broker come back: the same process publishes what it kept
    std::fs::remove_file(filler).unwrap();
    let _broker = Broker::start(dir.path(), port);
    let done = log(&log_path).matches("inference done").count() as u64;
    wait_for("everything finished so far published", LONG, || {
        let st = status(&msgs, "full");
        st["published"].as_u64().unwrap_or(0) + st["outbox_dropped"].as_u64().unwrap_or(0) >= done
            && st["outbox_errors"].as_u64().unwrap_or(0) >= 1
    });
    assert!(log(&log_path).contains("outbox: writing again"));

    let stats = stop(child, &log_path);
    assert!(stats.mqtt_connections >= 2, "{stats:?}");
    assert!(stats.outbox_errors >= 1, "{stats:?}");
    assert_eq!(stats.outbox_pending, 0, "{stats:?}");
    assert_eq!(
        stats.published + stats.outbox_dropped,
        stats.inferences,
        "{stats:?}"
    );
    // every sequence number up to the last is published once or a counted gap
    wait_for(
        "the last inferences delivered",
        Duration::from_secs(30),
        || sequences(&msgs, "full").len() as u64 == stats.published,
    );
    let seqs = sequences(&msgs, "full");
    let last = *seqs.last().unwrap();
    assert_eq!(last + 1, stats.published + stats.outbox_dropped, "{seqs:?}");
}

#[test]
fn rotten_outbox_entries_are_set_aside_and_a_fifo_bundle_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::owner(dir.path());
    let (port, broker) = Broker::on_free_port(dir.path());
    let msgs = common::subscribe(port, "test-sub", &["fhecam/#"]);
    // a previous run left an entry over the envelope limit and a directory named like one
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    let big = outbox.join(format!("{:020}.env", 0));
    std::fs::write(&big, vec![0u8; envelope::MAX_ENVELOPE_BYTES + 1]).unwrap();
    std::fs::create_dir(outbox.join(format!("{:020}.env", 1))).unwrap();
    let cfg = config(&o, "rot", port, &outbox);
    let (child, log_path) = daemon(&cfg);

    wait_for("an inference", LONG, || !sequences(&msgs, "rot").is_empty());
    let text = log(&log_path);
    assert!(text.contains(&format!("{}", big.display())), "{text}");
    assert!(outbox.join(format!("{:020}.env.bad", 0)).is_file());
    assert!(outbox.join(format!("{:020}.env.bad", 1)).is_dir());
    // the rotten entries' numbers are never reused
    assert!(sequences(&msgs, "rot").iter().all(|&s| s >= 2));

    // an entry deleted by hand while the broker is away (one stored after the daemon saw
    // the broker go: never handed to the MQTT client)
    broker.stop();
    let entries = || -> BTreeSet<PathBuf> {
        std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "env"))
            .collect()
    };
    wait_for("the broker outage in the log", LONG, || {
        log(&log_path).contains("kept in the outbox")
    });
    let old = entries();
    wait_for("a new entry waiting in the outbox", LONG, || {
        entries().difference(&old).next().is_some()
    });
    let gone = entries().difference(&old).next().unwrap().clone();
    std::fs::remove_file(&gone).unwrap();
    let gone_seq: u64 = gone.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let _broker = Broker::start(dir.path(), port);
    wait_for("an inference after the deleted one", LONG, || {
        sequences(&msgs, "rot").iter().any(|&s| s > gone_seq)
    });
    wait_for("three entries set aside, in the stats", LONG, || {
        status(&msgs, "rot")["outbox_quarantined"].as_u64() == Some(3)
    });
    assert!(log(&log_path).contains(&format!("{}", gone.display())));
    assert!(!sequences(&msgs, "rot").contains(&gone_seq));

    // the bundle file replaced by a FIFO, then SIGHUP: refused at once, nothing blocks
    let bundle = o.dir.join("rot.bundle");
    std::fs::remove_file(&bundle).unwrap();
    let c = std::ffi::CString::new(s(&bundle)).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    wait_for("the FIFO refused", LONG, || {
        log(&log_path).contains("not a regular file")
    });
    let last = *sequences(&msgs, "rot").last().unwrap();
    wait_for("an inference after the SIGHUP", LONG, || {
        sequences(&msgs, "rot").iter().any(|&s| s > last)
    });
    let stats = stop(child, &log_path);
    assert_eq!(stats.outbox_quarantined, 3, "{stats:?}");
    assert!(stats.intake_errors >= 1, "{stats:?}");
}
