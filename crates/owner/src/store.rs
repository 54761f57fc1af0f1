//! The owner's protected-model database (SQLite): one row per model version with its public
//! architecture, encrypted parameters, public key, compressed server key and the secret
//! `ClientKey` sealed under the owner's passphrase (`secret`). The file is created 0600 and
//! refused when group or others can read it.

use crate::secret::{self, KdfParams, Passphrase, Sealed, NONCE_LEN, SALT_LEN};
use fhecam_engine::fhe::{self, OwnerKeys};
use fhecam_engine::model::{InputSpec, Model};
use fhecam_proto::ids::{unix_now, ModelId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// `PRAGMA user_version` of the schema below.
pub const SCHEMA_VERSION: i64 = 1;
/// Longest model name.
pub const MAX_NAME_LEN: usize = 128;

const SCHEMA: &str = "
CREATE TABLE models (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    created_unix    INTEGER NOT NULL,
    tfhe_params     TEXT NOT NULL,
    arch_json       TEXT NOT NULL,
    encrypted_model BLOB NOT NULL,
    public_key      BLOB NOT NULL,
    server_key      BLOB NOT NULL,
    key_kdf_m_kib   INTEGER NOT NULL,
    key_kdf_t       INTEGER NOT NULL,
    key_kdf_p       INTEGER NOT NULL,
    key_salt        BLOB NOT NULL,
    key_nonce       BLOB NOT NULL,
    key_sealed      BLOB NOT NULL,
    UNIQUE (name, version)
);
";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} does not exist (`fhecam protect` creates it)", .0.display())]
    Missing(PathBuf),
    #[error("{} has mode {mode:04o}: it holds the sealed owner keys and must not be readable by group or others (chmod 600 it)", .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("{}: {source}", .path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{}: schema version {found}, this fhecam reads {SCHEMA_VERSION}", .path.display())]
    Schema { path: PathBuf, found: i64 },
    #[error("model id {id} is not in {}", .path.display())]
    NotFound { id: ModelId, path: PathBuf },
    #[error("invalid model name {0:?}: 1 to {MAX_NAME_LEN} characters, no control characters")]
    BadName(String),
    #[error("{}: record {id} is corrupt: {msg}", .path.display())]
    Corrupt {
        path: PathBuf,
        id: String,
        msg: String,
    },
    #[error("the owner key of model {id}: {source}")]
    Secret {
        id: ModelId,
        source: secret::SecretError,
    },
    #[error("the owner key of model {id}: {source}")]
    Key { id: ModelId, source: fhe::FheError },
}

/// What `protect` stores for a new model version.
pub struct NewModel<'a> {
    pub id: ModelId,
    pub name: &'a str,
    /// The public architecture (parameters stripped: `EncryptedModel::arch`).
    pub arch: &'a Model,
    pub encrypted_model: &'a [u8],
    pub public_key: &'a [u8],
    pub server_key: &'a [u8],
    /// `OwnerKeys::to_bytes()` sealed with `seal_owner_keys`.
    pub sealed_key: &'a Sealed,
}

/// A row without its blobs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelSummary {
    pub id: ModelId,
    pub name: String,
    pub version: u32,
    pub created_unix: i64,
    pub tfhe_params: String,
    pub input: InputSpec,
    pub num_classes: usize,
    pub encrypted_model_bytes: u64,
    pub public_key_bytes: u64,
    pub server_key_bytes: u64,
    pub sealed_key_bytes: u64,
}

/// Everything an edge device may receive about a model version; nothing secret.
pub struct PublicRecord {
    pub summary: ModelSummary,
    pub arch: Model,
    pub encrypted_model: Vec<u8>,
    pub public_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// Associated data binding a sealed key to its model id (and to this use).
fn key_context(id: &ModelId) -> Vec<u8> {
    let mut aad = b"fhecam owner client key v1:".to_vec();
    aad.extend_from_slice(&id.0);
    aad
}

/// Seals `OwnerKeys` for the record `id`; the serialized key is zeroized after use.
pub fn seal_owner_keys(
    keys: &OwnerKeys,
    id: &ModelId,
    pass: &Passphrase,
    kdf: KdfParams,
) -> Result<Sealed, StoreError> {
    let bytes = zeroize::Zeroizing::new(
        keys.to_bytes()
            .map_err(|source| StoreError::Key { id: *id, source })?,
    );
    secret::seal(&bytes, pass, &key_context(id), kdf)
        .map_err(|source| StoreError::Secret { id: *id, source })
}

/// Seals raw key bytes as `seal_owner_keys` would: for tests of keys written by older
/// versions (the agent's among them).
#[doc(hidden)]
pub fn seal_raw_key(
    bytes: &[u8],
    id: &ModelId,
    pass: &Passphrase,
    kdf: KdfParams,
) -> Result<Sealed, StoreError> {
    secret::seal(bytes, pass, &key_context(id), kdf)
        .map_err(|source| StoreError::Secret { id: *id, source })
}

pub fn validate_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control)
    {
        return Err(StoreError::BadName(name.into()));
    }
    Ok(())
}

