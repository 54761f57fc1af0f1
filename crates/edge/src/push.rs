//! Bundles pushed over MQTT: the camera's subscription to the deployment topics, and the
//! hand-over of each pushed bundle to the intake, which judges it like a dropped file.

use super::config::EdgeConfig;
use super::intake::{Offer, Origin, OFFER_QUEUE};
use super::stats::Stats;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;

pub struct Pushes {
    offers: mpsc::Sender<Offer>,
    topics: [String; 2],
    /// Subscribed to the deployment topics in this process (a resumed session keeps the
    /// subscription; a new process subscribes again to get the retained bundle).
    subscribed: bool,
}

impl Pushes {
    pub fn new(cfg: &EdgeConfig, offers: mpsc::Sender<Offer>) -> Self {
        Pushes {
            offers,
            topics: cfg.deploy_topics(),
            subscribed: false,
        }
    }

    /// At each connection: subscribes unless the session kept this process's subscription.
    pub fn subscribe(&mut self, client: &AsyncClient, session_present: bool) {
        if self.subscribed && session_present {
            return;
        }
        let filters = self
            .topics
            .iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        match client.try_subscribe_many(filters) {
            Ok(()) => self.subscribed = true,
            Err(e) => tracing::warn!("cannot subscribe to pushed bundles: {e}"),
        }
    }

    /// A message on a subscribed topic: a pushed bundle for the intake. A full queue
    /// refuses it (the owner pushes again); the retained copy comes back with the next
    /// process.
    pub fn take(&self, p: rumqttc::Publish, stats: &Stats) {
        if !self.topics.contains(&p.topic) {
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
        if self.offers.try_send(offer).is_err() {
            tracing::warn!("{origin} refused: {OFFER_QUEUE} bundles are already waiting to be checked; push it again later");
            stats.refused(crate::stats::refusal::BUSY, format!("{origin}: busy"));
        }
    }
}
