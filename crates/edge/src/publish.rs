//! The publish stage: outbox first, then MQTT QoS 1 on a persistent session. The I/O loop
//! (`run`) is kept apart from the pure bookkeeping of which outbox entry is in flight under
//! which packet id (`InFlight`).
//!
//! rumqttc forgets unacknowledged publishes when the broker answers a reconnect without the
//! old session, and has no reconnect backoff of its own: both are handled here.

use super::config::{secs, EdgeConfig};
use super::deploy::Current;
use super::health::{Stage, BEAT};
use super::intake::{Offer, Origin};
use super::outbox::{Outbox, OutboxError};
use super::stats::Stats;
use fhecam_proto::retry::backoff;
use fhecam_proto::wire::envelope::{self, Envelope};
use fhecam_proto::wire::Status;
use fhecam_proto::wire::{Availability, Leaf};
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
    Envelope(#[from] fhecam_proto::wire::envelope::EnvelopeError),
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
    /// Beaten from the loop, for the watchdog.
    pub beat: Arc<Stage>,
}

/// Largest packet MQTT can carry (its remaining-length field): a pushed bundle must fit.
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Entries handed to rumqttc at once at most (each is up to ~1 MB of ciphertext).
const MAX_HANDED: usize = 16;
/// Request channel between our loop and rumqttc's event loop.
const CLIENT_CAPACITY: usize = 64;
/// Finished inferences kept in memory while the outbox refuses writes (a full disk); past
/// it the oldest is dropped, its sequence number left as a gap.
pub const MAX_UNSTORED: usize = 8;
/// Retry delays of a failed outbox write (doubled per failure, with jitter).
const STORE_RETRY_INITIAL: Duration = Duration::from_millis(500);
const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

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
        cfg.topic(Leaf::Availability),
        Availability::Offline.as_str(),
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
    /// Finished inferences not yet in the outbox (its writes failed), oldest first.
    unstored: VecDeque<Envelope>,
    store_failures: u32,
    /// When the next outbox write of `unstored` is tried.
    store_retry_at: Option<Instant>,
}

