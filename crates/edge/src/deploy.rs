//! Which model a running camera runs, and which bundle may replace it.
//!
//! Every way a bundle reaches the camera — the configured file at start and on SIGHUP, an
//! MQTT push, a file dropped into `deploy.drop_dir` — is an *offer* judged by one rule
//! ([`admit`]) against the camera's high-water marks: the newest version of every model
//! name it ever accepted and the creation time of the newest bundle. The marks and the
//! running bundle live in `deploy.state_dir`, so neither a restart nor a replayed old
//! bundle (validly signed, once deployed) can move a camera back.
//!
//! A swap replaces the shared [`Current`]; a frame holds the model it was preprocessed for
//! until it finishes, so the swap happens at a frame boundary and the old model's results
//! carry the old version.

use super::config::{DeployConfig, EdgeConfig};
use ed25519_dalek::VerifyingKey;
use fhecam_engine::fhe::eval::InputMode;
use fhecam_engine::fhe::EdgeRuntime;
use fhecam_proto::bundle::{self, BundleError, BundleHeader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// A loaded model version, ready to run frames.
pub struct Deployed {
    pub header: BundleHeader,
    pub sha256: [u8; 32],
    pub rt: EdgeRuntime,
    /// PBS per frame in the camera's input mode.
    pub planned_pbs: u64,
}

impl Deployed {
    pub fn describe(&self) -> String {
        describe(&self.header)
    }
}

fn describe(h: &BundleHeader) -> String {
    format!("{} version {} ({})", h.name, h.version, h.model_id)
}

/// The model new frames are given to.
pub struct Current(RwLock<Arc<Deployed>>);

impl Current {
    pub fn new(d: Deployed) -> Self {
        Current(RwLock::new(Arc::new(d)))
    }

    pub fn get(&self) -> Arc<Deployed> {
        // a poisoned lock still holds a complete Arc: a swap is one assignment
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(super) fn set(&self, d: Arc<Deployed>) {
        match self.0.write() {
            Ok(mut g) => *g = d,
            Err(p) => *p.into_inner() = d,
        }
    }
}

/// The newest accepted version of one model name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub version: u32,
    pub model_id: String,
    /// SHA-256 of the whole bundle, hex.
    pub sha256: String,
}

/// What a camera has accepted so far (`deployed.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Marks {
    pub format: u32,
    pub models: BTreeMap<String, Mark>,
    /// `created_unix` of the newest bundle accepted (0: none yet).
    pub newest_created_unix: i64,
}

const MARKS_FORMAT: u32 = 1;
const MARKS_FILE: &str = "deployed.json";
pub const CURRENT_FILE: &str = "current.bundle";
/// `deployed.json` holds one line per model name; far below this.
const MAX_MARKS_BYTES: u64 = 4 << 20;

