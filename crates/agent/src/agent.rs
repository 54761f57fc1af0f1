//! The decryption agent's run loop: an MQTT v5 subscription (plain, or shared among agents)
//! to every camera's inferences, each one checked, decrypted with the owner's key for its
//! model and published for the cockpit — or refused to the dead-letter topic with the reason.
//!
//! Three parts, so that no one waits on another in a cycle:
//! - the **poller** task only polls rumqttc's event loop and forwards its events; it never
//!   waits on anything else, so keep-alives, acknowledgements and reconnects always run;
//! - the **worker** thread owns the databases and decides (`Processor`): checks, rate
//!   limit, decryption;
//! - the **I/O loop** hands the worker's publishes to rumqttc with `try_` calls only and
//!   acknowledges an inference once the broker has acknowledged its result or dead letter.
//!
//! The I/O loop holds at most `limits.max_held` inferences (one device at most half), whatever
//! the broker sends: we announce that as our MQTT v5 receive maximum, but mosquitto 2.0.11
//! sends more after every acknowledgement. What arrives beyond the bound is dropped unread
//! and unacknowledged; once room is made, the agent disconnects (MQTT DISCONNECT, after its
//! acknowledgements) and reconnects at once so that the broker redelivers it (the session
//! is persistent). A burst or a backlog therefore waits at the broker, not in our memory.

use super::config::AgentConfig;
use super::guard::RateLimiter;
use super::processor::{AgentError, Checked, Key, Processor, Refusal, Step};
use super::session::{Item, Outgoing};
use fhecam_proto::ids::{rfc3339, ModelId};
use fhecam_proto::wire::{self, DeadLetter, Leaf};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing as Out;
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events the poller may have read ahead of the I/O loop (each up to one envelope).
const EVENT_CAPACITY: usize = 64;

/// Counters of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentStats {
    pub received: u64,
    pub decrypted: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Inferences held back by a device's rate limit (each is decrypted later).
    pub rate_limited: u64,
    /// Cockpit results the broker acknowledged.
    pub published: u64,
    /// Most inferences held at once (at most `limits.max_held`).
    pub held_peak: u64,
    /// Inferences dropped unread and unacknowledged because the agent held its bound (the
    /// broker redelivers them; a redelivery dropped again counts again).
    pub shed: u64,
    /// Reconnections made so that the broker redelivers what was shed.
    pub redelivery_reconnects: u64,
    /// Inferences left unacknowledged for a later attempt (a key that does not unseal).
    pub released: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    received: AtomicU64,
    decrypted: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    rate_limited: AtomicU64,
    published: AtomicU64,
    held_peak: AtomicU64,
    shed: AtomicU64,
    redelivery_reconnects: AtomicU64,
    released: AtomicU64,
    // for the metrics endpoint only
    decrypted_by_model: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    refused_by_code: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    decrypt_seconds: fhecam_metrics::Seconds,
    mqtt_connected: AtomicBool,
}

impl Counters {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> AgentStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AgentStats {
            received: g(&self.received),
            decrypted: g(&self.decrypted),
            duplicates: g(&self.duplicates),
            dead_lettered: g(&self.dead_lettered),
            rate_limited: g(&self.rate_limited),
            published: g(&self.published),
            held_peak: g(&self.held_peak),
            shed: g(&self.shed),
            redelivery_reconnects: g(&self.redelivery_reconnects),
            released: g(&self.released),
        }
    }
}

/// What the I/O loop asks of the worker.
enum Job {
    Message(Publish),
    /// The broker has the cockpit result of `key`.
    Published(Key),
}

/// What to do once the broker acknowledged one of our publishes.
#[derive(Debug)]
enum Then {
    /// A cockpit result: record it (worker), then acknowledge its inferences.
    Record(Key),
    /// A dead letter: acknowledge the inference.
    Ack(Vec<Publish>),
}

