//! What the agent decides about one inference, without network I/O: the cheap checks (no
//! token, no decryption), the decryption with its checks, and the record of what reached
//! the cockpit. Owns the databases; synchronous, run on the agent's worker thread.

use super::config::AgentConfig;
use super::guard::check_range;
use fhecam_engine::fhe::eval::OutputLayout;
use fhecam_engine::fhe::{EncryptedOutput, OwnerKeys};
use fhecam_engine::model::Kind;
use fhecam_owner::secret::Passphrase;
use fhecam_owner::store::{Store, StoreError};
use fhecam_proto::ids::{rfc3339, ModelId};
use fhecam_proto::wire::envelope::{self, Envelope};
use fhecam_proto::wire::{self, CockpitResult, Leaf};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{0}")]
    Metrics(String),
    #[error(transparent)]
    Store(#[from] fhecam_owner::store::StoreError),
    #[error("agent state database {path}: {msg}")]
    State { path: String, msg: String },
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error(transparent)]
    Mqtt(#[from] fhecam_proto::mqtt::MqttSetupError),
    #[error("cannot start the agent's worker thread: {0}")]
    Worker(std::io::Error),
}

/// One inference as the agent deduplicates it: a reset outbox starts a new epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub device: String,
    pub camera: String,
    pub epoch: u64,
    pub sequence: u64,
}

/// An inference that passed every check that costs no decryption.
pub struct Checked {
    pub key: Key,
    pub model: ModelId,
    env: Envelope,
    out: EncryptedOutput,
}

pub use fhecam_proto::wire::RefusalCode;

/// A refused inference.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
    /// Not final: the inference is left unacknowledged, for the broker to redeliver at the
    /// agent's next connection (e.g. after a restart with the right passphrase).
    pub transient: bool,
}

impl Refusal {
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
            transient: false,
        }
    }

    pub fn transient(code: RefusalCode, reason: impl Into<String>) -> Self {
        Refusal {
            transient: true,
            ..Refusal::new(code, reason)
        }
    }
}

/// The verdict of the cheap checks.
pub enum Step {
    /// Refused; nothing decrypted.
    Dead(Refusal),
    /// Its result already reached the cockpit (QoS 1 redelivery or a replay).
    Duplicate,
    Ready(Box<Checked>),
    /// The agent's own state failed: stop without acknowledging (the broker redelivers).
    Fatal(AgentError),
}

struct Known {
    version: u32,
    keys: OwnerKeys,
    layout: OutputLayout,
    lo: i64,
    hi: i64,
    classes: usize,
}

pub struct Processor {
    cfg: AgentConfig,
    store: Store,
    /// (device, inode) of the owner database opened: a file put in its place by rename
    /// (rsync, Ansible, `mv`) is a new one to open.
    db_file: Option<(u64, u64)>,
    state: rusqlite::Connection,
    pass: Passphrase,
    models: HashMap<ModelId, Known>,
    logits_for: HashSet<ModelId>,
}

/// Reads the passphrase (`passphrase_file` or FHECAM_OWNER_PASSPHRASE), as every owner
/// command does ([`fhecam_owner::secret::load_passphrase`]).
pub fn read_passphrase(cfg: &AgentConfig) -> Result<Passphrase, AgentError> {
    fhecam_owner::secret::load_passphrase(cfg.passphrase_file.as_deref())
        .map_err(|e| AgentError::Passphrase(e.to_string()))
}

const STATE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS results (
         device TEXT NOT NULL, camera TEXT NOT NULL, epoch INTEGER NOT NULL,
         sequence INTEGER NOT NULL, model_id TEXT NOT NULL, published_unix INTEGER NOT NULL,
         PRIMARY KEY (device, camera, epoch, sequence));";

