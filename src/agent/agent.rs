//! The decryption agent: an MQTT v5 shared subscription to every camera's inferences, each
//! one validated, decrypted with the owner's key for its model, and published as a result
//! for the cockpit — or refused to the dead-letter topic with the reason. The I/O loop
//! (`run`) is apart from the decision (`Processor::handle`), which does no network I/O.

use super::config::AgentConfig;
use super::guard::{check_range, parse_topic, RateLimiter};
use crate::envelope;
use crate::fhe::eval::OutputLayout;
use crate::fhe::{EncryptedOutput, OwnerKeys};
use crate::ids::{rfc3339, ModelId};
use crate::model::Kind;
use crate::secret::Passphrase;
use crate::store::Store;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("agent state database {path}: {msg}")]
    State { path: String, msg: String },
    #[error("passphrase: {0}")]
    Passphrase(String),
}

/// Counters of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentStats {
    pub received: u64,
    pub decrypted: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
}

/// What to do with one message.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Publish `json` on `topic` (the cockpit).
    Result { topic: String, json: Vec<u8> },
    /// Already decrypted once (QoS 1 redelivery or a replay): acknowledge, do nothing.
    Duplicate,
    /// Refused before or after decryption; nothing decrypted is released.
    Dead { reason: String },
}

/// A cockpit result.
#[derive(Serialize)]
pub struct CockpitResult<'a> {
    pub device_id: &'a str,
    pub camera_id: &'a str,
    pub model_id: String,
    pub model_version: u32,
    pub sequence: u64,
    pub label: usize,
    pub frame_timestamp_ms: u64,
    pub frame_time: String,
    pub decrypt_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<i64>>,
}

struct Known {
    version: u32,
    keys: OwnerKeys,
    layout: OutputLayout,
    lo: i64,
    hi: i64,
    classes: usize,
}

/// Validation, decryption and deduplication; owns the databases. Synchronous.
pub struct Processor {
    cfg: AgentConfig,
    store: Store,
    state: rusqlite::Connection,
    pass: Passphrase,
    models: HashMap<ModelId, Known>,
    limiter: RateLimiter,
    logits_for: HashSet<ModelId>,
}

fn read_passphrase(cfg: &AgentConfig) -> Result<Passphrase, AgentError> {
    let raw = match &cfg.passphrase_file {
        Some(p) => {
            let text = crate::bundle::read_limited(p, 4096)
                .map_err(|e| AgentError::Passphrase(format!("{}: {e}", p.display())))?;
            String::from_utf8(text)
                .map_err(|_| AgentError::Passphrase(format!("{} is not UTF-8", p.display())))?
                .trim_end_matches(['\n', '\r'])
                .to_string()
        }
        None => std::env::var("FHECAM_OWNER_PASSPHRASE").map_err(|_| {
            AgentError::Passphrase(
                "set FHECAM_OWNER_PASSPHRASE or passphrase_file to unseal the model keys".into(),
            )
        })?,
    };
    Passphrase::new(raw).map_err(|e| AgentError::Passphrase(e.to_string()))
}

fn open_state(path: &Path) -> Result<rusqlite::Connection, AgentError> {
    let err = |e: rusqlite::Error| AgentError::State {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    if !path.exists() {
        // created 0600 before SQLite touches it: it records which devices sent what
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AgentError::State {
                path: path.display().to_string(),
                msg: e.to_string(),
            })?;
    }
    let c = rusqlite::Connection::open(path).map_err(err)?;
    // several agents may share the file
    c.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS seen (
             device TEXT NOT NULL, camera TEXT NOT NULL, sequence INTEGER NOT NULL,
             model_id TEXT NOT NULL, decrypted_unix INTEGER NOT NULL,
             PRIMARY KEY (device, camera, sequence));",
    )
    .map_err(err)?;
    Ok(c)
}

