//! The publish stage: outbox first, then MQTT QoS 1 on a persistent session. The I/O loop
//! (`run`) is kept apart from the pure bookkeeping of which outbox entry is in flight under
//! which packet id (`InFlight`).
//!
//! rumqttc forgets unacknowledged publishes when the broker answers a reconnect without the
//! old session, and has no reconnect backoff of its own: both are handled here.

use super::config::{secs, EdgeConfig};
use super::deploy::Current;
use super::intake::{Offer, Origin};
use super::outbox::{Outbox, OutboxError};
use super::stats::Stats;
use fhecam_proto::envelope::{self, Envelope};
use fhecam_proto::retry::backoff;
use fhecam_proto::status::Status;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

#[derive(Debug, Error)]
pub enum PublishError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("envelope: {0}")]
    Envelope(#[from] fhecam_proto::envelope::EnvelopeError),
    #[error("MQTT: {0}")]
    Setup(#[from] fhecam_proto::mqtt::MqttSetupError),
}

/// Publishes handed to rumqttc (in request order) and the packet ids they got.
#[derive(Default, Debug)]
pub struct InFlight {
    /// One entry per publish request not yet seen going out: `Some(seq)` for an outbox
    /// entry, `None` for availability and stats messages.
    requested: VecDeque<Option<u64>>,
    /// Packet id → outbox sequence, for publishes sent and not yet acknowledged.
    sent: HashMap<u16, u64>,
    /// Outbox sequences handed to rumqttc and not yet acknowledged.
    handed: BTreeSet<u64>,
}

impl InFlight {
    pub fn requested(&mut self, seq: Option<u64>) {
        if let Some(s) = seq {
            self.handed.insert(s);
        }
        self.requested.push_back(seq);
    }

    /// A publish went out with `pkid`. A packet id still awaiting its PUBACK is a
    /// retransmission by rumqttc (session resumed), not a new request.
    pub fn sent(&mut self, pkid: u16) {
        if pkid != 0 && self.sent.contains_key(&pkid) {
            return;
        }
        if let Some(Some(seq)) = self.requested.pop_front() {
            if pkid != 0 {
                self.sent.insert(pkid, seq);
            }
        }
    }

    /// The broker acknowledged `pkid`: the outbox entry it carried, if any.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.sent.remove(&pkid)?;
        self.handed.remove(&seq);
        Some(seq)
    }

    /// The broker has no session for us: rumqttc dropped everything it held.
    pub fn session_lost(&mut self) {
        *self = InFlight::default();
    }

    pub fn is_handed(&self, seq: u64) -> bool {
        self.handed.contains(&seq)
    }

    pub fn handed_len(&self) -> usize {
        self.handed.len()
    }

    /// An entry the outbox dropped (full) can no longer be acknowledged usefully.
    pub fn forget(&mut self, seq: u64) {
        self.handed.remove(&seq);
    }
}

/// A finished inference on its way to the outbox (the sequence number is given there).
pub struct Finished {
    pub envelope: Envelope,
}

/// Events the daemon's supervisor cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishEvent {
    Connected,
    Disconnected,
}

/// What the publisher shares with the rest of the daemon.
pub struct Links {
    pub stats: Arc<Stats>,
    /// The model running now, reported with the counters.
    pub current: Arc<Current>,
    /// Fired when the model changed: report at once.
    pub changed: Arc<Notify>,
    /// Where pushed bundles go (`None`: pushes are not taken, no subscription).
    pub offers: Option<mpsc::Sender<Offer>>,
}

/// Largest packet MQTT can carry (its remaining-length field): a pushed bundle must fit.
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Entries handed to rumqttc at once at most (each is up to ~1 MB of ciphertext).
const MAX_HANDED: usize = 16;
/// Request channel between our loop and rumqttc's event loop.
const CLIENT_CAPACITY: usize = 64;