impl Publisher<'_> {
    /// Takes a finished inference: into the outbox at once, or kept in memory (bounded)
    /// while the outbox refuses writes.
    fn store(&mut self, f: Finished) {
        self.stats.inferences.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_inference_unix_ms
            .store(fhecam_proto::ids::unix_now_ms(), Ordering::Relaxed);
        self.unstored.push_back(f.envelope);
        if self.unstored.len() > MAX_UNSTORED {
            self.unstored.pop_front();
            let seq = self.outbox.skip();
            self.stats.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "outbox: {MAX_UNSTORED} inferences already wait in memory to be stored; the oldest is dropped (sequence {seq} is left as a gap)"
            );
        }
        self.store_waiting(false);
    }

    /// Writes the inferences kept in memory to the outbox, oldest first, unless a retry is
    /// not due yet (`now`: try anyway). A failure is logged with its cause and retried
    /// with backoff; the rest of the daemon goes on.
    fn store_waiting(&mut self, now: bool) {
        if !now && self.store_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.store_retry_at = None;
        let epoch = self.outbox.epoch();
        while let Some(env) = self.unstored.front_mut() {
            env.epoch = epoch;
            let mut encode_err = None;
            let pushed = self.outbox.push(|seq| {
                env.sequence = seq;
                envelope::encode(env).unwrap_or_else(|e| {
                    encode_err = Some(e);
                    Vec::new()
                })
            });
            match pushed {
                Ok((seq, dropped)) => {
                    self.unstored.pop_front();
                    if self.store_failures > 0 {
                        tracing::info!("outbox: writing again ({seq} stored)");
                        self.store_failures = 0;
                    }
                    if let Some(e) = encode_err {
                        // cannot happen for envelopes we built; never publish an empty entry
                        tracing::error!("envelope {seq} not encoded: {e}; dropped");
                        self.stats.infer_errors.fetch_add(1, Ordering::Relaxed);
                        let removed = self.outbox.remove(seq);
                        self.outbox_result(removed, seq);
                    }
                    if dropped > 0 {
                        self.stats
                            .outbox_dropped
                            .fetch_add(dropped as u64, Ordering::Relaxed);
                        tracing::warn!("outbox full: dropped the {dropped} oldest inference(s)");
                    }
                }
                Err(e) => {
                    self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff(STORE_RETRY_INITIAL, STORE_RETRY_MAX, self.store_failures);
                    self.store_failures += 1;
                    tracing::error!(
                        "outbox: cannot store an inference: {e}; {} kept in memory (at most {MAX_UNSTORED}), retrying in {:.1} s",
                        self.unstored.len(),
                        wait.as_secs_f64()
                    );
                    self.store_retry_at = Some(Instant::now() + wait);
                    break;
                }
            }
        }
        self.gauge();
    }

    /// Logs and counts a failed removal: the entry is forgotten here and, if its file is
    /// still there, sent once more after a restart (a duplicate the backend recognises).
    fn outbox_result(&self, r: Result<(), OutboxError>, seq: u64) {
        if let Err(e) = r {
            self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("outbox: entry {seq} not removed: {e}");
        }
    }

    /// Sets an unreadable entry aside (`*.bad`), logged and counted; the rest goes on.
    fn set_aside(&mut self, seq: u64, why: OutboxError) {
        self.stats
            .outbox_quarantined
            .fetch_add(1, Ordering::Relaxed);
        match self.outbox.quarantine(seq) {
            Ok(p) => tracing::error!("{why}: set aside as {}.bad", p.display()),
            Err(e) => {
                self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{why}; setting it aside failed: {e}");
            }
        }
        self.gauge();
    }

    fn gauge(&self) {
        self.stats.outbox_pending.store(
            (self.outbox.len() + self.unstored.len()) as u64,
            Ordering::Relaxed,
        );
    }

    /// Hands waiting outbox entries to rumqttc, oldest first, a bounded number at a time.
    fn send_waiting(&mut self) {
        if !self.connected {
            return;
        }
        for seq in self.outbox.pending() {
            if self.flight.handed_len() >= MAX_HANDED {
                break;
            }
            if self.flight.is_handed(seq) {
                continue;
            }
            let bytes = match self.outbox.read(seq) {
                Ok(b) => b,
                Err(e) => {
                    self.set_aside(seq, e);
                    continue;
                }
            };
            match self
                .client
                .try_publish(self.topic.clone(), QoS::AtLeastOnce, false, bytes)
            {
                Ok(()) => self.flight.requested(Some(seq)),
                // the request channel is full: the entry stays in the outbox for later
                Err(_) => break,
            }
        }
    }

    fn announce(&mut self, a: Availability) {
        match self.client.try_publish(
            self.cfg.topic(Leaf::Availability),
            QoS::AtLeastOnce,
            true,
            a.as_str(),
        ) {
            Ok(()) => self.flight.requested(None),
            Err(e) => self.request_failed(Leaf::Availability.as_str(), e),
        }
    }

    fn request_failed(&self, what: &str, e: rumqttc::ClientError) {
        self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("MQTT: the {what} message was not sent: {e}");
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
        let json = match serde_json::to_vec(&self.status()) {
            Ok(j) => j,
            Err(e) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("stats not encoded: {e}");
                return;
            }
        };
        match self
            .client
            .try_publish(self.cfg.topic(Leaf::Stats), QoS::AtMostOnce, true, json)
        {
            Ok(()) => self.flight.requested(None),
            Err(e) => self.request_failed(Leaf::Stats.as_str(), e),
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
            bytes: p.payload,
        };
        if offers.try_send(offer).is_err() {
            tracing::warn!("{origin} refused: {} bundles are already waiting to be checked; push it again later", super::intake::OFFER_QUEUE);
            self.stats.refused(format!("{origin}: busy"));
        }
    }

    /// One event from rumqttc's loop.
    fn on_event(&mut self, ev: Event, events: &mpsc::UnboundedSender<PublishEvent>) {
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
                self.announce(Availability::Online);
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
                self.send_waiting();
                let _ = events.send(PublishEvent::Connected);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.flight.sent(pkid),
            Event::Incoming(Packet::Publish(p)) => self.pushed(p),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = self.flight.acked(ack.pkid) {
                    if self.outbox.contains(seq) {
                        let removed = self.outbox.remove(seq);
                        self.outbox_result(removed, seq);
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    self.gauge();
                    self.send_waiting();
                }
            }
            _ => {}
        }
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
    let beat = links.beat.clone();
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
        topic: cfg.topic(Leaf::Inference),
        connected: false,
        unstored: VecDeque::new(),
        store_failures: 0,
        store_retry_at: None,
    };
    stats
        .outbox_quarantined
        .fetch_add(p.outbox.take_quarantined_at_open(), Ordering::Relaxed);
    p.gauge();
    let mut beat_tick = tokio::time::interval(BEAT);
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
        beat.beat();
        if !input_open {
            let deadline = *closing_deadline.get_or_insert_with(|| Instant::now() + linger);
            if (p.outbox.is_empty() && p.unstored.is_empty()) || Instant::now() >= deadline {
                break;
            }
        }
        let sleep_until = retry_at
            .or(closing_deadline)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            f = input.recv(), if input_open => match f {
                Some(f) => {
                    p.store(f);
                    p.send_waiting();
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
                    p.on_event(ev, &events);
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
            _ = tokio::time::sleep_until(p.store_retry_at.unwrap_or(Instant::now())), if p.store_retry_at.is_some() => {
                p.store_waiting(false);
                p.send_waiting();
            }
            _ = beat_tick.tick() => {}
            _ = changed.notified() => {
                if p.connected {
                    p.publish_stats();
                }
            }
            _ = stats_tick.tick() => {
                if p.connected {
                    p.publish_stats();
                    p.send_waiting();
                }
            }
        }
    }
    if p.connected {
        p.announce(Availability::Offline);
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
    if !p.unstored.is_empty() {
        p.store_waiting(true);
    }
    if !p.unstored.is_empty() {
        // the outbox still refuses writes: these are lost, their numbers left as gaps
        let n = p.unstored.len();
        for _ in 0..n {
            p.outbox.skip();
        }
        stats.outbox_dropped.fetch_add(n as u64, Ordering::Relaxed);
        tracing::error!("outbox: {n} inference(s) never stored are lost at exit");
        p.unstored.clear();
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