impl Processor {
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let store = Store::open(&cfg.db)?;
        let state = open_state(&cfg.state_db)?;
        let pass = read_passphrase(&cfg)?;
        let limiter = RateLimiter::new(cfg.limits.per_device_per_minute, cfg.limits.burst);
        let logits_for = cfg
            .logits_for
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        Ok(Processor {
            cfg,
            store,
            state,
            pass,
            models: HashMap::new(),
            limiter,
            logits_for,
        })
    }

    fn known(&mut self, id: &ModelId) -> Result<&Known, String> {
        if !self.models.contains_key(id) {
            let rec = self
                .store
                .public_record(id)
                .map_err(|_| format!("model id {id} is not in the database"))?;
            let (_, layout) =
                crate::fhe::eval::plan(&rec.arch).map_err(|e| format!("model {id}: {e}"))?;
            let infos = rec.arch.infer().map_err(|e| format!("model {id}: {e}"))?;
            let (lo, hi) = match infos.last().map(|i| i.kind) {
                Some(Kind::Acc { lo, hi }) => (lo, hi),
                Some(Kind::Act { max }) => (0, max as i64),
                None => return Err(format!("model {id} has no output")),
            };
            let keys = self.store.owner_keys(id, &self.pass).map_err(|e| {
                tracing::error!("cannot unseal the key of model {id}: {e}");
                format!("the key of model {id} cannot be unsealed")
            })?;
            self.models.insert(
                *id,
                Known {
                    version: rec.summary.version,
                    keys,
                    layout,
                    lo,
                    hi,
                    classes: rec.arch.num_classes,
                },
            );
        }
        Ok(&self.models[id])
    }

    fn seen(&self, device: &str, camera: &str, seq: u64) -> bool {
        self.state
            .query_row(
                "SELECT 1 FROM seen WHERE device = ?1 AND camera = ?2 AND sequence = ?3",
                rusqlite::params![device, camera, seq as i64],
                |_| Ok(()),
            )
            .is_ok()
    }

    /// Decides what to do with one message; every refusal names its reason.
    pub fn handle(&mut self, topic: &str, payload: &[u8], now: Instant) -> Outcome {
        let dead = |reason: String| Outcome::Dead { reason };
        if payload.len() > self.cfg.limits.max_payload_bytes {
            return dead(format!(
                "oversized: {} bytes, over the {}-byte limit",
                payload.len(),
                self.cfg.limits.max_payload_bytes
            ));
        }
        let Some((device, camera)) = parse_topic(&self.cfg.mqtt.edge_prefix, topic) else {
            return dead("not an inference topic".into());
        };
        let env = match envelope::decode(payload) {
            Ok(e) => e,
            Err(e) => return dead(format!("malformed envelope: {e}")),
        };
        if env.device_id != device || env.camera_id != camera {
            return dead(format!(
                "envelope of {}/{} published on the topic of {device}/{camera}",
                env.device_id, env.camera_id
            ));
        }
        // a duplicate costs no decryption, so it takes no token
        if self.seen(device, camera, env.sequence) {
            return Outcome::Duplicate;
        }
        if !self.limiter.allow(device, now) {
            return dead(format!(
                "rate limit: device {device} is over its decryptions per minute"
            ));
        }
        let id = env.model_id;
        let logits_allowed = self.logits_for.contains(&id);
        let known = match self.known(&id) {
            Ok(k) => k,
            Err(reason) => return dead(reason),
        };
        if env.model_version != known.version {
            return dead(format!(
                "model {id} version {} is not the database's version {}",
                env.model_version, known.version
            ));
        }
        let out = match EncryptedOutput::from_bytes(&env.ciphertext) {
            Ok(o) => o,
            Err(e) => return dead(format!("malformed ciphertext: {e}")),
        };
        // The layout comes from the sender; only the model's own is decrypted, so an edge
        // cannot ask for arbitrary ciphertexts (an encrypted weight, say) to be opened.
        if out.layout != known.layout {
            return dead("output layout is not the model's".into());
        }
        let t = Instant::now();
        let d = match out.decrypt(&known.keys) {
            Ok(d) => d,
            Err(e) => return dead(format!("decryption check failed: {e}")),
        };
        if let Err(e) = check_range(&d.logits, d.label, known.lo, known.hi, known.classes) {
            return dead(format!("decrypted values impossible for this model: {e}"));
        }
        let decrypt_ms = t.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = self.state.execute(
            "INSERT OR IGNORE INTO seen VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                device,
                camera,
                env.sequence as i64,
                id.to_string(),
                crate::ids::unix_now()
            ],
        ) {
            tracing::error!("agent state database: {e}");
        }
        let r = CockpitResult {
            device_id: device,
            camera_id: camera,
            model_id: id.to_string(),
            model_version: env.model_version,
            sequence: env.sequence,
            label: d.label,
            frame_timestamp_ms: env.frame_timestamp_ms,
            frame_time: rfc3339((env.frame_timestamp_ms / 1000) as i64),
            decrypt_ms,
            logits: logits_allowed.then_some(d.logits),
        };
        Outcome::Result {
            topic: format!("{}/{device}/{camera}", self.cfg.mqtt.cockpit_prefix),
            json: serde_json::to_vec(&r).unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
struct DeadLetter<'a> {
    reason: &'a str,
    topic: &'a str,
    payload_bytes: usize,
    time: String,
}