fn check_mode(path: &Path) -> Result<(), StoreError> {
    let meta = std::fs::metadata(path).map_err(|source| StoreError::Io {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile(path.into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 unless it exists (before SQLite touches it, so the
/// file and its journal are never readable by others); safe when two processes race.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

const SUMMARY_COLS: &str = "id, name, version, created_unix, tfhe_params, arch_json, \
     length(encrypted_model), length(public_key), length(server_key), length(key_sealed)";

impl Store {
    /// Opens the database, creating it (mode 0600, before SQLite touches it) if needed.
    pub fn create_or_open(path: &Path) -> Result<Store, StoreError> {
        create_private(path).map_err(|source| StoreError::Io {
            path: path.into(),
            source,
        })?;
        Self::open(path)
    }

    /// An existing 0600 file opened with `flags`, and its schema version.
    fn connect(path: &Path, flags: OpenFlags) -> Result<(Connection, i64), StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.into()));
        }
        check_mode(path)?;
        let sql = |source| StoreError::Sqlite {
            path: path.into(),
            source,
        };
        // No SQLITE_OPEN_CREATE: the file was created with the right mode before. SQLite
        // gives its journal the database file's permissions.
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        Ok((conn, version))
    }

    /// Opens an existing, initialised database read-only: the backend agent and checks
    /// never write the owner's database, and an empty file is refused, not initialised.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let (conn, version) = Self::connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path: path.into(),
                found: version,
            });
        }
        Ok(Store {
            conn,
            path: path.into(),
        })
    }

    /// Opens an existing database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let (conn, version) = Self::connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let sql = |source| StoreError::Sqlite {
            path: path.into(),
            source,
        };
        match version {
            0 => {
                let tables: i64 = conn
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(sql)?;
                if tables != 0 {
                    return Err(StoreError::Schema {
                        path: path.into(),
                        found: 0,
                    });
                }
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sql)?;
            }
            SCHEMA_VERSION => {}
            found => {
                return Err(StoreError::Schema {
                    path: path.into(),
                    found,
                })
            }
        }
        Ok(Store {
            conn,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, id: &str, msg: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            id: id.into(),
            msg: msg.into(),
        }
    }

    /// Stores a new version of `new.name`; returns its version number (1, 2, …).
    pub fn insert(&mut self, new: &NewModel) -> Result<u32, StoreError> {
        validate_name(new.name)?;
        let arch_json = serde_json::to_string(new.arch)
            .map_err(|e| self.corrupt(&new.id.to_string(), e.to_string()))?;
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // IMMEDIATE: two concurrent `protect` runs cannot pick the same version number.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let version: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?1",
                [new.name],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let s = new.sealed_key;
        tx.execute(
            "INSERT INTO models (id, name, version, created_unix, tfhe_params, arch_json,
                encrypted_model, public_key, server_key,
                key_kdf_m_kib, key_kdf_t, key_kdf_p, key_salt, key_nonce, key_sealed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                new.id.to_string(),
                new.name,
                version,
                unix_now(),
                fhe::PARAMS_NAME,
                arch_json,
                new.encrypted_model,
                new.public_key,
                new.server_key,
                s.kdf.m_cost_kib,
                s.kdf.t_cost,
                s.kdf.p_cost,
                &s.salt[..],
                &s.nonce[..],
                &s.ciphertext,
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(version as u32)
    }

    fn summary_from_row(&self, r: &rusqlite::Row) -> Result<(ModelSummary, Model), StoreError> {
        let get =
            |r: &rusqlite::Row, i| -> Result<i64, StoreError> { r.get(i).map_err(|e| self.sql(e)) };
        let id: String = r.get(0).map_err(|e| self.sql(e))?;
        let arch_json: String = r.get(5).map_err(|e| self.sql(e))?;
        let arch: Model = serde_json::from_str(&arch_json)
            .map_err(|e| self.corrupt(&id, format!("architecture: {e}")))?;
        let summary = ModelSummary {
            id: id
                .parse()
                .map_err(|e: fhecam_proto::ids::BadModelId| self.corrupt(&id, e.to_string()))?,
            name: r.get(1).map_err(|e| self.sql(e))?,
            version: get(r, 2)? as u32,
            created_unix: get(r, 3)?,
            tfhe_params: r.get(4).map_err(|e| self.sql(e))?,
            input: arch.input.clone(),
            num_classes: arch.num_classes,
            encrypted_model_bytes: get(r, 6)? as u64,
            public_key_bytes: get(r, 7)? as u64,
            server_key_bytes: get(r, 8)? as u64,
            sealed_key_bytes: get(r, 9)? as u64,
        };
        Ok((summary, arch))
    }

    /// Every model version, by name then version.
    pub fn list(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {SUMMARY_COLS} FROM models ORDER BY name, version"
            ))
            .map_err(|e| self.sql(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(|e| self.sql(e))? {
            out.push(self.summary_from_row(r)?.0);
        }
        Ok(out)
    }

    pub fn summary(&self, id: &ModelId) -> Result<ModelSummary, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {SUMMARY_COLS} FROM models WHERE id = ?1"))
            .map_err(|e| self.sql(e))?;
        let mut rows = stmt.query([id.to_string()]).map_err(|e| self.sql(e))?;
        match rows.next().map_err(|e| self.sql(e))? {
            Some(r) => Ok(self.summary_from_row(r)?.0),
            None => Err(self.not_found(id)),
        }
    }

    fn not_found(&self, id: &ModelId) -> StoreError {
        StoreError::NotFound {
            id: *id,
            path: self.path.clone(),
        }
    }

    /// The public part of a record: what a bundle carries.
    pub fn public_record(&self, id: &ModelId) -> Result<PublicRecord, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {SUMMARY_COLS}, encrypted_model, public_key, server_key FROM models WHERE id = ?1"
            ))
            .map_err(|e| self.sql(e))?;
        let mut rows = stmt.query([id.to_string()]).map_err(|e| self.sql(e))?;
        let r = rows
            .next()
            .map_err(|e| self.sql(e))?
            .ok_or_else(|| self.not_found(id))?;
        let (summary, arch) = self.summary_from_row(r)?;
        Ok(PublicRecord {
            summary,
            arch,
            encrypted_model: r.get(10).map_err(|e| self.sql(e))?,
            public_key: r.get(11).map_err(|e| self.sql(e))?,
            server_key: r.get(12).map_err(|e| self.sql(e))?,
        })
    }

    /// The sealed secret key of a record, as stored.
    pub fn sealed_key(&self, id: &ModelId) -> Result<Sealed, StoreError> {
        let ids = id.to_string();
        let row = self
            .conn
            .query_row(
                "SELECT key_kdf_m_kib, key_kdf_t, key_kdf_p, key_salt, key_nonce, key_sealed
                 FROM models WHERE id = ?1",
                [&ids],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .ok_or_else(|| self.not_found(id))?;
        let (m, t, p, salt, nonce, ciphertext) = row;
        let u32_of = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| self.corrupt(&ids, format!("{what} = {v}")))
        };
        Ok(Sealed {
            kdf: KdfParams {
                m_cost_kib: u32_of(m, "kdf memory")?,
                t_cost: u32_of(t, "kdf passes")?,
                p_cost: u32_of(p, "kdf lanes")?,
            },
            salt: <[u8; SALT_LEN]>::try_from(salt.as_slice())
                .map_err(|_| self.corrupt(&ids, "salt length"))?,
            nonce: <[u8; NONCE_LEN]>::try_from(nonce.as_slice())
                .map_err(|_| self.corrupt(&ids, "nonce length"))?,
            ciphertext,
        })
    }

    /// Opens the owner's secret key of a model version with the passphrase.
    pub fn owner_keys(&self, id: &ModelId, pass: &Passphrase) -> Result<OwnerKeys, StoreError> {
        let sealed = self.sealed_key(id)?;
        let bytes = secret::open(&sealed, pass, &key_context(id))
            .map_err(|source| StoreError::Secret { id: *id, source })?;
        OwnerKeys::from_bytes(&bytes).map_err(|source| StoreError::Key { id: *id, source })
    }
}