fn state_err(path: &Path) -> impl Fn(rusqlite::Error) -> AgentError + '_ {
    move |e| AgentError::State {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

fn open_state(path: &Path) -> Result<rusqlite::Connection, AgentError> {
    let err = state_err(path);
    // it records which devices sent what; agents sharing the file may start together
    fhecam_owner::store::create_private(path).map_err(|e| AgentError::State {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let c = rusqlite::Connection::open(path).map_err(&err)?;
    // several agents may share the file
    c.busy_timeout(Duration::from_secs(5)).map_err(&err)?;
    c.execute_batch(STATE_SCHEMA).map_err(&err)?;
    // state written before camera epochs: those inferences were schema-1 envelopes (epoch 0).
    // IMMEDIATE: agents sharing the file may start together; one migrates, the other sees it
    // done.
    let migrate = |c: &rusqlite::Connection| -> rusqlite::Result<()> {
        c.execute_batch("BEGIN IMMEDIATE")?;
        let old: i64 = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'seen'",
            [],
            |r| r.get(0),
        )?;
        if old > 0 {
            c.execute_batch(
                "INSERT OR IGNORE INTO results
                     SELECT device, camera, 0, sequence, model_id, decrypted_unix FROM seen;
                 DROP TABLE seen;",
            )?;
        }
        c.execute_batch("COMMIT")
    };
    if let Err(e) = migrate(&c) {
        let _ = c.execute_batch("ROLLBACK");
        return Err(err(e));
    }
    Ok(c)
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The agent's client id: the configured one, else the one kept in
/// [`AgentConfig::client_id_file`], created (0600) at the first start. `create = false`
/// (`--check`) writes nothing and describes the id to come.
pub fn client_id(cfg: &AgentConfig) -> Result<String, AgentError> {
    client_id_with(cfg, true)
}

/// What `fhecam agent --check` shows as the client id.
pub fn client_id_preview(cfg: &AgentConfig) -> Result<String, AgentError> {
    client_id_with(cfg, false)
}

fn client_id_with(cfg: &AgentConfig, create: bool) -> Result<String, AgentError> {
    if let Some(id) = &cfg.mqtt.conn.client_id {
        return Ok(id.clone());
    }
    let path = cfg.client_id_file();
    let err = |msg: String| AgentError::State {
        path: path.display().to_string(),
        msg,
    };
    if path.exists() {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(256).read_to_string(&mut text))
            .map_err(|e| err(e.to_string()))?;
        let id = text.trim();
        if !fhecam_proto::mqtt::valid_client_id(id) {
            return Err(err(
                "not a client id (1-64 of A-Z a-z 0-9 . _ : -); delete it for a new one".into(),
            ));
        }
        return Ok(id.to_string());
    }
    if !create {
        return Ok(format!(
            "{} (created at start in {})",
            cfg.new_client_id(),
            path.display()
        ));
    }
    let id = cfg.new_client_id();
    let tmp = path.with_extension("client-id.tmp");
    let _ = std::fs::remove_file(&tmp);
    fhecam_owner::store::create_private(&tmp)
        .and_then(|_| std::fs::write(&tmp, format!("{id}\n")))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| err(e.to_string()))?;
    Ok(id)
}

/// The agent writes its state database; pointed at the owner's database it would write
/// there.
fn refuse_shared_file(cfg: &AgentConfig) -> Result<(), AgentError> {
    let same = match (cfg.db.canonicalize(), cfg.state_db.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => cfg.db == cfg.state_db,
    };
    if same {
        return Err(AgentError::State {
            path: cfg.state_db.display().to_string(),
            msg: "state_db is the owner database (db): give the agent a file of its own".into(),
        });
    }
    Ok(())
}

/// What `fhecam agent --check` verified.
pub struct Preflight {
    pub models: usize,
    pub state: String,
    /// Model versions whose key unseals but cannot serve (protected by an older fhecam):
    /// their inferences are refused; the agent runs for the others.
    pub unusable: Vec<String>,
}

/// Checks what the agent needs, writing nothing: the owner database opens read-only, the
/// passphrase unseals every model's key, the state database is usable or can be created.
pub fn preflight(cfg: &AgentConfig) -> Result<Preflight, AgentError> {
    if let Some(t) = &cfg.mqtt.conn.tls {
        fhecam_proto::mqtt::tls_transport(t)?;
    }
    let store = Store::open_read_only(&cfg.db)?;
    refuse_shared_file(cfg)?;
    let pass = read_passphrase(cfg)?;
    let list = store.list()?;
    let mut unusable = Vec::new();
    for m in &list {
        match store.owner_keys(&m.id, &pass) {
            Ok(_) => {}
            // unsealed, so the passphrase is right; the key itself cannot serve
            Err(StoreError::Key { source, .. }) => unusable.push(format!(
                "model {} ({} version {}): {source}",
                m.id, m.name, m.version
            )),
            Err(e) => {
                return Err(AgentError::Passphrase(format!(
                    "cannot unseal the key of model {} ({} version {}): {e}",
                    m.id, m.name, m.version
                )))
            }
        }
    }
    let p = &cfg.state_db;
    let state = if p.exists() {
        let err = state_err(p);
        let c =
            rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(&err)?;
        c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(&err)?;
        format!("{} readable", p.display())
    } else {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(AgentError::State {
                path: p.display().to_string(),
                msg: format!("its directory {} does not exist", parent.display()),
            });
        }
        format!("{} will be created at start", p.display())
    };
    Ok(Preflight {
        models: list.len(),
        state,
        unusable,
    })
}

