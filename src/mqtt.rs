//! TEMP (replaced by the mqtt-config branch)
pub use crate::edge::config::TlsConfig;

pub fn tls_transport(t: &TlsConfig) -> Result<rumqttc::Transport, std::io::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = std::fs::read;
    let client_auth = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
        ca: read(&t.ca)?,
        alpn: None,
        client_auth,
    }))
}
