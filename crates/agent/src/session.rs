//! Pure bookkeeping of the agent's own QoS 1 publishes (cockpit results, dead letters),
//! no I/O: which are waiting to be handed to rumqttc, which were handed and not yet seen
//! going out, and which went out under which packet id. The I/O loop (`agent.rs`) feeds it
//! rumqttc's events and learns from it when a publish is acknowledged by the broker — only
//! then is the inference that produced it acknowledged in turn.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a publish the broker refused waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One publish of ours and what to do once the broker has it.
#[derive(Clone, Debug, PartialEq)]
pub struct Item<T> {
    pub topic: String,
    pub payload: Vec<u8>,
    pub then: T,
}

#[derive(Debug)]
pub struct Outgoing<T> {
    next_id: u64,
    items: BTreeMap<u64, Item<T>>,
    /// Not yet handed to rumqttc (disconnected, request channel full, or refused).
    waiting: VecDeque<u64>,
    /// Handed to rumqttc, in request order, not yet seen going out.
    requested: VecDeque<u64>,
    /// Went out under this packet id; awaiting its PUBACK.
    sent: HashMap<u16, u64>,
    /// Refused by the broker, to be tried again from this time on.
    retry: Vec<(Instant, u64)>,
}

impl<T> Default for Outgoing<T> {
    fn default() -> Self {
        Outgoing {
            next_id: 0,
            items: BTreeMap::new(),
            waiting: VecDeque::new(),
            requested: VecDeque::new(),
            sent: HashMap::new(),
            retry: Vec::new(),
        }
    }
}

impl<T> Outgoing<T> {
    pub fn push(&mut self, item: Item<T>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.items.insert(id, item);
        self.waiting.push_back(id);
        id
    }

    /// The oldest item waiting to be handed over.
    pub fn next_waiting(&self) -> Option<(u64, &Item<T>)> {
        let id = *self.waiting.front()?;
        Some((id, &self.items[&id]))
    }

    /// The item `next_waiting` returned was accepted by rumqttc.
    pub fn handed(&mut self, id: u64) {
        if self.waiting.front() == Some(&id) {
            self.waiting.pop_front();
            self.requested.push_back(id);
        }
    }

    /// rumqttc sent a publish with `pkid`. A packet id still awaiting its PUBACK is a
    /// retransmission (session resumed), not one of our new requests.
    pub fn went_out(&mut self, pkid: u16) {
        if self.sent.contains_key(&pkid) {
            return;
        }
        if let Some(id) = self.requested.pop_front() {
            self.sent.insert(pkid, id);
        }
    }

    /// The broker acknowledged `pkid`: the item is done. `None` for packet ids that are
    /// not ours (e.g. a PUBACK the broker repeats).
    pub fn acked(&mut self, pkid: u16) -> Option<Item<T>> {
        let id = self.sent.remove(&pkid)?;
        self.items.remove(&id)
    }

    /// The broker refused `pkid` (e.g. an ACL): keep the item and try again after
    /// `RETRY_AFTER`, so a refusal does not become a busy loop.
    pub fn refused(&mut self, pkid: u16, now: Instant) -> bool {
        match self.sent.remove(&pkid) {
            Some(id) => {
                self.retry.push((now + RETRY_AFTER, id));
                true
            }
            None => false,
        }
    }

    /// Refused items whose wait is over go back to waiting.
    pub fn retry_due(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = self.retry.drain(..).partition(|(t, _)| *t <= now);
        self.retry = later;
        self.waiting.extend(due.into_iter().map(|(_, id)| id));
    }

    /// The broker answered a reconnect without our session: rumqttc dropped every publish it
    /// held, so everything handed over goes back to waiting, oldest first.
    pub fn session_lost(&mut self) {
        let mut ids: Vec<u64> = self
            .requested
            .drain(..)
            .chain(self.sent.drain().map(|(_, id)| id))
            .chain(self.waiting.drain(..))
            .chain(self.retry.drain(..).map(|(_, id)| id))
            .collect();
        ids.sort_unstable();
        self.waiting = ids.into();
    }

    /// Whether rumqttc holds a publish of ours not yet acknowledged by the broker: a
    /// reconnection would make it send that one again (a duplicate for the subscribers).
    pub fn in_flight(&self) -> bool {
        !self.requested.is_empty() || !self.sent.is_empty()
    }

    /// Items not yet acknowledged by the broker.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u32) -> Item<u32> {
        Item {
            topic: format!("t/{n}"),
            payload: vec![n as u8],
            then: n,
        }
    }

    fn hand_all(o: &mut Outgoing<u32>) -> Vec<u32> {
        let mut v = Vec::new();
        while let Some((id, it)) = o.next_waiting() {
            v.push(it.then);
            o.handed(id);
        }
        v
    }

    #[test]
    fn acked_in_any_order_and_retransmissions_ignored() {
        let mut o = Outgoing::default();
        for n in 0..3 {
            o.push(item(n));
        }
        assert_eq!(hand_all(&mut o), vec![0, 1, 2]);
        assert!(o.in_flight(), "handed over");
        o.went_out(7);
        o.went_out(8);
        o.went_out(7); // retransmission of item 0
        o.went_out(9);
        assert_eq!(o.acked(9).unwrap().then, 2);
        assert_eq!(o.acked(7).unwrap().then, 0);
        assert!(o.acked(7).is_none(), "acknowledged once");
        assert_eq!(o.acked(8).unwrap().then, 1);
        assert!(o.is_empty());
    }

    #[test]
    fn a_lost_session_hands_everything_over_again_in_order() {
        let mut o = Outgoing::default();
        for n in 0..4 {
            o.push(item(n));
        }
        let (id, _) = o.next_waiting().unwrap();
        o.handed(id);
        let (id, _) = o.next_waiting().unwrap();
        o.handed(id);
        o.went_out(1); // item 0 sent, item 1 only requested, 2 and 3 waiting
        o.session_lost();
        assert_eq!(hand_all(&mut o), vec![0, 1, 2, 3]);
        for pkid in 1..=4 {
            o.went_out(pkid);
        }
        assert_eq!(o.acked(4).unwrap().then, 3);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn refused_items_wait_again() {
        let mut o = Outgoing::default();
        o.push(item(5));
        hand_all(&mut o);
        o.went_out(3);
        let t = Instant::now();
        assert!(o.refused(3, t));
        assert!(!o.refused(3, t));
        assert!(hand_all(&mut o).is_empty(), "not at once");
        o.retry_due(t + RETRY_AFTER / 2);
        assert!(hand_all(&mut o).is_empty());
        o.retry_due(t + RETRY_AFTER);
        assert_eq!(hand_all(&mut o), vec![5]);
        o.went_out(4);
        assert_eq!(o.acked(4).unwrap().then, 5);
        assert!(!o.in_flight());
    }
}
