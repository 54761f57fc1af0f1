//! The MQTT connection settings the edge daemon and the backend agent share: TLS files, the
//! rumqttc transport built from them, and the bounds of every connection field. Both
//! configurations check their `[mqtt]` section here, so a value that passes can never make
//! rumqttc or a `Duration` conversion panic at run time.

use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// `[mqtt.tls]`: TLS (rustls) to the broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// PEM client certificate, for brokers that authenticate clients by certificate
    /// (with `client_key`; both or neither).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum MqttSetupError {
    #[error("{field} {path}: {source}")]
    TlsFile {
        field: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{field} {path}: {msg}")]
    TlsPem {
        field: String,
        path: String,
        msg: String,
    },
    /// rustls refused the combination (e.g. a key that does not match its certificate).
    #[error("{field}: {msg}")]
    Tls { field: String, msg: String },
}

/// Largest TLS file read: a CA bundle is a few hundred KB at most, and a path pointing at a
/// device (`/dev/zero`) must not be read forever.
const MAX_TLS_FILE: u64 = 1 << 20;

fn read_tls_file(field: &str, path: &Path) -> Result<Vec<u8>, MqttSetupError> {
    crate::files::read_limited(path, MAX_TLS_FILE).map_err(|e| MqttSetupError::TlsFile {
        field: field.into(),
        path: path.display().to_string(),
        source: match e {
            crate::files::ReadError::Io(io) => io,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        },
    })
}

fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, MqttSetupError> {
    let pem_err = |msg: String| MqttSetupError::TlsPem {
        field: field.into(),
        path: path.display().to_string(),
        msg,
    };
    let bytes = read_tls_file(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(pem_err(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

fn read_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, MqttSetupError> {
    let bytes = read_tls_file(field, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| MqttSetupError::TlsPem {
        field: field.into(),
        path: path.display().to_string(),
        msg: format!("holds no PEM private key ({e})"),
    })
}

/// The rustls configuration of `[<section>.tls]`; every file is read and parsed here, so a
/// bad file is reported at start (and by `--check`/`validate`), not at the first connect.
fn client_config(section: &str, t: &TlsConfig) -> Result<rustls::ClientConfig, MqttSetupError> {
    let field = |f: &str| format!("{section}.tls.{f}");
    let ca_field = field("ca");
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certs(&ca_field, &t.ca)?);
    if added == 0 {
        return Err(MqttSetupError::TlsPem {
            field: ca_field,
            path: t.ca.display().to_string(),
            msg: "no certificate in it is a usable CA certificate".into(),
        });
    }
    // rustls needs one process-wide crypto provider for anything that asks for the default;
    // a second install is a no-op. Ours is explicit below.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MqttSetupError::Tls {
        field: format!("{section}.tls"),
        msg: e.to_string(),
    })?
    .with_root_certificates(roots);
    match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => {
            let certs = read_certs(&field("client_cert"), c)?;
            let key = read_key(&field("client_key"), k)?;
            // rustls checks that the key belongs to the certificate
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttSetupError::Tls {
                    field: field("client_key"),
                    msg: format!("does not fit {} ({e})", field("client_cert")),
                })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(MqttSetupError::Tls {
            field: format!("{section}.tls"),
            msg: "client_cert and client_key go together (both or neither)".into(),
        }),
    }
}