/// What the worker asks of the I/O loop.
enum Decision {
    Publish(Item<Then>),
    Ack(Vec<Publish>),
    /// Done with these without acknowledging them: the broker redelivers them on the next
    /// connection.
    Release(Vec<Publish>),
    /// The worker cannot go on (state database); the agent stops, unacknowledged work is
    /// redelivered by the broker to the next run.
    Fatal(AgentError),
}

/// An inference being worked on: the incoming publishes to acknowledge when it is done
/// (a redelivery of it while it is in flight joins here instead of being decrypted twice).
struct Flight {
    model: ModelId,
    /// Payload size of the first, for its dead letter.
    bytes: usize,
    /// Payloads emptied: only packet ids are needed to acknowledge.
    acks: Vec<Publish>,
}

struct Worker {
    processor: Processor,
    limiter: RateLimiter,
    dead_topic: String,
    flights: HashMap<Key, Flight>,
    /// Per device, inferences waiting for a rate-limit token, in arrival order.
    deferred: HashMap<String, VecDeque<Box<Checked>>>,
    out: mpsc::UnboundedSender<Decision>,
    counters: Arc<Counters>,
    /// Test hook (`FHECAM_FAILPOINT=agent-after-decrypt`): the process aborts after its first
    /// decryption, before the result is handed to the broker — the crash window the tests
    /// need to hit on purpose.
    abort_after_decrypt: bool,
}

impl Worker {
    fn send(&self, d: Decision) -> bool {
        self.out.send(d).is_ok()
    }

