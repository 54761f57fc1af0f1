//! The owner's MQTT side of a fleet: pushing a bundle to cameras (`deploy --push`) and
//! reading what they report (`fleet`, `models --broker`).

use anyhow::{bail, Context, Result};
use fhecam::fleet::{self, Camera};
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How to reach the broker the cameras use.
#[derive(clap::Args, Clone, Debug)]
pub struct BrokerArgs {
    /// The broker, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub broker: Option<String>,
    /// The cameras' first topic level (their mqtt.topic_prefix).
    #[arg(long, default_value = fhecam::wire::DEFAULT_EDGE_PREFIX)]
    pub prefix: String,
    /// Broker user name; the password is read from FHECAM_BROKER_PASSWORD.
    #[arg(long)]
    pub username: Option<String>,
    /// PEM file of the CA that signed the broker's certificate: connect with TLS.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate by certificate (with --key
    /// and --ca).
    #[arg(long, requires_all = ["key", "ca"])]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

/// `fhecam fleet`.
#[derive(clap::Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// How long to collect the cameras' retained reports after subscribing (0.1–600 s).
    #[arg(long, default_value_t = 2.0)]
    pub wait_s: f64,
    /// One JSON object per camera instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Largest packet `collect` accepts; it announces it to the broker (MQTT v5 maximum packet
/// size), which then does not send a larger retained message at all. Reports up to this
/// size but over `fleet::MAX_STATUS_BYTES` become a note.
const COLLECT_MAX_PACKET: u32 = 4 << 20;

/// What both MQTT versions' options are made of.
struct Endpoint {
    id: String,
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    transport: Option<rumqttc::Transport>,
}

impl BrokerArgs {
    fn options(&self, what: &str, max_packet: usize) -> Result<MqttOptions> {
        let e = self.endpoint(what)?;
        let mut o = MqttOptions::new(e.id, e.host, e.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_max_packet_size(max_packet, max_packet);
        if let Some((u, p)) = e.credentials {
            o.set_credentials(u, p);
        }
        if let Some(t) = e.transport {
            o.set_transport(t);
        }
        Ok(o)
    }

    /// MQTT v5 options, so that the broker knows our maximum packet size.
    fn options_v5(&self, what: &str, max_packet: u32) -> Result<rumqttc::v5::MqttOptions> {
        let e = self.endpoint(what)?;
        let mut o = rumqttc::v5::MqttOptions::new(e.id, e.host, e.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(true);
        o.set_max_packet_size(Some(max_packet));
        if let Some((u, p)) = e.credentials {
            o.set_credentials(u, p);
        }
        if let Some(t) = e.transport {
            o.set_transport(t);
        }
        Ok(o)
    }

    fn endpoint(&self, what: &str) -> Result<Endpoint> {
        let Some(b) = &self.broker else {
            bail!("{what} needs the broker: give --broker HOST:PORT");
        };
        let (host, port) = b
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|&p| p > 0)?)))
            .filter(|(h, _)| !h.is_empty())
            .with_context(|| format!("--broker {b:?}: expected HOST:PORT, e.g. localhost:1883"))?;
        fhecam::wire::envelope::check_id("--prefix", &self.prefix)?;
        let id = format!(
            "fhecam-owner-{}-{}",
            std::process::id(),
            fhecam::ids::unix_now_ms()
        );
        let credentials = self.username.as_ref().map(|u| {
            let pass = std::env::var("FHECAM_BROKER_PASSWORD").unwrap_or_default();
            (u.clone(), pass)
        });
        let transport = match &self.ca {
            Some(ca) => Some(fhecam::mqtt::tls_transport(&fhecam::mqtt::TlsConfig {
                ca: ca.clone(),
                client_cert: self.cert.clone(),
                client_key: self.key.clone(),
            })?),
            None => None,
        };
        Ok(Endpoint {
            id,
            host: host.to_string(),
            port,
            credentials,
            transport,
        })
    }
}

fn connect_error(b: &BrokerArgs, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "broker {}: {e} (is it running, and does it take this user?)",
        b.broker.as_deref().unwrap_or("?")
    )
}