/// The TLS transport of `[mqtt.tls]`, for both `rumqttc::MqttOptions` (daemon) and
/// `rumqttc::v5::MqttOptions` (agent): both take a `rumqttc::Transport`.
pub fn tls_transport(t: &TlsConfig) -> Result<Transport, MqttSetupError> {
    let config = client_config("mqtt", t)?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

/// The broker connection: the fields the edge's and the agent's `[mqtt]` sections share,
/// defined and bounded once here. Each section is a [`Section`]: these fields and the role's
/// own side by side in one TOML table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Connection {
    /// Broker host name or address (1..=253 bytes, no whitespace).
    pub host: String,
    /// Broker port (1..=65535; 0 is refused).
    pub port: u16,
    /// Client id, stable across restarts so the broker keeps the persistent session and its
    /// unacknowledged messages. 1..=64 of A-Z a-z 0-9 . _ : -. Default: the edge's
    /// `fhecam-<device_id>-<camera_id>`, the agent's `fhecam-agent-<hostname>-<group>`.
    pub client_id: Option<String>,
    /// MQTT keep-alive, 5..=65535 s (sent as a 16-bit number).
    pub keep_alive_s: u64,
    /// First reconnect delay after a lost connection; doubled per failure, ±25 % jitter.
    /// 0.01..=3600 s, at most `reconnect_backoff_max_s`.
    pub reconnect_backoff_initial_s: f64,
    /// Largest reconnect delay (0.01..=3600 s).
    pub reconnect_backoff_max_s: f64,
    /// Broker user name (1..=65535 bytes, no NUL).
    pub username: Option<String>,
    /// Password; prefer the `FHECAM_MQTT__PASSWORD` environment variable to the file.
    /// At most 65535 bytes, no NUL.
    pub password: Option<String>,
    /// `[mqtt.tls]`: TLS (rustls) to the broker when set; the files are read and checked by
    /// `validate` / `--check`. The transport: [`tls_transport`].
    pub tls: Option<TlsConfig>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            keep_alive_s: 30,
            reconnect_backoff_initial_s: 0.5,
            reconnect_backoff_max_s: 30.0,
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// The `[mqtt]` section: the shared [`Connection`] and a role's own fields (`R`: the edge's
/// topic prefix and stats interval, the agent's group and topics) in one flat table, as
/// users write it. Each part refuses keys it does not know.
#[derive(Clone, Debug, Default)]
pub struct Section<R> {
    pub conn: Connection,
    pub role: R,
}

// serde's `flatten` cannot be combined with `deny_unknown_fields`, and its buffering would
// lose the config crate's conversions (a numeric password from the environment arrives as
// an integer): split the table as config values and let each part deserialize its keys.
impl<'de, R: serde::de::DeserializeOwned> Deserialize<'de> for Section<R> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let table = config::Value::deserialize(d)?
            .into_table()
            .map_err(D::Error::custom)?;
        let conn_fields = field_names::<Connection>();
        let role_fields = field_names::<R>();
        if let Some(k) = table
            .keys()
            .find(|k| !conn_fields.contains(&k.as_str()) && !role_fields.contains(&k.as_str()))
        {
            return Err(D::Error::custom(format!(
                "unknown field `{k}`, expected one of {}",
                conn_fields
                    .iter()
                    .chain(role_fields)
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (conn, role): (config::Map<_, _>, config::Map<_, _>) = table
            .into_iter()
            .partition(|(k, _)| conn_fields.contains(&k.as_str()));
        Ok(Section {
            conn: config::Value::from(conn)
                .try_deserialize()
                .map_err(|e| D::Error::custom(in_section(e)))?,
            role: config::Value::from(role)
                .try_deserialize()
                .map_err(|e| D::Error::custom(in_section(e)))?,
        })
    }
}

/// The field names serde knows for struct `T`: a deserializer that only asks.
fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// An error of one part, its key named in full (`mqtt.port`) as the config crate names the
/// keys of other sections; a part cannot hand back the crate's own error type.
fn in_section(e: config::ConfigError) -> config::ConfigError {
    let key = match &e {
        config::ConfigError::Type { key: Some(k), .. } => format!("mqtt.{k}"),
        _ => return e,
    };
    e.extend_with_key(&key)
}

/// Largest packet MQTT can carry (its remaining-length field): a pushed bundle must fit.
pub const MAX_PACKET: usize = 268_435_455;

/// Longest host name (DNS limit).
pub const MAX_HOST: usize = 253;
/// Longest client id: MQTT 3.1.1 promises 23, mosquitto takes far more; 64 leaves room for
/// the agent's `fhecam-agent-<host>-<group>`.
pub const MAX_CLIENT_ID: usize = 64;
/// rumqttc sends the keep-alive as a u16; more would wrap.
pub const KEEP_ALIVE_S: std::ops::RangeInclusive<u64> = 5..=65535;
/// Reconnect backoff bounds (seconds): below 10 ms a dead broker is hammered, above an hour
/// a device looks dead.
pub const BACKOFF_S: std::ops::RangeInclusive<f64> = 0.01..=3600.0;
/// MQTT strings carry a 16-bit length.
pub const MAX_MQTT_STRING: usize = 65535;

/// A client id the broker and every MQTT version accept: 1..=64 of A-Z a-z 0-9 . _ : -
pub fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// `v` is finite and within `range`, else an error naming `field`.
pub fn check_range(
    field: &str,
    v: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<(), String> {
    if v.is_finite() && range.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "{field} must be {}..={}, got {v}",
            range.start(),
            range.end()
        ))
    }
}

/// A reconnect or restart backoff: both delays within [`BACKOFF_S`], the first at most
/// the largest. Each is (field name, value).
pub fn check_backoff(initial: (&str, f64), max: (&str, f64)) -> Result<(), String> {
    check_range(initial.0, initial.1, BACKOFF_S)?;
    check_range(max.0, max.1, BACKOFF_S)?;
    if initial.1 > max.1 {
        return Err(format!(
            "{} ({}) must not exceed {} ({})",
            initial.0, initial.1, max.0, max.1
        ));
    }
    Ok(())
}

/// Checks `[<section>]`: every message names the field (`mqtt.port must be 1..=65535, got 0`).
/// TLS files are read and parsed.
pub fn check_connection(section: &str, c: &Connection) -> Result<(), String> {
    let f = |name: &str| format!("{section}.{name}");
    if c.host.is_empty()
        || c.host.len() > MAX_HOST
        || c.host
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
    {
        return Err(format!(
            "{} must be 1..={MAX_HOST} bytes without whitespace or control characters, got {} bytes",
            f("host"),
            c.host.len()
        ));
    }
    if c.port == 0 {
        return Err(format!("{} must be 1..=65535, got 0", f("port")));
    }
    if let Some(id) = &c.client_id {
        if !valid_client_id(id) {
            return Err(format!(
                "{} must be 1..={MAX_CLIENT_ID} characters of A-Z a-z 0-9 . _ : -, got {} bytes",
                f("client_id"),
                id.len()
            ));
        }
    }
    if !KEEP_ALIVE_S.contains(&c.keep_alive_s) {
        return Err(format!(
            "{} must be {}..={}, got {}",
            f("keep_alive_s"),
            KEEP_ALIVE_S.start(),
            KEEP_ALIVE_S.end(),
            c.keep_alive_s
        ));
    }
    check_backoff(
        (
            &f("reconnect_backoff_initial_s"),
            c.reconnect_backoff_initial_s,
        ),
        (&f("reconnect_backoff_max_s"), c.reconnect_backoff_max_s),
    )?;
    if let Some(u) = &c.username {
        if u.is_empty() || u.len() > MAX_MQTT_STRING || u.contains('\0') {
            return Err(format!(
                "{} must be 1..={MAX_MQTT_STRING} bytes without NUL, got {} bytes",
                f("username"),
                u.len()
            ));
        }
    }
    if let Some(p) = &c.password {
        // empty is legitimate: a client authenticated by certificate
        if p.len() > MAX_MQTT_STRING || p.contains('\0') {
            return Err(format!(
                "{} must be at most {MAX_MQTT_STRING} bytes without NUL, got {} bytes",
                f("password"),
                p.len()
            ));
        }
    }
    if let Some(t) = &c.tls {
        if t.client_cert.is_some() != t.client_key.is_some() {
            return Err(format!(
                "{} and {} go together (both or neither)",
                f("tls.client_cert"),
                f("tls.client_key")
            ));
        }
        for (name, p) in [
            ("tls.ca", Some(&t.ca)),
            ("tls.client_cert", t.client_cert.as_ref()),
            ("tls.client_key", t.client_key.as_ref()),
        ] {
            if let Some(p) = p {
                check_path(&f(name), p)?;
            }
        }
        client_config(section, t).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// A path is non-empty, at most 4096 bytes, without NUL.
pub fn check_path(field: &str, p: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let b = p.as_os_str().as_bytes();
    if b.is_empty() || b.len() > MAX_PATH || b.contains(&0) {
        return Err(format!(
            "{field} must be a path of 1..={MAX_PATH} bytes without NUL, got {} bytes",
            b.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> Connection {
        Connection::default()
    }

    #[test]
    fn bounds_name_the_field() {
        assert!(check_connection("mqtt", &view()).is_ok());
        let e = check_connection("mqtt", &Connection { port: 0, ..view() }).unwrap_err();
        assert_eq!(e, "mqtt.port must be 1..=65535, got 0");
        for (v, field) in [
            (
                Connection {
                    keep_alive_s: 70000,
                    ..view()
                },
                "mqtt.keep_alive_s",
            ),
            (
                Connection {
                    reconnect_backoff_initial_s: f64::INFINITY,
                    ..view()
                },
                "mqtt.reconnect_backoff_initial_s",
            ),
            (
                Connection {
                    reconnect_backoff_max_s: 1e20,
                    ..view()
                },
                "mqtt.reconnect_backoff_max_s",
            ),
            (
                Connection {
                    reconnect_backoff_initial_s: 60.0,
                    ..view()
                },
                "mqtt.reconnect_backoff_initial_s",
            ),
            (
                Connection {
                    host: "".into(),
                    ..view()
                },
                "mqtt.host",
            ),
            (
                Connection {
                    host: "a b".into(),
                    ..view()
                },
                "mqtt.host",
            ),
            (
                Connection {
                    client_id: Some("".into()),
                    ..view()
                },
                "mqtt.client_id",
            ),
            (
                Connection {
                    password: Some("a\0b".into()),
                    ..view()
                },
                "mqtt.password",
            ),
        ] {
            let e = check_connection("mqtt", &v).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn tls_files_are_read_and_parsed() {
        let d = tempfile::tempdir().unwrap();
        let t = TlsConfig {
            ca: d.path().join("missing.pem"),
            client_cert: None,
            client_key: None,
        };
        // Transport is not Debug: no unwrap_err
        let e = tls_transport(&t).err().unwrap().to_string();
        assert!(
            e.starts_with("mqtt.tls.ca ") && e.contains("missing.pem"),
            "{e}"
        );
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = tls_transport(&TlsConfig { ca: junk, ..t })
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("mqtt.tls.ca") && e.contains("no PEM certificate"),
            "{e}"
        );
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Role {
        topic: String,
    }

    fn section(toml: &str) -> Result<Section<Role>, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .get("mqtt")
    }

    #[test]
    fn a_section_splits_into_the_connection_and_the_role() {
        let s = section(
            "[mqtt]\nhost = \"b\"\nport = 1884\ntopic = \"t\"\n[mqtt.tls]\nca = \"c.pem\"\n",
        )
        .unwrap();
        assert_eq!((s.conn.host.as_str(), s.conn.port), ("b", 1884));
        assert_eq!(s.conn.tls.unwrap().ca, PathBuf::from("c.pem"));
        assert_eq!(s.role.topic, "t");
        assert_eq!(s.conn.keep_alive_s, Connection::default().keep_alive_s);
        let e = section("[mqtt]\nhots = \"b\"\n").unwrap_err().to_string();
        assert!(
            e.contains("hots") && e.contains("`host`") && e.contains("`topic`"),
            "{e}"
        );
        let e = section("[mqtt.tls]\nca = \"c\"\ncert = \"d\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert"), "{e}");
        let e = section("[mqtt]\nport = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("mqtt.port"), "{e}");
    }

    #[test]
    fn environment_values_keep_the_config_crates_conversions() {
        // as the edge and the agent load them: numbers parsed, a numeric password kept
        let vars: std::collections::HashMap<String, String> = [
            ("FHECAM_MQTT__PORT", "1884"),
            ("FHECAM_MQTT__PASSWORD", "12345"),
            ("FHECAM_MQTT__TOPIC", "from-env"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let s: Section<Role> = config::Config::builder()
            .add_source(config::File::from_str(
                "[mqtt]\nhost = \"b\"\n",
                config::FileFormat::Toml,
            ))
            .add_source(
                config::Environment::with_prefix("FHECAM")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(vars)),
            )
            .build()
            .unwrap()
            .get("mqtt")
            .unwrap();
        assert_eq!(s.conn.port, 1884);
        assert_eq!(s.conn.password.as_deref(), Some("12345"));
        assert_eq!(s.role.topic, "from-env");
    }
}