    /// Reports `r` to the dead-letter topic; the inference is acknowledged once the broker
    /// has the report, or left unacknowledged (released) when the refusal is transient.
    fn dead(&self, mut p: Publish, bytes: usize, r: Refusal) {
        Counters::add(&self.counters.dead_lettered);
        if let Ok(mut by) = self.counters.refused_by_code.lock() {
            *by.entry(r.code.as_str()).or_default() += 1;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        tracing::warn!("{topic}: refused: {}", r.reason);
        let json = serde_json::to_vec(&DeadLetter {
            code: r.code,
            reason: r.reason,
            topic,
            payload_bytes: bytes,
            time: rfc3339(fhecam_proto::ids::unix_now()),
        })
        .unwrap_or_default();
        // only its packet id is needed from here on
        p.payload = Default::default();
        let then = if r.transient {
            Counters::add(&self.counters.released);
            self.send(Decision::Release(vec![p]));
            Then::Ack(Vec::new())
        } else {
            Then::Ack(vec![p])
        };
        self.send(Decision::Publish(Item {
            topic: self.dead_topic.clone(),
            payload: json,
            then,
        }));
    }

    fn message(&mut self, mut p: Publish, now: Instant) -> Result<(), AgentError> {
        Counters::add(&self.counters.received);
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let bytes = p.payload.len();
        let c = match self.processor.check(&topic, &p.payload) {
            Step::Dead(reason) => {
                self.dead(p, bytes, reason);
                return Ok(());
            }
            Step::Duplicate => {
                Counters::add(&self.counters.duplicates);
                tracing::info!("{topic}: duplicate, its result was already published");
                self.send(Decision::Ack(vec![p]));
                return Ok(());
            }
            Step::Fatal(e) => return Err(e),
            Step::Ready(c) => c,
        };
        // `c` holds what decryption needs
        p.payload = Default::default();
        if let Some(f) = self.flights.get_mut(&c.key) {
            // the same inference again while it is in flight: answered with it
            Counters::add(&self.counters.duplicates);
            if !f.acks.iter().any(|a| a.pkid == p.pkid) {
                f.acks.push(p);
            }
            return Ok(());
        }
        let device = c.key.device.clone();
        self.flights.insert(
            c.key.clone(),
            Flight {
                model: c.model,
                bytes,
                acks: vec![p],
            },
        );
        let queue = self.deferred.entry(device.clone()).or_default();
        let waiting = !queue.is_empty();
        if waiting || !self.limiter.allow(&device, now) {
            // rate limits slow a camera down; they never lose its results
            Counters::add(&self.counters.rate_limited);
            if !waiting {
                tracing::info!("device {device} is over its rate limit: its inferences wait");
            }
            queue.push_back(c);
            return Ok(());
        }
        self.decrypt(&c);
        Ok(())
    }

    fn decrypt(&mut self, c: &Checked) {
        let started = Instant::now();
        let decrypted = self.processor.decrypt(c);
        self.counters.decrypt_seconds.observe(started.elapsed());
        match decrypted {
            Ok((topic, json)) => {
                if self.abort_after_decrypt {
                    tracing::error!("failpoint agent-after-decrypt: aborting");
                    std::process::abort();
                }
                Counters::add(&self.counters.decrypted);
                if let Ok(mut by) = self.counters.decrypted_by_model.lock() {
                    *by.entry(c.model.to_string()).or_default() += 1;
                }
                self.send(Decision::Publish(Item {
                    topic,
                    payload: json,
                    then: Then::Record(c.key.clone()),
                }));
            }
            Err(reason) => {
                let Some(f) = self.flights.remove(&c.key) else {
                    return;
                };
                let mut acks = f.acks.into_iter();
                if let Some(first) = acks.next() {
                    let rest: Vec<Publish> = acks.collect();
                    let transient = reason.transient;
                    self.dead(first, f.bytes, reason);
                    if !rest.is_empty() {
                        self.send(if transient {
                            Decision::Release(rest)
                        } else {
                            Decision::Ack(rest)
                        });
                    }
                }
            }
        }
    }

    /// Decrypts deferred inferences whose device has a token again; returns how long until
    /// the next one may.
    fn release(&mut self, now: Instant) -> Option<Duration> {
        let mut ready = Vec::new();
        let mut next: Option<Duration> = None;
        for (device, queue) in self.deferred.iter_mut() {
            while !queue.is_empty() && self.limiter.allow(device, now) {
                ready.extend(queue.pop_front());
            }
            if !queue.is_empty() {
                let w = self
                    .limiter
                    .wait(device, now)
                    .max(Duration::from_millis(10));
                next = Some(next.map_or(w, |n| n.min(w)));
            }
        }
        self.deferred.retain(|_, q| !q.is_empty());
        for c in ready {
            self.decrypt(&c);
        }
        next
    }

    fn published(&mut self, key: Key) -> Result<(), AgentError> {
        if let Some(f) = self.flights.remove(&key) {
            self.processor.record(&key, &f.model)?;
            Counters::add(&self.counters.published);
            self.send(Decision::Ack(f.acks));
        }
        Ok(())
    }

    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        let mut wake: Option<Duration> = None;
        loop {
            let job = match wake {
                None => jobs
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
                Some(w) => jobs.recv_timeout(w),
            };
            let now = Instant::now();
            let r = match job {
                Ok(Job::Message(p)) => self.message(p, now),
                Ok(Job::Published(key)) => self.published(key),
                Err(std_mpsc::RecvTimeoutError::Timeout) => Ok(()),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if let Err(e) = r {
                self.send(Decision::Fatal(e));
                return;
            }
            wake = self.release(Instant::now());
        }
    }
}

fn mqtt_options(cfg: &AgentConfig, client_id: String) -> Result<MqttOptions, AgentError> {
    let m = &cfg.mqtt.conn;
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // persistent session: what we have not acknowledged is redelivered after a crash or a
    // reconnect (and deduplicated), never lost
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(24 * 3600));
    o.set_manual_acks(true);
    // what a broker that honours it sends before our acknowledgements; the I/O loop
    // enforces the bound whatever the broker does
    o.set_receive_maximum(Some(cfg.limits.max_held.min(u16::MAX as usize) as u16));
    o.set_max_packet_size(Some(
        (fhecam_proto::wire::envelope::MAX_ENVELOPE_BYTES + 4096) as u32,
    ));
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if let Some(t) = &m.tls {
        o.set_transport(fhecam_proto::mqtt::tls_transport(t)?);
    }
    Ok(o)
}

