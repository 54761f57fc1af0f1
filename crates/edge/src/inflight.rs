//! Which outbox entry is in flight under which MQTT packet id: the link's pure
//! bookkeeping, apart from its I/O.

use std::collections::{BTreeSet, HashMap, VecDeque};

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