/// What [`admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The same bytes as the running bundle: nothing to do.
    Running,
    /// Newer than anything this camera accepted: take it.
    Newer,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Refusal {
    #[error("{got} is older than version {newest} of {name}, which this camera has accepted (rollback refused)")]
    Older {
        got: String,
        name: String,
        newest: u32,
    },
    #[error("{got} is not the bundle of that version this camera accepted before (same version, other bytes: refused; protect a new version instead)")]
    Conflict { got: String },
    #[error("{got} was protected before the newest model this camera accepted ({newest_unix} > {created_unix} unix s): a camera only moves to model versions protected later (protect it again to deploy it)")]
    Stale {
        got: String,
        created_unix: i64,
        newest_unix: i64,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The rollback rule. `running`: the bundle running now, if any.
pub fn admit(
    marks: &Marks,
    running: Option<&[u8; 32]>,
    h: &BundleHeader,
    sha256: &[u8; 32],
) -> Result<Verdict, Refusal> {
    if running == Some(sha256) {
        return Ok(Verdict::Running);
    }
    let got = describe(h);
    if let Some(m) = marks.models.get(&h.name) {
        if h.version < m.version {
            return Err(Refusal::Older {
                got,
                name: h.name.clone(),
                newest: m.version,
            });
        }
        if h.version == m.version && m.sha256 != hex::encode(sha256) {
            return Err(Refusal::Conflict { got });
        }
    }
    // covers moving back to another model name, and to a version accepted once and since
    // replaced
    if h.created_unix < marks.newest_created_unix
        || (marks
            .models
            .get(&h.name)
            .is_some_and(|m| m.version == h.version))
    {
        return Err(Refusal::Stale {
            got,
            created_unix: h.created_unix,
            newest_unix: marks.newest_created_unix,
        });
    }
    Ok(Verdict::Newer)
}

impl Marks {
    fn record(&mut self, h: &BundleHeader, sha256: &[u8; 32]) {
        self.format = MARKS_FORMAT;
        self.models.insert(
            h.name.clone(),
            Mark {
                version: h.version,
                model_id: h.model_id.to_string(),
                sha256: hex::encode(sha256),
            },
        );
        self.newest_created_unix = self.newest_created_unix.max(h.created_unix);
    }
}

#[derive(Debug, Error)]
pub enum DeployError {
    #[error("deploy.state_dir {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({msg}); it holds this camera's rollback protection: restore it, or delete it to accept any owner-signed bundle again")]
    Marks { path: String, msg: String },
    #[error("bundle {path}: {source}")]
    Bundle { path: String, source: BundleError },
    #[error("bundle {path} refused: {refusal}")]
    Refused { path: String, refusal: Refusal },
    #[error("{0}")]
    Runtime(String),
}

/// `deploy.state_dir`: the running bundle and the marks.
struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    fn open(dir: &Path) -> Result<Self, DeployError> {
        create_private_dir(dir).map_err(|source| DeployError::State {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(StateDir { dir: dir.into() })
    }

    fn marks_path(&self) -> PathBuf {
        self.dir.join(MARKS_FILE)
    }

    fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT_FILE)
    }

    fn load_marks(&self) -> Result<Marks, DeployError> {
        let p = self.marks_path();
        let bad = |msg: String| DeployError::Marks {
            path: p.display().to_string(),
            msg,
        };
        let bytes = match fhecam_proto::files::read_limited(&p, MAX_MARKS_BYTES) {
            Ok(b) => b,
            Err(fhecam_proto::files::ReadError::Io(e))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(Marks::default())
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let m: Marks = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != MARKS_FORMAT {
            return Err(bad(format!(
                "format {}, this fhecam reads {MARKS_FORMAT}",
                m.format
            )));
        }
        Ok(m)
    }

    /// The bundle first, then the marks: after a crash between the two, the bundle is
    /// simply offered again at the next start.
    fn save(&self, bytes: &[u8], marks: &Marks) -> Result<(), DeployError> {
        let err = |source| DeployError::State {
            path: self.dir.display().to_string(),
            source,
        };
        fhecam_proto::files::write_atomic(&self.current_path(), bytes, 0o600).map_err(err)?;
        let json =
            serde_json::to_vec_pretty(marks).map_err(|e| DeployError::Runtime(e.to_string()))?;
        fhecam_proto::files::write_atomic(&self.marks_path(), &json, 0o600).map_err(err)
    }
}

/// What `fhecam validate` says about `deploy.state_dir`, reading only: the marks and the
/// bundle deployed since, if any.
pub fn describe_state(dir: &Path) -> Result<String, DeployError> {
    let s = StateDir { dir: dir.into() };
    let marks = s.load_marks()?;
    let mut out = if marks.models.is_empty() {
        "no model accepted yet".to_string()
    } else {
        marks
            .models
            .iter()
            .map(|(n, m)| format!("{n} up to version {}", m.version))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if s.current_path().exists() {
        out += &format!(
            "; runs {} at start unless the configured bundle is newer",
            s.current_path().display()
        );
    }
    Ok(out)
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Judges and loads offers; owns the marks. Blocking: call from a blocking thread.
pub struct Deployer {
    owner: VerifyingKey,
    state: Option<StateDir>,
    marks: Marks,
    threads: usize,
    input_mode: InputMode,
}

/// What became of an offer.
pub enum Outcome {
    Running,
    Swapped(Box<Deployed>),
}

impl Deployer {
    /// The model to start with: the configured bundle, or the one deployed since (in
    /// `deploy.state_dir`) when that is newer or the configured file is unusable.
    pub fn start(cfg: &EdgeConfig, owner: VerifyingKey) -> Result<(Self, Deployed), DeployError> {
        let state = cfg
            .deploy
            .as_ref()
            .map(|d: &DeployConfig| StateDir::open(&d.state_dir))
            .transpose()?;
        let marks = match &state {
            Some(s) => s.load_marks()?,
            None => Marks::default(),
        };
        let mut me = Deployer {
            owner,
            state,
            marks,
            threads: cfg.infer.threads,
            input_mode: cfg.infer.input_mode,
        };
        let path = cfg.bundle.display().to_string();
        let configured = bundle::read_file(&cfg.bundle).map_err(|source| DeployError::Bundle {
            path: path.clone(),
            source,
        });
        let saved = me
            .state
            .as_ref()
            .map(|s| s.current_path())
            .filter(|p| p.exists());
        let Some(saved) = saved else {
            // nothing deployed since: the configured bundle, judged by the marks alone
            let bytes = configured?;
            return match me.offer(&bytes, None) {
                Ok(Outcome::Swapped(d)) => Ok((me, *d)),
                // nothing runs yet, so no offer can be the running one
                Ok(Outcome::Running) => Err(DeployError::Runtime(format!(
                    "bundle {path}: judged as running before anything ran"
                ))),
                Err(refusal) => Err(DeployError::Refused { path, refusal }),
            };
        };
        let saved_path = saved.display().to_string();
        let saved_bytes = bundle::read_file(&saved).map_err(|source| DeployError::Bundle {
            path: saved_path.clone(),
            source,
        })?;
        // the saved bundle was accepted once: load it as the running one, then offer the
        // configured file like any other
        let running = me
            .load(&saved_bytes)
            .map_err(|refusal| DeployError::Refused {
                path: saved_path.clone(),
                refusal,
            })?;
        let bytes = match configured {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("{e}; running {} deployed since", running.describe());
                return Ok((me, running));
            }
        };
        match me.offer(&bytes, Some(&running)) {
            Ok(Outcome::Swapped(d)) => Ok((me, *d)),
            Ok(Outcome::Running) => Ok((me, running)),
            Err(r) => {
                tracing::info!(
                    "configured bundle {path} not taken ({r}); running {} deployed since",
                    running.describe()
                );
                Ok((me, running))
            }
        }
    }

    /// Verifies, parses and starts the runtime of a bundle; no rule applied.
    fn load(&self, bytes: &[u8]) -> Result<Deployed, Refusal> {
        let v = bundle::verify(bytes, &self.owner).map_err(|e| Refusal::Invalid(e.to_string()))?;
        self.start_runtime(v, Sha256::digest(bytes).into(), bytes.len())
    }

    /// Parses a verified bundle (`sha256` of its `len` bytes) and starts its runtime.
    fn start_runtime(
        &self,
        v: bundle::VerifiedBundle<'_>,
        sha256: [u8; 32],
        len: usize,
    ) -> Result<Deployed, Refusal> {
        let invalid = |e: &dyn std::fmt::Display| Refusal::Invalid(e.to_string());
        let b = bundle::load_verified(v, len as u64).map_err(|e| invalid(&e))?;
        let rt = EdgeRuntime::new(&b.model, b.public, self.threads).map_err(|e| invalid(&e))?;
        let planned_pbs = rt
            .planned_pbs_in(self.input_mode)
            .map_err(|e| invalid(&format!("{} on this camera: {e}", describe(&b.header))))?
            .iter()
            .sum();
        Ok(Deployed {
            header: b.header,
            sha256,
            rt,
            planned_pbs,
        })
    }

    /// Judges an offer and, if it is newer, loads it and records it (state first, so a
    /// swapped-in model is never forgotten by a restart). The signature is checked and the
    /// bytes hashed once: a bundle is ~43 MB.
    pub fn offer(&mut self, bytes: &[u8], running: Option<&Deployed>) -> Result<Outcome, Refusal> {
        let v = bundle::verify(bytes, &self.owner).map_err(|e| Refusal::Invalid(e.to_string()))?;
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        match admit(&self.marks, running.map(|r| &r.sha256), &v.header, &sha256)? {
            Verdict::Running => return Ok(Outcome::Running),
            Verdict::Newer => {}
        }
        let d = self.start_runtime(v, sha256, bytes.len())?;
        let mut marks = self.marks.clone();
        marks.record(&d.header, &sha256);
        if let Some(s) = &self.state {
            s.save(bytes, &marks)
                .map_err(|e| Refusal::Invalid(format!("cannot record it: {e}")))?;
        }
        self.marks = marks;
        Ok(Outcome::Swapped(Box::new(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhecam_engine::model::InputSpec;

    fn header(name: &str, version: u32, created: i64) -> BundleHeader {
        BundleHeader {
            model_id: fhecam_proto::ids::ModelId([version as u8; 16]),
            name: name.into(),
            version,
            created_unix: created,
            input: InputSpec {
                channels: 1,
                height: 8,
                width: 8,
                bits: 2,
                scale: 1.0,
                zero: 0.0,
            },
            num_classes: 10,
            tfhe_params: String::new(),
            sections: vec![],
        }
    }

    #[test]
    fn rollback_rule() {
        let mut m = Marks::default();
        let (a1, a2, b1) = (
            header("a", 1, 100),
            header("a", 2, 200),
            header("b", 1, 150),
        );
        let (da1, da2, db1) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert_eq!(admit(&m, None, &a1, &da1), Ok(Verdict::Newer));
        m.record(&a1, &da1);
        assert_eq!(admit(&m, Some(&da1), &a1, &da1), Ok(Verdict::Running));
        // same version, other bytes (re-signed or altered)
        assert!(matches!(
            admit(&m, Some(&da1), &a1, &[9; 32]),
            Err(Refusal::Conflict { .. })
        ));
        assert_eq!(admit(&m, Some(&da1), &a2, &da2), Ok(Verdict::Newer));
        m.record(&a2, &da2);
        assert!(matches!(
            admit(&m, Some(&da2), &a1, &da1),
            Err(Refusal::Older { newest: 2, .. })
        ));
        // another model protected before the running one: refused; after: taken
        assert!(matches!(
            admit(&m, Some(&da2), &b1, &db1),
            Err(Refusal::Stale { .. })
        ));
        let b2 = header("b", 1, 300);
        assert_eq!(admit(&m, Some(&da2), &b2, &db1), Ok(Verdict::Newer));
        m.record(&b2, &db1);
        // and back to a's newest, accepted once: replaying it is a downgrade
        assert!(matches!(
            admit(&m, Some(&db1), &a2, &da2),
            Err(Refusal::Stale { .. })
        ));
    }
}