/// What the poller forwards.
enum Polled {
    Event(Box<Event>),
    /// The connection failed; rumqttc reconnects on the next poll.
    Lost,
}

/// Polls rumqttc's event loop and forwards every event; waits on nothing else but the
/// reconnect backoff and the I/O loop taking the events (which never waits on us).
/// A DISCONNECT we send ends it, unless `redelivery` is set: then the broker's closing of
/// the connection is answered by connecting again at once.
async fn poll(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Polled>,
    redelivery: Arc<AtomicBool>,
    backoff: (Duration, Duration),
    endpoint: String,
) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                    failures = 0;
                }
                let bye = matches!(ev, Event::Outgoing(Out::Disconnect))
                    && !redelivery.load(Ordering::Relaxed);
                if events.send(Polled::Event(Box::new(ev))).await.is_err() || bye {
                    return;
                }
            }
            Err(_) if redelivery.swap(false, Ordering::Relaxed) => {
                if events.send(Polled::Lost).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let wait = fhecam_proto::retry::backoff(backoff.0, backoff.1, failures);
                failures = failures.saturating_add(1);
                tracing::warn!(
                    "agent MQTT {endpoint}: {e}; retrying in {:.1} s",
                    wait.as_secs_f64()
                );
                if events.send(Polled::Lost).await.is_err() {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The inferences the I/O loop handed to the worker and has not acknowledged (or released),
/// bounded in total and per device. Pure bookkeeping.
struct Held {
    max: usize,
    edge_prefix: String,
    count: usize,
    per_device: HashMap<String, usize>,
    /// Packet ids held (QoS 1): a redelivery of one is not a new inference.
    pkids: HashSet<u16>,
    /// Some inference was dropped unacknowledged since the last connection ...
    shed: bool,
    /// ... and this many were let go since: reconnect (have the broker redeliver) once half
    /// the bound was, not at every one: each reconnection makes the broker resend all that is
    /// unacknowledged.
    freed: usize,
    /// Acknowledgements handed to rumqttc and not yet seen going out: a reconnection would
    /// drop them (and the broker redeliver those inferences once more).
    unsent_acks: usize,
}

enum Admit {
    Take,
    /// A redelivery of one held: the acknowledgement of the one held answers both.
    AlreadyHeld,
    Full,
}

impl Held {
    fn new(max: usize, edge_prefix: String) -> Self {
        Held {
            max,
            edge_prefix,
            count: 0,
            per_device: HashMap::new(),
            pkids: HashSet::new(),
            shed: false,
            freed: 0,
            unsent_acks: 0,
        }
    }

    fn device(&self, p: &Publish) -> String {
        let topic = String::from_utf8_lossy(&p.topic);
        wire::parse_camera_topic(&self.edge_prefix, &topic)
            .filter(|t| t.leaf == Leaf::Inference)
            .map(|t| t.device.to_string())
            .unwrap_or_default()
    }

    fn admit(&mut self, p: &Publish) -> Admit {
        let qos1 = p.qos != QoS::AtMostOnce;
        if qos1 && self.pkids.contains(&p.pkid) {
            return Admit::AlreadyHeld;
        }
        let device = self.device(p);
        let mine = self.per_device.get(&device).copied().unwrap_or(0);
        if self.count >= self.max || mine >= self.max / 2 {
            self.shed = qos1 || self.shed;
            return Admit::Full;
        }
        self.count += 1;
        *self.per_device.entry(device).or_default() += 1;
        if qos1 {
            self.pkids.insert(p.pkid);
        }
        Admit::Take
    }

    fn done(&mut self, p: &Publish) {
        if p.qos != QoS::AtMostOnce && !self.pkids.remove(&p.pkid) {
            return;
        }
        let device = self.device(p);
        if let Some(n) = self.per_device.get_mut(&device) {
            *n -= 1;
            if *n == 0 {
                self.per_device.remove(&device);
            }
        }
        self.count = self.count.saturating_sub(1);
        self.freed += 1;
    }

    /// Whether to reconnect now so that the broker redelivers what was shed.
    fn redeliver(&mut self) -> bool {
        if self.shed && self.unsent_acks == 0 && self.freed >= self.max / 2 {
            self.shed = false;
            self.freed = 0;
            return true;
        }
        false
    }

    /// A new connection: the broker redelivers everything unacknowledged, and rumqttc
    /// dropped the acknowledgements it had not sent.
    fn connected(&mut self) {
        self.shed = false;
        self.freed = 0;
        self.unsent_acks = 0;
    }
}

/// The I/O loop's state: our publishes in flight and the acknowledgements to send.
struct Io {
    client: AsyncClient,
    connected: bool,
    outgoing: Outgoing<Then>,
    acks: VecDeque<Publish>,
    jobs: std_mpsc::Sender<Job>,
    /// A shared subscription (renewed at every connection).
    shared: bool,
    held: Held,
    /// Set while a DISCONNECT of ours asks for a redelivery (the poller reconnects at once).
    redelivery: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Io {
    /// Hands waiting publishes and acknowledgements to rumqttc without ever waiting: what
    /// does not fit stays for the next call.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        while let Some((id, item)) = self.outgoing.next_waiting() {
            let r = self.client.try_publish(
                item.topic.clone(),
                QoS::AtLeastOnce,
                false,
                item.payload.clone(),
            );
            if r.is_err() {
                break;
            }
            self.outgoing.handed(id);
        }
        while let Some(p) = self.acks.front() {
            if self.client.try_ack(p).is_err() {
                break;
            }
            if let Some(p) = self.acks.pop_front() {
                if p.qos != QoS::AtMostOnce {
                    self.held.unsent_acks += 1;
                }
                self.held.done(&p);
            }
        }
        // a reconnection now would make rumqttc send our unacknowledged results again; the
        // DISCONNECT follows our acknowledgements on the connection, so the broker has them
        if self.acks.is_empty() && !self.outgoing.in_flight() && self.held.redeliver() {
            tracing::info!(
                "reconnecting: the broker redelivers the inferences dropped above limits.max_held"
            );
            self.redelivery.store(true, Ordering::Relaxed);
            if self.client.try_disconnect().is_ok() {
                Counters::add(&self.counters.redelivery_reconnects);
                self.connected = false;
            } else {
                self.redelivery.store(false, Ordering::Relaxed);
                self.held.shed = true;
            }
        }
    }

    fn release(&mut self, ps: Vec<Publish>) {
        for p in &ps {
            self.held.done(p);
        }
    }

    /// Returns false when the worker is gone.
    fn event(
        &mut self,
        ev: Event,
        subscription: &str,
        ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> bool {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected = true;
                self.counters.mqtt_connected.store(true, Ordering::Relaxed);
                self.held.connected();
                if !ack.session_present {
                    // rumqttc dropped what it held for the old session
                    self.outgoing.session_lost();
                }
                // A resumed session keeps a plain subscription, and subscribing again would
                // make the broker send every retained inference once more. mosquitto 2.0.11
                // forgets shared subscriptions when it restarts, so those are renewed always.
                if !ack.session_present || self.shared {
                    tracing::info!(
                        "agent connected (session present: {}); subscribing {subscription}",
                        ack.session_present
                    );
                    let _ = self.client.try_subscribe(subscription, QoS::AtLeastOnce);
                } else {
                    tracing::info!("agent connected; session and subscription resumed");
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
            }
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Event::Incoming(Packet::Publish(p)) => match self.held.admit(&p) {
                Admit::Take => {
                    self.counters
                        .held_peak
                        .fetch_max(self.held.count as u64, Ordering::Relaxed);
                    return self.jobs.send(Job::Message(p)).is_ok();
                }
                Admit::AlreadyHeld => {}
                Admit::Full => {
                    if self
                        .counters
                        .shed
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(1000)
                    {
                        tracing::warn!(
                            "holding {} inferences (limits.max_held {}, half per device): what arrives beyond stays with the broker, unacknowledged, for a later redelivery",
                            self.held.count,
                            self.held.max
                        );
                    }
                }
            },
            Event::Outgoing(Out::Publish(pkid)) => self.outgoing.went_out(pkid),
            Event::Outgoing(Out::PubAck(_)) => {
                self.held.unsent_acks = self.held.unsent_acks.saturating_sub(1);
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let ok = matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                );
                if !ok {
                    if self.outgoing.refused(ack.pkid, Instant::now()) {
                        tracing::error!(
                            "the broker refused a result or dead letter ({:?}); check its ACL: the publish is retried and its inference stays unacknowledged",
                            ack.reason
                        );
                    }
                } else if let Some(item) = self.outgoing.acked(ack.pkid) {
                    match item.then {
                        Then::Record(key) => {
                            return self.jobs.send(Job::Published(key)).is_ok();
                        }
                        Then::Ack(ps) => self.acks.extend(ps),
                    }
                }
            }
            Event::Incoming(Packet::Disconnect(d)) => {
                self.connected = false;
                tracing::warn!("broker disconnected the agent: {:?}", d.reason_code);
            }
            _ => {}
        }
        true
    }
}

