//! The cockpit's MQTT link: subscribes to what feeds the board (retained camera status,
//! the agent's results and refusals) and applies every message as it arrives. MQTT v5, so
//! the broker itself withholds a message over `limits.max_payload_bytes` instead of the
//! client dropping the connection on it (and receiving the same retained message again).

use crate::board::{Board, Topics};
use crate::config::CockpitConfig;
use crate::CockpitError;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the link shares with the web server.
pub struct Shared {
    pub board: Mutex<Board>,
    /// Bumped after every message the board took: live streams wake on it.
    pub version: watch::Sender<u64>,
    pub broker_connected: AtomicBool,
}

impl Shared {
    pub fn new(board: Board) -> Self {
        Shared {
            board: Mutex::new(board),
            version: watch::Sender::new(0),
            broker_connected: AtomicBool::new(false),
        }
    }
}

pub fn topics(cfg: &CockpitConfig) -> Topics {
    let t = &cfg.mqtt.role;
    Topics {
        edge_prefix: t.edge_prefix.clone(),
        cockpit_prefix: t.cockpit_prefix.clone(),
        dead_letter_topic: t.dead_letter_topic.clone(),
    }
}

fn options(cfg: &CockpitConfig) -> Result<MqttOptions, CockpitError> {
    let m = &cfg.mqtt.conn;
    // a viewer keeps no session: the retained messages rebuild the board on every connect
    let id = m
        .client_id
        .clone()
        .unwrap_or_else(|| format!("fhecam-cockpit-{:016x}", rand::random::<u64>()));
    let mut o = MqttOptions::new(id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    o.set_clean_start(true);
    o.set_max_packet_size(Some((cfg.limits.max_payload_bytes + 4096) as u32));
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if let Some(t) = &m.tls {
        o.set_transport(fhecam_proto::mqtt::tls_transport(t)?);
    }
    Ok(o)
}

/// Runs until `shutdown`: connects (and reconnects with the configured backoff),
/// subscribes and applies messages to the board.
pub async fn run(
    cfg: &CockpitConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), CockpitError> {
    let (client, mut eventloop) = AsyncClient::new(options(cfg)?, 64);
    let filters = topics(cfg).filters();
    let conn = &cfg.mqtt.conn;
    let mut backoff = conn.reconnect_backoff_initial_s;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("cockpit connected to {}:{}", conn.host, conn.port);
                backoff = conn.reconnect_backoff_initial_s;
                shared.broker_connected.store(true, Ordering::Relaxed);
                shared.version.send_modify(|v| *v += 1);
                for f in &filters {
                    client
                        .subscribe(f.clone(), QoS::AtMostOnce)
                        .await
                        .map_err(|e| CockpitError::Mqtt(e.to_string()))?;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic);
                let now = fhecam_proto::ids::unix_now_ms();
                let took = match shared.board.lock() {
                    Ok(mut b) => b.apply(&topic, &p.payload, now),
                    Err(_) => return Err(CockpitError::Poisoned),
                };
                if !took {
                    tracing::debug!("ignored a message on {topic}");
                }
                shared.version.send_modify(|v| *v += 1);
            }
            Ok(_) => {}
            Err(e) => {
                if shared.broker_connected.swap(false, Ordering::Relaxed) {
                    shared.version.send_modify(|v| *v += 1);
                }
                tracing::warn!(
                    "broker {}:{}: {e}; retrying in {backoff:.1} s",
                    conn.host,
                    conn.port
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs_f64(backoff)) => {}
                }
                backoff = (backoff * 2.0).min(conn.reconnect_backoff_max_s);
            }
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}
