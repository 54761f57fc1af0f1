//! The MQTT link, the publish stage: finished inferences sealed into envelopes and written
//! to the outbox first, then published at QoS 1 on a persistent session; the camera's
//! availability and status; and the subscription through which pushed bundles enter
//! ([`crate::push`]). The I/O loop (`run`) is kept apart from the pure bookkeeping of which
//! outbox entry is in flight under which packet id ([`InFlight`]).
//!
//! rumqttc forgets unacknowledged publishes when the broker answers a reconnect without the
//! old session, and has no reconnect backoff of its own: both are handled here.

use super::config::{secs, EdgeConfig};
use super::deploy::Current;
use super::health::{Stage, BEAT};
use super::infer::Finished;
use super::inflight::InFlight;
use super::intake::Offer;
use super::outbox::{Outbox, OutboxError};
use super::push::Pushes;
use super::stats::Stats;
use fhecam_proto::retry::backoff;
use fhecam_proto::wire::envelope::{self, Envelope};
use fhecam_proto::wire::Status;
use fhecam_proto::wire::{Availability, Leaf};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("envelope: {0}")]
    Envelope(#[from] fhecam_proto::wire::envelope::EnvelopeError),
    #[error("MQTT: {0}")]
    Setup(#[from] fhecam_proto::mqtt::MqttSetupError),
}

/// Events the daemon's supervisor cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
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

pub fn mqtt_options(cfg: &EdgeConfig) -> Result<MqttOptions, LinkError> {
    let m = &cfg.mqtt.conn;
    let mut o = MqttOptions::new(cfg.client_id(), m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // Persistent session: the broker keeps our unacknowledged QoS 1 messages across a
    // reconnect (with a clean session rumqttc lost a third of them in a partition).
    o.set_clean_session(false);
    let max = envelope::MAX_ENVELOPE_BYTES + 4096;
    // incoming: only pushed bundles are large
    let incoming = if cfg.deploy.as_ref().is_some_and(|d| d.push) {
        fhecam_proto::mqtt::MAX_PACKET
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
    /// Bundles pushed over MQTT, when taken.
    pushes: Option<Pushes>,
    topic: String,
    connected: bool,
    /// Finished inferences not yet in the outbox (its writes failed), oldest first.
    unstored: VecDeque<Finished>,
    store_failures: u32,
    /// When the next outbox write of `unstored` is tried.
    store_retry_at: Option<Instant>,
}

impl<'a> Publisher<'a> {
    fn new(cfg: &'a EdgeConfig, client: AsyncClient, outbox: Outbox, links: Links) -> Self {
        let mut p = Publisher {
            cfg,
            client,
            outbox,
            flight: InFlight::default(),
            stats: links.stats,
            current: links.current,
            pushes: links.offers.map(|o| Pushes::new(cfg, o)),
            topic: cfg.topic(Leaf::Inference),
            connected: false,
            unstored: VecDeque::new(),
            store_failures: 0,
            store_retry_at: None,
        };
        p.stats
            .outbox_quarantined
            .fetch_add(p.outbox.take_quarantined_at_open(), Ordering::Relaxed);
        p.gauge();
        p
    }

    /// The connection failed (`failures` times in a row before this): how long to wait
    /// before the next attempt.
    fn connection_lost(
        &mut self,
        e: &ConnectionError,
        failures: u32,
        events: &mpsc::UnboundedSender<LinkEvent>,
    ) -> Duration {
        if self.connected {
            let _ = events.send(LinkEvent::Disconnected);
        }
        self.connected = false;
        self.stats.mqtt_connected.store(false, Ordering::Relaxed);
        self.stats.mqtt_errors.fetch_add(1, Ordering::Relaxed);
        let c = &self.cfg.mqtt.conn;
        let wait = backoff(
            secs(c.reconnect_backoff_initial_s),
            secs(c.reconnect_backoff_max_s),
            failures,
        );
        tracing::warn!(
            "MQTT {}:{}: {}; retrying in {:.1} s ({} inference(s) kept in the outbox)",
            c.host,
            c.port,
            describe(e),
            wait.as_secs_f64(),
            self.outbox.len()
        );
        wait
    }

    /// Announces `offline` and disconnects; inferences the outbox still refuses are lost,
    /// their numbers left as gaps.
    async fn close(&mut self, eventloop: &mut EventLoop) {
        if self.connected {
            self.announce(Availability::Offline);
            let _ = self.client.try_disconnect();
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
        if !self.unstored.is_empty() {
            self.store_waiting(true);
        }
        if !self.unstored.is_empty() {
            // the outbox still refuses writes: these are lost, their numbers left as gaps
            let n = self.unstored.len();
            for _ in 0..n {
                self.outbox.skip();
            }
            self.stats
                .outbox_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            tracing::error!("outbox: {n} inference(s) never stored are lost at exit");
            self.unstored.clear();
        }
        self.gauge();
    }

    /// Takes a finished inference: into the outbox at once, or kept in memory (bounded)
    /// while the outbox refuses writes.
    fn store(&mut self, f: Finished) {
        self.stats.inferences.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_inference_unix_ms
            .store(fhecam_proto::ids::unix_now_ms(), Ordering::Relaxed);
        self.unstored.push_back(f);
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
        let cfg = self.cfg;
        while let Some(f) = self.unstored.front() {
            let mut encode_err = None;
            let pushed = self.outbox.push(|seq| {
                envelope::encode(&seal(cfg, f, epoch, seq)).unwrap_or_else(|e| {
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
        self.stats
            .outbox_oldest_unix_ms
            .store(self.outbox.oldest_written_unix_ms(), Ordering::Relaxed);
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

    /// One event from rumqttc's loop.
    fn on_event(&mut self, ev: Event, events: &mpsc::UnboundedSender<LinkEvent>) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected = true;
                self.stats.mqtt_connected.store(true, Ordering::Relaxed);
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
                if let Some(p) = &mut self.pushes {
                    p.subscribe(&self.client, ack.session_present);
                }
                self.send_waiting();
                let _ = events.send(LinkEvent::Connected);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.flight.sent(pkid),
            Event::Incoming(Packet::Publish(p)) => {
                if let Some(pushes) = &self.pushes {
                    pushes.take(p, &self.stats);
                }
            }
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

/// The envelope of a finished inference, entry `sequence` of the outbox of `epoch`: the one
/// place an envelope is made.
fn seal(cfg: &EdgeConfig, f: &Finished, epoch: u64, sequence: u64) -> Envelope {
    Envelope {
        device_id: cfg.device_id.clone(),
        camera_id: cfg.camera_id.clone(),
        model_id: f.model_id,
        model_version: f.model_version,
        sequence,
        epoch,
        frame_timestamp_ms: f.frame_timestamp_ms,
        ciphertext: f.ciphertext.clone(),
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
    events: mpsc::UnboundedSender<LinkEvent>,
    linger: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), LinkError> {
    let (client, mut eventloop): (AsyncClient, EventLoop) =
        AsyncClient::new(mqtt_options(cfg)?, CLIENT_CAPACITY);
    let changed = links.changed.clone();
    let beat = links.beat.clone();
    let mut p = Publisher::new(cfg, client, outbox, links);
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
                    retry_at = Some(Instant::now() + p.connection_lost(&e, failures, &events));
                    failures += 1;
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
    p.close(&mut eventloop).await;
    Ok(())
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("broker unreachable ({io})"),
        other => other.to_string(),
    }
}