pub fn mqtt_options(cfg: &EdgeConfig) -> Result<MqttOptions, PublishError> {
    let m = &cfg.mqtt.conn;
    let mut o = MqttOptions::new(cfg.client_id(), m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // Persistent session: the broker keeps our unacknowledged QoS 1 messages across a
    // reconnect (with a clean session rumqttc lost a third of them in a partition).
    o.set_clean_session(false);
    let max = envelope::MAX_ENVELOPE_BYTES + 4096;
    // incoming: only pushed bundles are large
    let incoming = if cfg.deploy.as_ref().is_some_and(|d| d.push) {
        MQTT_MAX_PACKET
    } else {
        64 << 10
    };
    o.set_max_packet_size(incoming, max);
    o.set_inflight(MAX_HANDED as u16 + 4);
    o.set_last_will(LastWill::new(
        cfg.topic("availability"),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if let Some(t) = &m.tls {
        o.set_transport(fhecam_proto::mqtt::tls_transport(t)?);
    }
    Ok(o)
}

struct Publisher<'a> {
    cfg: &'a EdgeConfig,
    client: AsyncClient,
    outbox: Outbox,
    flight: InFlight,
    stats: Arc<Stats>,
    current: Arc<Current>,
    offers: Option<mpsc::Sender<Offer>>,
    deploy_topics: [String; 2],
    /// Subscribed to the deployment topics in this process (a resumed session keeps the
    /// subscription; a new process subscribes again to get the retained bundle).
    subscribed: bool,
    topic: String,
    connected: bool,
}

impl Publisher<'_> {
    fn store(&mut self, f: Finished) -> Result<(), PublishError> {
        let mut env = f.envelope;
        env.epoch = self.outbox.epoch();
        let mut encode_err = None;
        let (_, dropped) = self.outbox.push(|seq| {
            env.sequence = seq;
            envelope::encode(&env).unwrap_or_else(|e| {
                encode_err = Some(e);
                Vec::new()
            })
        })?;
        if let Some(e) = encode_err {
            // cannot happen for envelopes we built; never publish an empty entry
            self.outbox.remove(env.sequence)?;
            return Err(e.into());
        }
        if dropped > 0 {
            self.stats
                .outbox_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::warn!("outbox full: dropped the {dropped} oldest inference(s)");
        }
        self.stats.inferences.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_inference_unix_ms
            .store(fhecam_proto::ids::unix_now_ms(), Ordering::Relaxed);
        self.gauge();
        Ok(())
    }

    fn gauge(&self) {
        self.stats
            .outbox_pending
            .store(self.outbox.len() as u64, Ordering::Relaxed);
    }

    /// Hands waiting outbox entries to rumqttc, oldest first, a bounded number at a time.
    fn send_waiting(&mut self) -> Result<(), PublishError> {
        if !self.connected {
            return Ok(());
        }
        for seq in self.outbox.pending() {
            if self.flight.handed_len() >= MAX_HANDED {
                break;
            }
            if self.flight.is_handed(seq) {
                continue;
            }
            let bytes = self.outbox.read(seq)?;
            match self
                .client
                .try_publish(self.topic.clone(), QoS::AtLeastOnce, false, bytes)
            {
                Ok(()) => self.flight.requested(Some(seq)),
                // the request channel is full: the entry stays in the outbox for later
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn announce(&mut self, payload: &'static str) {
        if self
            .client
            .try_publish(
                self.cfg.topic("availability"),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .is_ok()
        {
            self.flight.requested(None);
        }
    }

    fn status(&self) -> Status {
        let m = self.current.get();
        Status {
            counters: self.stats.snapshot(),
            model_id: m.header.model_id.to_string(),
            model_name: m.header.name.clone(),
            model_version: m.header.version,
            input_mode: self.cfg.infer.input_mode.name().into(),
            sent_unix_ms: fhecam_proto::ids::unix_now_ms(),
        }
    }

    /// Retained, so `fhecam fleet` sees every camera's last report at once.
    fn publish_stats(&mut self) {
        let json = serde_json::to_vec(&self.status()).unwrap_or_default();
        if self
            .client
            .try_publish(self.cfg.topic("stats"), QoS::AtMostOnce, true, json)
            .is_ok()
        {
            self.flight.requested(None);
        }
    }

    /// A message on a subscribed topic: a pushed bundle for the intake. A full queue
    /// refuses it (the owner pushes again); the retained copy comes back with the next
    /// process.
    fn pushed(&mut self, p: rumqttc::Publish) {
        let Some(offers) = &self.offers else { return };
        if !self.deploy_topics.contains(&p.topic) {
            return;
        }
        if p.payload.is_empty() {
            // an empty retained message clears the topic: nothing to deploy
            return;
        }
        let origin = Origin::Push(p.topic.clone());
        let offer = Offer {
            origin: origin.clone(),
            bytes: p.payload.to_vec(),
        };
        if offers.try_send(offer).is_err() {
            tracing::warn!("{origin} refused: {} bundles are already waiting to be checked; push it again later", super::intake::OFFER_QUEUE);
            self.stats.refused(format!("{origin}: busy"));
        }
    }

    /// One event from rumqttc's loop.
    fn on_event(
        &mut self,
        ev: Event,
        events: &mpsc::UnboundedSender<PublishEvent>,
    ) -> Result<(), PublishError> {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected = true;
                self.stats.mqtt_connections.fetch_add(1, Ordering::Relaxed);
                if !ack.session_present {
                    // rumqttc cleared what it held: the outbox re-sends it
                    self.flight.session_lost();
                }
                tracing::info!(
                    "MQTT connected to {}:{} (session {})",
                    self.cfg.mqtt.conn.host,
                    self.cfg.mqtt.conn.port,
                    if ack.session_present {
                        "resumed"
                    } else {
                        "new"
                    }
                );
                self.announce("online");
                self.publish_stats();
                if self.offers.is_some() && (!self.subscribed || !ack.session_present) {
                    let filters = self
                        .deploy_topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    match self.client.try_subscribe_many(filters) {
                        Ok(()) => self.subscribed = true,
                        Err(e) => tracing::warn!("cannot subscribe to pushed bundles: {e}"),
                    }
                }
                self.send_waiting()?;
                let _ = events.send(PublishEvent::Connected);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.flight.sent(pkid),
            Event::Incoming(Packet::Publish(p)) => self.pushed(p),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = self.flight.acked(ack.pkid) {
                    if self.outbox.contains(seq) {
                        self.outbox.remove(seq)?;
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    self.gauge();
                    self.send_waiting()?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs until `input` closes (every inference stage ended) or `stop` fires, and the outbox is empty, or
/// `linger` after `input` closed; then announces `offline` and disconnects. Whatever is
/// still in the outbox then is published by the next run.
pub async fn run(
    cfg: &EdgeConfig,
    outbox: Outbox,
    links: Links,
    mut input: mpsc::Receiver<Finished>,
    events: mpsc::UnboundedSender<PublishEvent>,
    linger: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), PublishError> {
    let (client, mut eventloop): (AsyncClient, EventLoop) =
        AsyncClient::new(mqtt_options(cfg)?, CLIENT_CAPACITY);
    let stats = links.stats.clone();
    let changed = links.changed.clone();
    let mut p = Publisher {
        cfg,
        client,
        outbox,
        flight: InFlight::default(),
        stats: links.stats,
        current: links.current,
        offers: links.offers,
        deploy_topics: cfg.deploy_topics(),
        subscribed: false,
        topic: cfg.topic("inference"),
        connected: false,
    };
    p.gauge();
    let mut failures = 0u32;
    let mut retry_at: Option<Instant> = None;
    let mut input_open = true;
    let mut closing_deadline: Option<Instant> = None;
    // tokio's interval panics on a zero period (check() keeps it ≥ 0.1 s; this is for
    // configurations built in code)
    let mut stats_tick =
        tokio::time::interval(secs(cfg.mqtt.role.stats_interval_s).max(Duration::from_millis(100)));
    stats_tick.tick().await;
    loop {
        if !input_open {
            let deadline = *closing_deadline.get_or_insert_with(|| Instant::now() + linger);
            if p.outbox.is_empty() || Instant::now() >= deadline {
                break;
            }
        }
        let sleep_until = retry_at
            .or(closing_deadline)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            f = input.recv(), if input_open => match f {
                Some(f) => {
                    p.store(f)?;
                    p.send_waiting()?;
                }
                None => input_open = false,
            },
            // inference threads abandoned after the drain timeout still hold the sender
            _ = stop.cancelled(), if input_open => input_open = false,
            ev = eventloop.poll(), if retry_at.is_none() => match ev {
                Ok(ev) => {
                    if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                        failures = 0;
                    }
                    p.on_event(ev, &events)?;
                }
                Err(e) => {
                    if p.connected {
                        let _ = events.send(PublishEvent::Disconnected);
                    }
                    p.connected = false;
                    stats.mqtt_errors.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff(
                        secs(cfg.mqtt.conn.reconnect_backoff_initial_s),
                        secs(cfg.mqtt.conn.reconnect_backoff_max_s),
                        failures,
                    );
                    failures += 1;
                    tracing::warn!(
                        "MQTT {}:{}: {}; retrying in {:.1} s ({} inference(s) kept in the outbox)",
                        cfg.mqtt.conn.host,
                        cfg.mqtt.conn.port,
                        describe(&e),
                        wait.as_secs_f64(),
                        p.outbox.len()
                    );
                    retry_at = Some(Instant::now() + wait);
                }
            },
            _ = tokio::time::sleep_until(sleep_until), if retry_at.is_some() || closing_deadline.is_some() => {
                if retry_at.is_some_and(|t| Instant::now() >= t) {
                    retry_at = None;
                }
            }
            _ = changed.notified() => {
                if p.connected {
                    p.publish_stats();
                }
            }
            _ = stats_tick.tick() => {
                if p.connected {
                    p.publish_stats();
                    p.send_waiting()?;
                }
            }
        }
    }
    if p.connected {
        p.announce("offline");
        let _ = p.client.try_disconnect();
        // let rumqttc write the last messages and the DISCONNECT
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    p.gauge();
    Ok(())
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("broker unreachable ({io})"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_map_to_outbox_entries_across_retransmissions() {
        let mut f = InFlight::default();
        f.requested(None); // availability
        f.requested(Some(7));
        f.requested(Some(8));
        f.sent(1); // availability
        f.sent(2); // 7
        assert!(f.is_handed(8));
        // reconnect with the session: rumqttc re-sends 2 before the request for 8 goes out
        f.sent(2);
        f.sent(3); // 8
        assert_eq!(f.acked(3), Some(8));
        assert_eq!(f.acked(1), None);
        assert_eq!(f.acked(2), Some(7));
        assert_eq!(f.handed_len(), 0);
        // stats at QoS 0 go out with packet id 0 and are never acknowledged
        f.requested(None);
        f.requested(Some(9));
        f.sent(0);
        f.sent(4);
        f.session_lost();
        assert!(!f.is_handed(9));
        assert_eq!(f.acked(4), None);
    }
}