/// Publishes `bundle` retained at QoS 1 on each topic and waits for the broker's
/// acknowledgements.
pub fn push(b: &BrokerArgs, topics: &[String], bundle: &[u8], timeout: Duration) -> Result<()> {
    let o = b.options("--push", fhecam::mqtt::MAX_PACKET)?;
    if bundle.len() + 1024 > fhecam::mqtt::MAX_PACKET {
        bail!(
            "the bundle is {} bytes: over what one MQTT message carries (256 MB)",
            bundle.len()
        );
    }
    let (client, mut conn) = Client::new(o, 16);
    let t = Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    let mut connected = false;
    for ev in conn.iter() {
        let ev = ev.map_err(|e| {
            if connected {
                anyhow::anyhow!(
                    "broker {}: connection lost while pushing {} bytes ({e}): the broker may refuse messages this large (mosquitto: max_packet_size / message_size_limit, see the README's \"Running a fleet\")",
                    b.broker.as_deref().unwrap_or("?"),
                    bundle.len()
                )
            } else {
                connect_error(b, e)
            }
        })?;
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                connected = true;
                for topic in topics {
                    println!("pushing {} bytes to {topic} (retained)", bundle.len());
                    client.try_publish(topic.clone(), QoS::AtLeastOnce, true, bundle.to_vec())?;
                }
            }
            Event::Outgoing(Outgoing::Publish(_)) => sent += 1,
            Event::Incoming(Packet::PubAck(_)) => {
                acked += 1;
                if acked == topics.len() {
                    let _ = client.try_disconnect();
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => break,
            _ => {}
        }
        if t.elapsed() > timeout {
            bail!(
                "the broker acknowledged {acked} of {} pushes ({sent} sent) within {timeout:?}; its message size limit may be too small for a bundle (mosquitto: message_size_limit / max_packet_size, see the README's \"Running a fleet\")",
                topics.len()
            );
        }
    }
    println!(
        "pushed to {} topic(s), acknowledged by the broker in {:.1} s",
        topics.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The cameras' retained reports, collected for `wait` after subscribing. A report too large
/// for one camera is that camera's note (or, over `COLLECT_MAX_PACKET`, not sent by the
/// broker), never a failure of the whole fleet.
pub fn collect(b: &BrokerArgs, wait: Duration) -> Result<Vec<Camera>> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, Client, Event};
    let o = b.options_v5("this command", COLLECT_MAX_PACKET)?;
    let (client, mut conn) = Client::new(o, 16);
    let mut msgs = Vec::new();
    let mut until: Option<Instant> = None;
    let start = Instant::now();
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        if until.is_none() && start.elapsed() > Duration::from_secs(30) {
            bail!(
                "broker {}: no subscription acknowledgement within 30 s",
                b.broker.as_deref().unwrap_or("?")
            );
        }
        let left = until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1));
        match conn.recv_timeout(left) {
            Ok(ev) => match ev.map_err(|e| connect_error(b, e))? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    for f in fleet::filters(&b.prefix) {
                        client.try_subscribe(f, QoS::AtMostOnce)?;
                    }
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    until.get_or_insert_with(|| Instant::now() + wait);
                }
                Event::Incoming(Packet::Publish(p)) => msgs.push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                )),
                _ => {}
            },
            Err(rumqttc::v5::RecvTimeoutError::Timeout) => {}
            Err(rumqttc::v5::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = client.try_disconnect();
    Ok(fleet::view(&b.prefix, &msgs, fhecam::ids::unix_now_ms()))
}

/// The devices with a camera online now.
pub fn online(b: &BrokerArgs) -> Result<Vec<String>> {
    let mut d: Vec<String> = collect(b, Duration::from_secs(2))?
        .into_iter()
        .filter(|c| c.availability == fhecam::wire::Availability::Online.as_str())
        .map(|c| c.device_id)
        .collect();
    d.dedup();
    Ok(d)
}

/// Waits until every camera of `devices` reports running `model_id`; fails after `limit`
/// naming the others (with the last bundle each refused).
pub fn confirm(b: &BrokerArgs, devices: &[String], model_id: &str, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let cams = collect(b, Duration::from_millis(1500))?;
        let mut waiting = Vec::new();
        for d in devices {
            let mine: Vec<&Camera> = cams.iter().filter(|c| &c.device_id == d).collect();
            if mine.is_empty() {
                waiting.push(format!("{d}: no camera has reported"));
            }
            for c in mine {
                if c.model_id.as_deref() != Some(model_id) {
                    waiting.push(format!(
                        "{}/{}: runs {} version {}{}",
                        c.device_id,
                        c.camera_id,
                        opt(&c.model_name),
                        opt(&c.model_version),
                        c.last_refusal
                            .as_ref()
                            .map(|r| format!("; last refused bundle: {r}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        if waiting.is_empty() {
            println!(
                "confirmed: {} device(s) run model {model_id} ({:.0} s)",
                devices.len(),
                t.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if t.elapsed() >= limit {
            bail!(
                "not every camera runs model {model_id} after {:.0} s:\n  {}",
                limit.as_secs_f64(),
                waiting.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

fn age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

pub fn run(a: FleetArgs) -> Result<()> {
    if !(0.1..=600.0).contains(&a.wait_s) {
        bail!("--wait-s must be 0.1..=600, got {}", a.wait_s);
    }
    let cams = collect(&a.broker, Duration::from_secs_f64(a.wait_s))?;
    if a.json {
        for c in &cams {
            println!("{}", serde_json::to_string(c)?);
        }
        return Ok(());
    }
    if cams.is_empty() {
        println!(
            "no camera has reported under {}/ on {}",
            a.broker.prefix,
            a.broker.broker.as_deref().unwrap_or("?")
        );
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<8} {:<20} {:>4} {:>8} {:>8} {:>7} {:>7} {:>9} {:>9}",
        "device",
        "camera",
        "avail",
        "model",
        "ver",
        "frames",
        "infer",
        "dropped",
        "outbox",
        "last inf",
        "reported"
    );
    for c in &cams {
        println!(
            "{:<24} {:<10} {:<8} {:<20} {:>4} {:>8} {:>8} {:>7} {:>7} {:>9} {:>9}",
            c.device_id,
            c.camera_id,
            c.availability,
            opt(&c.model_name),
            opt(&c.model_version),
            opt(&c.frames_captured),
            opt(&c.inferences),
            opt(&c.frames_dropped.zip(c.outbox_dropped).map(|(a, b)| a + b)),
            opt(&c.outbox_pending),
            age(c.last_inference_age_s),
            age(c.status_age_s),
        );
        if let Some(r) = &c.last_refusal {
            println!("    last refused bundle: {r}");
        }
        if let Some(n) = &c.note {
            println!("    {n}");
        }
    }
    Ok(())
}