impl Processor {
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let db_file = file_id(&cfg.db);
        let store = Store::open_read_only(&cfg.db)?;
        refuse_shared_file(&cfg)?;
        let state = open_state(&cfg.state_db)?;
        let pass = read_passphrase(&cfg)?;
        let logits_for = cfg
            .logits_for
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let mut p = Processor {
            cfg,
            store,
            db_file,
            state,
            pass,
            models: HashMap::new(),
            logits_for,
        };
        p.unseal_all()?;
        Ok(p)
    }

    /// Unseals every model's key at start: a wrong passphrase is fatal now, not a refusal of
    /// every inference later. A key that unseals but cannot serve is only logged (its
    /// inferences are refused; the agent runs for the others), as `--check` reports it.
    fn unseal_all(&mut self) -> Result<(), AgentError> {
        for m in self.store.list()? {
            match self.known(&m.id) {
                Ok(_) => {}
                Err(r) if r.transient => {
                    return Err(AgentError::Passphrase(format!(
                        "cannot unseal the key of model {} ({} version {}) with this passphrase",
                        m.id, m.name, m.version
                    )))
                }
                Err(r) => tracing::warn!("{}; its inferences will be refused", r.reason),
            }
        }
        Ok(())
    }

    /// The owner database was replaced by another file (rename): opens the new one. Whether
    /// it did.
    fn reopen_if_replaced(&mut self) -> bool {
        let now = file_id(&self.cfg.db);
        if now.is_none() || now == self.db_file {
            return false;
        }
        match Store::open_read_only(&self.cfg.db) {
            Ok(s) => {
                tracing::info!(
                    "owner database {} was replaced: reopened",
                    self.cfg.db.display()
                );
                self.store = s;
                self.db_file = now;
                true
            }
            Err(e) => {
                tracing::warn!(
                    "owner database {} was replaced but does not open ({e}); still using the previous one",
                    self.cfg.db.display()
                );
                false
            }
        }
    }

    fn known(&mut self, id: &ModelId) -> Result<&Known, Refusal> {
        let unusable = |reason: String| Refusal::new(RefusalCode::ModelUnusable, reason);
        if !self.models.contains_key(id) {
            let unknown = || {
                Refusal::new(
                    RefusalCode::UnknownModel,
                    format!("model id {id} is not in the database"),
                )
            };
            // a model protected after the agent started is in a replacing file, if any
            let rec = match self.store.public_record(id) {
                Ok(r) => r,
                Err(_) if self.reopen_if_replaced() => {
                    self.store.public_record(id).map_err(|_| unknown())?
                }
                Err(_) => return Err(unknown()),
            };
            let (_, layout) = fhecam_engine::fhe::eval::plan(&rec.arch)
                .map_err(|e| unusable(format!("model {id}: {e}")))?;
            let infos = rec
                .arch
                .infer()
                .map_err(|e| unusable(format!("model {id}: {e}")))?;
            let (lo, hi) = match infos.last().map(|i| i.kind) {
                Some(Kind::Acc { lo, hi }) => (lo, hi),
                Some(Kind::Act { max }) => (0, max as i64),
                None => return Err(unusable(format!("model {id} has no output"))),
            };
            let keys = self.store.owner_keys(id, &self.pass).map_err(|e| match e {
                StoreError::Key { source, .. } => {
                    tracing::error!("the key of model {id} cannot serve: {source}");
                    unusable(format!("the key of model {id} cannot serve: {source}"))
                }
                // another passphrase (a database replaced under a running agent): the
                // inference waits at the broker for an agent with the right one
                e => {
                    tracing::error!("cannot unseal the key of model {id}: {e}");
                    Refusal::transient(
                        RefusalCode::ModelUnusable,
                        format!(
                            "the key of model {id} cannot be unsealed with the agent's passphrase; left unacknowledged: the broker redelivers it at the agent's next connection"
                        ),
                    )
                }
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

    /// Whether the result of `key` already reached the cockpit.
    pub fn published(&self, key: &Key) -> Result<bool, AgentError> {
        use rusqlite::OptionalExtension;
        self.state
            .query_row(
                "SELECT 1 FROM results
                 WHERE device = ?1 AND camera = ?2 AND epoch = ?3 AND sequence = ?4",
                rusqlite::params![
                    key.device,
                    key.camera,
                    key.epoch as i64,
                    key.sequence as i64
                ],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(state_err(&self.cfg.state_db))
    }

    /// The checks that cost no decryption: size, topic, envelope, sender, duplicate, model,
    /// version, ciphertext format and layout. No rate-limit token is taken here, so junk on
    /// a camera's topic cannot use up that camera's decryptions.
    pub fn check(&mut self, topic: &str, payload: &[u8]) -> Step {
        use RefusalCode as C;
        let dead = |code: RefusalCode, reason: String| Step::Dead(Refusal::new(code, reason));
        if payload.len() > self.cfg.limits.max_payload_bytes {
            return dead(
                C::Oversized,
                format!(
                    "oversized: {} bytes, over the {}-byte limit",
                    payload.len(),
                    self.cfg.limits.max_payload_bytes
                ),
            );
        }
        let Some(wire::CameraTopic {
            device,
            camera,
            leaf: Leaf::Inference,
        }) = wire::parse_camera_topic(&self.cfg.mqtt.role.edge_prefix, topic)
        else {
            return dead(C::NotInferenceTopic, "not an inference topic".into());
        };
        let env = match envelope::decode(payload) {
            Ok(e) => e,
            Err(e) => return dead(C::MalformedEnvelope, format!("malformed envelope: {e}")),
        };
        if env.device_id != device || env.camera_id != camera {
            return dead(
                C::WrongSender,
                format!(
                    "envelope of {}/{} published on the topic of {device}/{camera}",
                    env.device_id, env.camera_id
                ),
            );
        }
        let key = Key {
            device: env.device_id.clone(),
            camera: env.camera_id.clone(),
            epoch: env.epoch,
            sequence: env.sequence,
        };
        match self.published(&key) {
            Ok(true) => return Step::Duplicate,
            Ok(false) => {}
            Err(e) => return Step::Fatal(e),
        }
        let id = env.model_id;
        let known = match self.known(&id) {
            Ok(k) => k,
            Err(r) => return Step::Dead(r),
        };
        if env.model_version != known.version {
            return dead(
                C::WrongVersion,
                format!(
                    "model {id} version {} is not the database's version {}",
                    env.model_version, known.version
                ),
            );
        }
        let out = match EncryptedOutput::from_bytes(&env.ciphertext) {
            Ok(o) => o,
            Err(e) => return dead(C::MalformedCiphertext, format!("malformed ciphertext: {e}")),
        };
        // The layout comes from the sender; only the model's own is decrypted, so an edge
        // cannot ask for arbitrary ciphertexts (an encrypted weight, say) to be opened.
        if out.layout != known.layout {
            return dead(C::WrongLayout, "output layout is not the model's".into());
        }
        Step::Ready(Box::new(Checked {
            key,
            model: id,
            env,
            out,
        }))
    }

    /// Decrypts a checked inference: the cockpit topic and JSON, or the refusal.
    pub fn decrypt(&mut self, c: &Checked) -> Result<(String, Vec<u8>), Refusal> {
        let logits_allowed = self.logits_for.contains(&c.model);
        let known = self.known(&c.model)?;
        let t = Instant::now();
        let d = c.out.decrypt(&known.keys).map_err(|e| {
            Refusal::new(
                RefusalCode::DecryptionCheck,
                format!("decryption check failed: {e}"),
            )
        })?;
        check_range(&d.logits, d.label, known.lo, known.hi, known.classes).map_err(|e| {
            Refusal::new(
                RefusalCode::ImpossibleValues,
                format!("decrypted values impossible for this model: {e}"),
            )
        })?;
        let env = &c.env;
        let r = CockpitResult {
            device_id: env.device_id.clone(),
            camera_id: env.camera_id.clone(),
            model_id: c.model.to_string(),
            model_version: env.model_version,
            epoch: env.epoch,
            sequence: env.sequence,
            label: d.label,
            frame_timestamp_ms: env.frame_timestamp_ms,
            frame_time: rfc3339((env.frame_timestamp_ms / 1000).min(i64::MAX as u64) as i64),
            decrypt_ms: t.elapsed().as_secs_f64() * 1e3,
            logits: logits_allowed.then_some(d.logits),
        };
        let json = serde_json::to_vec(&r).map_err(|e| {
            Refusal::new(
                RefusalCode::Internal,
                format!("cannot encode the result: {e}"),
            )
        })?;
        Ok((
            wire::cockpit_topic(
                &self.cfg.mqtt.role.cockpit_prefix,
                &env.device_id,
                &env.camera_id,
            ),
            json,
        ))
    }

    /// Records that the broker has the cockpit result of `key`; from now on the inference
    /// is a duplicate.
    pub fn record(&mut self, key: &Key, model: &ModelId) -> Result<(), AgentError> {
        self.state
            .execute(
                "INSERT OR IGNORE INTO results VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    key.device,
                    key.camera,
                    key.epoch as i64,
                    key.sequence as i64,
                    model.to_string(),
                    fhecam_proto::ids::unix_now()
                ],
            )
            .map(|_| ())
            .map_err(state_err(&self.cfg.state_db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_from_before_compressed_outputs_is_reported_not_fatal() {
        use fhecam_owner::secret::{KdfParams, Passphrase};
        use fhecam_owner::store::{seal_raw_key, NewModel};
        use rand::SeedableRng;
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("owner.db");
        let pass = Passphrase::new("a long test passphrase".into()).unwrap();
        let kdf = KdfParams {
            m_cost_kib: 8 * 1024,
            t_cost: 1,
            p_cost: 1,
        };
        // an owner key as fhecam wrote it before: tfhe's client key alone
        let mut legacy = Vec::new();
        tfhe::safe_serialization::safe_serialize(
            &tfhe::ClientKey::generate(fhecam_engine::fhe::config()),
            &mut legacy,
            fhecam_engine::fhe::limits::PUBLIC_KEY,
        )
        .unwrap();
        let model = fhecam_engine::testnet::random_model(
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(1),
            fhecam_engine::testnet::Shape::tiny(),
        );
        let id = fhecam_proto::ids::ModelId::random();
        let mut store = Store::create_or_open(&db).unwrap();
        store
            .insert(&NewModel {
                id,
                name: "old",
                arch: &model,
                encrypted_model: b"x",
                public_key: b"x",
                server_key: b"x",
                sealed_key: &seal_raw_key(&legacy, &id, &pass, kdf).unwrap(),
            })
            .unwrap();
        drop(store);
        let pf = d.path().join("pass");
        fhecam_owner::store::create_private(&pf).unwrap();
        std::fs::write(&pf, "a long test passphrase").unwrap();
        let mut cfg = AgentConfig::new(db, d.path().join("state.db"));
        cfg.passphrase_file = Some(pf);
        let p = preflight(&cfg).unwrap();
        assert_eq!(p.unusable.len(), 1, "{:?}", p.unusable);
        assert!(
            p.unusable[0].contains("protect the model again"),
            "{:?}",
            p.unusable
        );
    }

    #[test]
    fn state_before_epochs_is_kept_as_epoch_0() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.db");
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(
            "CREATE TABLE seen (device TEXT NOT NULL, camera TEXT NOT NULL,
                 sequence INTEGER NOT NULL, model_id TEXT NOT NULL,
                 decrypted_unix INTEGER NOT NULL, PRIMARY KEY (device, camera, sequence));
             INSERT INTO seen VALUES ('d', 'c', 7, 'm', 1);",
        )
        .unwrap();
        drop(c);
        for _ in 0..2 {
            let c = open_state(&p).unwrap();
            let n: i64 = c
                .query_row(
                    "SELECT count(*) FROM results
                     WHERE device = 'd' AND camera = 'c' AND epoch = 0 AND sequence = 7",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 1);
        }
    }
}