/// The worker thread: the checks, the rate limit and the decryptions, off the I/O loop.
fn spawn_worker(
    cfg: &AgentConfig,
    processor: Processor,
    jobs: std_mpsc::Receiver<Job>,
    out: mpsc::UnboundedSender<Decision>,
    counters: &Arc<Counters>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    let worker = Worker {
        processor,
        limiter: RateLimiter::new(cfg.limits.per_device_per_minute, cfg.limits.burst),
        dead_topic: cfg.mqtt.role.dead_letter_topic.clone(),
        flights: HashMap::new(),
        deferred: HashMap::new(),
        out,
        counters: counters.clone(),
        abort_after_decrypt: std::env::var("FHECAM_FAILPOINT").as_deref()
            == Ok("agent-after-decrypt"),
    };
    std::thread::Builder::new()
        .name("fhecam-agent-worker".into())
        .spawn(move || worker.run(jobs))
        .map_err(AgentError::Worker)
}

/// Runs until `shutdown`. `ready` is told once the subscription is acknowledged or resumed.
/// The agent's Prometheus metrics: its own counters, read on each scrape, so they equal
/// the closing stats line; plus decryptions by model, refusals by code and the decryption
/// duration.
fn metrics_exporter(c: Arc<Counters>) -> fhecam_metrics::Exporter {
    use fhecam_metrics::{Emit, Exporter};
    let histograms = c.clone();
    let x = Exporter::new("fhecam_agent", move |e: &mut Emit| {
        let s = c.snapshot();
        e.counter(
            "envelopes_received",
            "Inference messages received",
            s.received,
        );
        e.counters_in(
            "decrypted",
            "Inferences decrypted, by model id",
            "model_id",
            &c.decrypted_by_model,
            &[],
        );
        let codes = fhecam_proto::wire::RefusalCode::ALL.map(|code| code.as_str());
        e.counters_in(
            "refused",
            "Inferences refused (dead letters), by refusal code",
            "code",
            &c.refused_by_code,
            &codes,
        );
        e.counter(
            "duplicates",
            "Inferences received again after their result was published",
            s.duplicates,
        );
        e.counter(
            "dead_letters",
            "Refusals reported on the dead-letter topic",
            s.dead_lettered,
        );
        e.counter(
            "rate_limited",
            "Inferences held back by a device's rate limit",
            s.rate_limited,
        );
        e.counter(
            "published",
            "Cockpit results the broker acknowledged",
            s.published,
        );
        e.counter(
            "shed",
            "Inferences dropped unread at the held bound (redelivered later)",
            s.shed,
        );
        e.mqtt_connected(c.mqtt_connected.load(Ordering::Relaxed));
    });
    x.histogram(
        &histograms.decrypt_seconds,
        "decrypt_duration_seconds",
        "Duration of a decryption, checked inference in to label out",
    );
    x
}

