//! The cockpit page in a real browser: mosquitto on a free port, the real agent decrypting
//! real encrypted inferences, `fhecam cockpit`, and Debian's headless Chromium driven over
//! the DevTools protocol. The page must show each camera's label and model version, turn a
//! camera offline when its last will arrives — live, without a reload — and show a device
//! id holding markup as text. The screenshot it takes is docs/cockpit.png
//! (`FHECAM_UPDATE_DOCS=1` writes it there).

mod common;

use common::*;
use rumqttc::{Client, LastWill, MqttOptions, QoS};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A camera's MQTT presence: retained `online` with a last will `offline`; `die` drops the
/// TCP connection without DISCONNECT, so the broker publishes the will.
struct Presence {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Presence {
    fn start(port: u16, device: &str, camera: &str, status: Option<String>) -> Presence {
        let avail = format!("fhecam/{device}/{camera}/availability");
        let mut o = MqttOptions::new(format!("presence-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_last_will(LastWill::new(&avail, "offline", QoS::AtLeastOnce, true));
        let (client, mut conn) = Client::new(o, 16);
        client
            .publish(&avail, QoS::AtLeastOnce, true, "online")
            .unwrap();
        if let Some(s) = status {
            let t = format!("fhecam/{device}/{camera}/stats");
            client.publish(t, QoS::AtLeastOnce, true, s).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let _client = client;
            while !st.load(Ordering::Relaxed) {
                let _ = conn.recv_timeout(Duration::from_millis(100));
            }
            // dropping the connection closes the socket without DISCONNECT
        });
        Presence {
            stop,
            thread: Some(thread),
        }
    }

    fn die(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
    }
}

/// The retained status a camera running `owner`'s model publishes.
fn status(o: &Owner) -> String {
    serde_json::to_string(&fhecam::wire::Status {
        counters: Default::default(),
        model_id: o.id.clone(),
        model_name: "tiny".into(),
        model_version: o.header.version,
        input_mode: "encrypted".into(),
        sent_unix_ms: fhecam::ids::unix_now_ms(),
    })
    .unwrap()
}

/// An inference of `o`'s model from `device`/cam0, captured 1.5 s ago.
fn inference(o: &Owner, device: &str, seq: u64) -> Vec<u8> {
    fhecam::wire::envelope::encode(&fhecam::wire::envelope::Envelope {
        device_id: device.into(),
        camera_id: "cam0".into(),
        model_id: o.header.model_id,
        model_version: o.header.version,
        sequence: seq,
        epoch: 1,
        frame_timestamp_ms: fhecam::ids::unix_now_ms() - 1500,
        ciphertext: o.ciphertext.clone(),
    })
    .unwrap()
}

/// Headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    _proc: Killed,
    _profile: tempfile::TempDir,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next_id: u64,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,520",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium is installed by scripts/setup.sh");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = loop {
            let l = lines
                .next()
                .expect("chromium exited before printing its DevTools address")
                .unwrap();
            if let Some(u) = l.strip_prefix("DevTools listening on ") {
                break u.trim().to_string();
            }
        };
        // keep draining chromium's log so it never blocks on a full pipe
        std::thread::spawn(move || for _ in lines {});
        let base = browser_ws.split("/devtools/").next().unwrap().to_string();
        let (mut bws, _) = tungstenite::connect(&browser_ws).unwrap();
        let target = call(
            &mut bws,
            1,
            "Target.createTarget",
            r#"{"url":"about:blank"}"#,
        );
        let id = target["targetId"].as_str().unwrap().to_string();
        let (ws, _) = tungstenite::connect(format!("{base}/devtools/page/{id}")).unwrap();
        Browser {
            _proc: Killed(child),
            _profile: profile,
            ws,
            next_id: 1,
        }
    }

    fn call(&mut self, method: &str, params: &str) -> serde_json::Value {
        self.next_id += 1;
        call(&mut self.ws, self.next_id, method, params)
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", &format!(r#"{{"url":"{url}"}}"#));
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let p = serde_json::json!({"expression": expr, "returnByValue": true});
        self.call("Runtime.evaluate", &p.to_string())["result"]["value"].clone()
    }

    /// The rows of the cameras table as the page renders them: (device, camera, text of
    /// each cell).
    fn rows(&mut self) -> Vec<(String, String, Vec<String>)> {
        let v = self.eval(
            "Array.from(document.querySelectorAll('#cameras tbody tr')).map(r => \
             [r.dataset.device, r.dataset.camera, Array.from(r.cells).map(c => c.textContent)])",
        );
        let Some(rows) = v.as_array() else {
            return Vec::new();
        };
        rows.iter()
            .map(|r| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
                let cells = r[2].as_array().unwrap().iter().map(s).collect();
                (s(&r[0]), s(&r[1]), cells)
            })
            .collect()
    }

    fn row(&mut self, device: &str) -> Option<Vec<String>> {
        self.rows()
            .into_iter()
            .find(|(d, _, _)| d == device)
            .map(|(_, _, c)| c)
    }

    fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", r#"{"format":"png"}"#);
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }
}

/// One DevTools command and its result (events in between are skipped).
fn call<S: Read + Write>(
    ws: &mut tungstenite::WebSocket<S>,
    id: u64,
    method: &str,
    params: &str,
) -> serde_json::Value {
    let msg = format!(r#"{{"id":{id},"method":"{method}","params":{params}}}"#);
    ws.send(tungstenite::Message::text(msg)).unwrap();
    loop {
        let m = ws.read().unwrap();
        let Ok(text) = m.to_text() else { continue };
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        if v["id"].as_u64() == Some(id) {
            assert!(v.get("error").is_none(), "{method}: {v}");
            return v["result"].clone();
        }
    }
}

/// `GET path` on the cockpit: (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    http_get(&format!("127.0.0.1:{port}"), path).unwrap()
}