/// Runs until `shutdown`. `ready` is told once the shared subscription is acknowledged.
pub async fn run(
    cfg: AgentConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<AgentStats, AgentError> {
    let subscription = cfg.subscription();
    let dead_topic = cfg.mqtt.dead_letter_topic.clone();
    let m = cfg.mqtt.clone();
    let mut processor = tokio::task::block_in_place(|| Processor::new(cfg))?;

    let client_id = m
        .client_id
        .clone()
        .unwrap_or_else(|| format!("fhecam-agent-{}", std::process::id()));
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // persistent session; acknowledge only once a message is handled, so a crash mid-way
    // gets it redelivered (and deduplicated) instead of lost
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(24 * 3600));
    o.set_manual_acks(true);
    o.set_max_packet_size(Some((envelope::MAX_ENVELOPE_BYTES + 4096) as u32));
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let mut stats = AgentStats::default();
    let mut ready = ready;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    tracing::info!("agent connected to {}:{}; subscribing {subscription}", m.host, m.port);
                    let _ = client.try_subscribe(subscription.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    stats.received += 1;
                    let topic = String::from_utf8_lossy(&p.topic).to_string();
                    let outcome = tokio::task::block_in_place(|| {
                        processor.handle(&topic, &p.payload, Instant::now())
                    });
                    match outcome {
                        Outcome::Result { topic: t, json } => {
                            stats.decrypted += 1;
                            let _ = client.publish(t, QoS::AtLeastOnce, false, json).await;
                        }
                        Outcome::Duplicate => {
                            stats.duplicates += 1;
                            tracing::info!("{topic}: duplicate, already decrypted");
                        }
                        Outcome::Dead { reason } => {
                            stats.dead_lettered += 1;
                            tracing::warn!("{topic}: refused: {reason}");
                            let dl = DeadLetter {
                                reason: &reason,
                                topic: &topic,
                                payload_bytes: p.payload.len(),
                                time: rfc3339(crate::ids::unix_now()),
                            };
                            let json = serde_json::to_vec(&dl).unwrap_or_default();
                            let _ = client.publish(dead_topic.clone(), QoS::AtLeastOnce, false, json).await;
                        }
                    }
                    let _ = client.ack(&p).await;
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = crate::edge::source::backoff(
                        Duration::from_secs_f64(m.reconnect_backoff_initial_s),
                        Duration::from_secs_f64(m.reconnect_backoff_max_s),
                        failures,
                    );
                    failures += 1;
                    tracing::warn!("agent MQTT {}:{}: {e}; retrying in {:.1} s", m.host, m.port, wait.as_secs_f64());
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    tracing::info!("agent stopped: {stats:?}");
    Ok(stats)
}