/// The `/metrics` endpoint, when `[metrics]` asks for one.
async fn serve_metrics(
    cfg: &AgentConfig,
    counters: &Arc<Counters>,
) -> Result<Option<tokio_util::sync::DropGuard>, AgentError> {
    let Some(mc) = &cfg.metrics else {
        return Ok(None);
    };
    // the endpoint stops when the guard, held by `run`, drops
    let stop = CancellationToken::new();
    let x = Arc::new(metrics_exporter(counters.clone()));
    fhecam_metrics::serve(mc, x, stop.clone())
        .await
        .map_err(|e| AgentError::Metrics(e.to_string()))?;
    Ok(Some(stop.drop_guard()))
}

pub async fn run(
    cfg: AgentConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<AgentStats, AgentError> {
    let subscription = cfg.subscription();
    let m = cfg.mqtt.conn.clone();
    let client_id = super::processor::client_id(&cfg)?;
    let options = mqtt_options(&cfg, client_id.clone())?;
    tracing::info!("agent client id {client_id}");
    let processor = tokio::task::block_in_place(|| Processor::new(cfg.clone()))?;
    let counters = Arc::new(Counters::default());
    let _metrics = serve_metrics(&cfg, &counters).await?;

    // each held inference makes at most one publish and one acknowledgement, so this never
    // fills; if it did, `try_` calls keep the request for later
    let (client, eventloop) = AsyncClient::new(options, 4 * cfg.limits.max_held + 16);
    let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_CAPACITY);
    let redelivery = Arc::new(AtomicBool::new(false));
    let backoff = (
        Duration::from_secs_f64(m.reconnect_backoff_initial_s),
        Duration::from_secs_f64(m.reconnect_backoff_max_s),
    );
    let poller = tokio::spawn(poll(
        eventloop,
        ev_tx,
        redelivery.clone(),
        backoff,
        format!("{}:{}", m.host, m.port),
    ));

    let (job_tx, job_rx) = std_mpsc::channel();
    let (dec_tx, mut dec_rx) = mpsc::unbounded_channel();
    let worker = spawn_worker(&cfg, processor, job_rx, dec_tx, &counters)?;

    let mut io = Io {
        client: client.clone(),
        connected: false,
        outgoing: Outgoing::default(),
        acks: VecDeque::new(),
        jobs: job_tx,
        shared: cfg.mqtt.role.shared,
        held: Held::new(cfg.limits.max_held, cfg.mqtt.role.edge_prefix.clone()),
        redelivery: redelivery.clone(),
        counters: counters.clone(),
    };
    let mut ready = ready;
    let mut fatal = None;
    // retries what a full request channel or a refusal left waiting
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = ev_rx.recv() => match ev {
                Some(Polled::Event(ev)) => {
                    if !io.event(*ev, &subscription, &mut ready) {
                        break;
                    }
                }
                // requests wait for the next ConnAck (rumqttc would drop our acks)
                Some(Polled::Lost) => {
                    io.connected = false;
                    counters.mqtt_connected.store(false, Ordering::Relaxed);
                }
                None => break,
            },
            d = dec_rx.recv() => match d {
                Some(Decision::Publish(item)) => { io.outgoing.push(item); }
                Some(Decision::Ack(ps)) => io.acks.extend(ps),
                Some(Decision::Release(ps)) => io.release(ps),
                Some(Decision::Fatal(e)) => { fatal = Some(e); break; }
                None => break,
            },
            _ = tick.tick() => io.outgoing.retry_due(Instant::now()),
        }
        io.flush();
    }

    // unacknowledged inferences stay with the broker for the next run
    redelivery.store(false, Ordering::Relaxed);
    let _ = client.try_disconnect();
    drop(ev_rx);
    let abort = poller.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), poller)
        .await
        .is_err()
    {
        abort.abort();
    }
    drop(io);
    // the worker ends with the job channel; a decryption takes milliseconds
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    let stats = counters.snapshot();
    tracing::info!("agent stopped: {stats:?}");
    match fatal {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}