#[test]
fn page_shows_labels_versions_offline_cameras_and_markup_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), free_port());
    let o = owner(dir.path());
    let agent = spawn_agent(
        &o.agent_config("agent", broker.port, "", ""),
        &[("FHECAM_OWNER_PASSPHRASE", PASS)],
    );

    let http = free_port();
    let cfg = dir.path().join("cockpit.toml");
    std::fs::write(
        &cfg,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            broker.port
        ),
    )
    .unwrap();
    let _cockpit = Killed(
        bin()
            .args(["cockpit", "--config", s(&cfg)])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("cockpit.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the cockpit's page", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", http)).is_ok()
    });

    let cam_a = Presence::start(broker.port, "cam-a", "cam0", Some(status(&o)));
    let cam_b = Presence::start(broker.port, "cam-b", "cam0", Some(status(&o)));
    let evil_device = "<script>document.title='owned'</script>";
    let evil_camera = "<img src=x onerror=alert(1)>";
    let publisher = Publisher::new(broker.port, "test-publisher");
    publisher.send(
        &format!(
            "fhecam/{}/{evil_camera}/availability",
            evil_device.replace('/', "")
        ),
        b"online".to_vec(),
        true,
    );
    // a real inference, decrypted by the agent, and one it refuses
    wait_for("the agent's subscription", Duration::from_secs(30), || {
        agent.log_text().contains("subscribing")
    });
    std::thread::sleep(Duration::from_secs(1)); // its SUBACK
    publisher.send(
        "fhecam/cam-a/cam0/inference",
        inference(&o, "cam-a", 0),
        false,
    );
    publisher.send(
        "fhecam/cam-a/cam0/inference",
        b"not an envelope".to_vec(),
        false,
    );

    let mut b = Browser::start();
    b.goto(&format!("http://127.0.0.1:{http}/"));
    let label = o.label.to_string();
    let t = Instant::now();
    let row_a = loop {
        if let Some(r) = b.row("cam-a") {
            if r[3] == label && r[6] == "1 results, 1 refused" {
                break r;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the page never showed cam-a's decrypted label {label} and its refusal: {:?}\n{}",
            b.rows(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(row_a[1].contains("online"), "{row_a:?}");
    assert_eq!(row_a[2], format!("tiny v{}encrypted", o.header.version));
    assert!(row_a[5].ends_with(" s"), "latency: {row_a:?}");

    // markup in ids is text: the cell shows it literally and nothing was injected
    let evil = evil_device.replace('/', "");
    let row_x = b.row(&evil).expect("the camera whose id holds markup");
    assert_eq!(row_x[0], format!("{evil}{evil_camera}"));
    assert_eq!(
        b.eval("document.querySelectorAll('#cameras img, #cameras tbody script').length"),
        0
    );
    assert_eq!(b.eval("document.title"), "fhecam cockpit");

    // cam-b's connection dies: the broker publishes its will, the open page turns it
    // offline by itself (server-sent events, no reload)
    assert!(b.row("cam-b").unwrap()[1].contains("online"));
    b.eval("window.__same_page = true");
    cam_b.die();
    wait_for("cam-b shown offline", Duration::from_secs(30), || {
        b.row("cam-b").is_some_and(|r| r[1] == "offline")
    });
    assert_eq!(b.eval("window.__same_page === true"), true);
    // another result arrives live too
    publisher.send(
        "fhecam/cam-a/cam0/inference",
        inference(&o, "cam-a", 1),
        false,
    );
    wait_for("cam-a's second result", Duration::from_secs(30), || {
        b.row("cam-a")
            .is_some_and(|r| r[6] == "2 results, 1 refused")
    });

    let png = b.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cockpit.png");
    std::fs::write(&shot, &png).unwrap();
    if std::env::var_os("FHECAM_UPDATE_DOCS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cockpit.png"),
            &png,
        )
        .unwrap();
    }

    // the same data for programs
    let (st, body) = get(http, "/api/cameras");
    assert!(st.contains("200"), "{st}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a = v["cameras"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["device_id"] == "cam-a")
        .unwrap();
    assert_eq!(a["last_label"], o.label as u64);
    assert_eq!(a["model_version"], o.header.version);
    assert_eq!(a["results_last_hour"], 2);
    assert_eq!(a["refusals_last_hour"], 1);
    assert_eq!(v["broker_connected"], true);
    let (st, _) = get(http, "/nothing");
    assert!(st.contains("404"), "{st}");

    cam_a.die();
    drop(agent);
}

#[test]
fn refuses_a_remote_address_without_a_choice_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:9480\"\n").unwrap();
    let e = refused(&["cockpit", "--config", s(&cfg), "--check"]);
    assert!(
        e.contains("http.listen") && e.contains("allow_remote"),
        "{e}"
    );
    std::fs::write(
        &cfg,
        "[http]\nlisten = \"0.0.0.0:9480\"\nallow_remote = true\n",
    )
    .unwrap();
    let out = ok(&["cockpit", "--config", s(&cfg), "--check"]);
    assert!(out.contains("ok"), "{out}");
    std::fs::write(&cfg, "[http]\nlisen = \"127.0.0.1:1\"\n").unwrap();
    let e = refused(&["cockpit", "--config", s(&cfg), "--check"]);
    assert!(e.contains("lisen"), "{e}");
}
