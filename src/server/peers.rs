//! Admission by peer address, for the admin listener: the port that, in Kubernetes, anyone in
//! the cluster can reach, and that kubelet's probes must always get through.
//!
//! A plain connection cap lets one client that opens enough idle connections starve everyone
//! else (the probes time out and kubelet restarts a healthy sidecar). Here a new connection is
//! always served if *some* connection can make room for it:
//!
//! - a peer (IP address, port ignored) holding `per_peer` connections that opens another loses
//!   its own oldest idle connection;
//! - when the listener holds `max` connections, the peer holding the most loses its oldest idle
//!   one;
//! - only when none of the connections that could make room is idle is the new one refused
//!   (closed at once): a busy connection is never cut for a newcomer.
//!
//! *Idle* means no request in flight: silent, sending its head, or kept alive between
//! requests. An attacker's connections are idle by construction, and older than a probe's, so
//! they are the ones that go. Kubelet probes all come from the node's address and Prometheus
//! from its pod's: neither shares the limit with an attacker in another pod; an attacker on the
//! node's own address (a host-network pod) shares it with kubelet, and still cannot keep a
//! probe out, because each probe's new connection evicts an older idle one.
//!
//! Invariants: the table holds at most `max` entries, at most `per_peer` per address, one per
//! live connection; the decision ([`PeerTable::admit`]) reads only the table, no clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::conn::Tracker;

/// One admitted connection.
#[derive(Debug)]
struct Entry {
    id: u64,
    tracker: Arc<Tracker>,
    /// Cancelled when the connection must make room for a newer one.
    evict: CancellationToken,
}

/// The live connections of one listener, by peer address, oldest first.
#[derive(Debug)]
pub(crate) struct PeerTable {
    max: usize,
    per_peer: usize,
    next_id: u64,
    total: usize,
    peers: HashMap<IpAddr, Vec<Entry>>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every connection that could have made room has a request in flight.
    NoIdleConnection,
}

/// What a newly accepted connection holds: its eviction signal, and its place in the table,
/// given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    table: Arc<Mutex<PeerTable>>,
    peer: IpAddr,
    id: u64,
    pub(crate) evict: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.table).remove(self.peer, self.id);
    }
}

fn lock(table: &Mutex<PeerTable>) -> std::sync::MutexGuard<'_, PeerTable> {
    // The table stays consistent whatever panicked while holding it: every change is one
    // push or one remove.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerTable {
    pub(crate) fn new(max: usize, per_peer: usize) -> PeerTable {
        PeerTable {
            max: max.max(1),
            per_peer: per_peer.max(1),
            next_id: 0,
            total: 0,
            peers: HashMap::new(),
        }
    }

    /// Admits a connection from `peer` into the shared `table`, evicting one idle connection
    /// first when a limit would be exceeded.
    pub(crate) fn admit_shared(
        table: &Arc<Mutex<PeerTable>>,
        peer: IpAddr,
        tracker: Arc<Tracker>,
    ) -> Result<Ticket, Refused> {
        let mut t = lock(table);
        let (id, evict) = t.admit(peer, tracker)?;
        Ok(Ticket {
            table: table.clone(),
            peer,
            id,
            evict,
        })
    }

    /// The decision: room is made (one idle connection evicted) if a limit is reached, then the
    /// connection is recorded. Returns its id and eviction signal.
    fn admit(
        &mut self,
        peer: IpAddr,
        tracker: Arc<Tracker>,
    ) -> Result<(u64, CancellationToken), Refused> {
        let own = self.peers.get(&peer).map_or(0, Vec::len);
        let victim_peer = if own >= self.per_peer {
            Some(peer)
        } else if self.total >= self.max {
            // The peer holding the most connections; ties broken by address so the choice does
            // not depend on hash order.
            self.peers
                .iter()
                .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
                .map(|(ip, _)| *ip)
        } else {
            None
        };
        if let Some(vp) = victim_peer {
            let entries = self.peers.get_mut(&vp).ok_or(Refused::NoIdleConnection)?;
            let oldest_idle = entries
                .iter()
                .position(|e| e.tracker.is_idle())
                .ok_or(Refused::NoIdleConnection)?;
            let victim = entries.remove(oldest_idle);
            victim.evict.cancel();
            self.total -= 1;
            if entries.is_empty() {
                self.peers.remove(&vp);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = CancellationToken::new();
        self.peers.entry(peer).or_default().push(Entry {
            id,
            tracker,
            evict: evict.clone(),
        });
        self.total += 1;
        Ok((id, evict))
    }

    /// Forgets a connection that ended (a no-op if it was evicted already).
    fn remove(&mut self, peer: IpAddr, id: u64) {
        if let Some(entries) = self.peers.get_mut(&peer)
            && let Some(i) = entries.iter().position(|e| e.id == id)
        {
            entries.remove(i);
            self.total -= 1;
            if entries.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    #[cfg(test)]
    fn count(&self, peer: IpAddr) -> usize {
        self.peers.get(&peer).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_peer_at_its_limit_loses_its_oldest_idle_connection() {
        let mut t = PeerTable::new(100, 3);
        let trackers: Vec<_> = (0..3).map(|_| Tracker::new()).collect();
        let mut signals = Vec::new();
        for tr in &trackers {
            signals.push(t.admit(ip(2), tr.clone()).unwrap().1);
        }
        // The oldest is busy: the second-oldest goes.
        let _busy = trackers[0].request_started(http::Version::HTTP_11);
        t.admit(ip(2), Tracker::new()).unwrap();
        assert!(!signals[0].is_cancelled());
        assert!(signals[1].is_cancelled());
        assert!(!signals[2].is_cancelled());
        assert_eq!(t.count(ip(2)), 3);
        // Other peers are untouched by that peer's limit.
        t.admit(ip(3), Tracker::new()).unwrap();
        assert_eq!(t.count(ip(3)), 1);
    }

    #[test]
    fn at_the_listener_cap_the_largest_peer_makes_room() {
        let mut t = PeerTable::new(5, 4);
        let mut attacker = Vec::new();
        for _ in 0..4 {
            attacker.push(t.admit(ip(9), Tracker::new()).unwrap().1);
        }
        let probe = t.admit(ip(1), Tracker::new()).unwrap().1;
        // Full (5): a third peer's connection evicts the attacker's oldest, not the probe.
        t.admit(ip(5), Tracker::new()).unwrap();
        assert!(attacker[0].is_cancelled());
        assert!(!probe.is_cancelled());
        assert_eq!(t.total, 5);
    }

    #[test]
    fn a_newcomer_is_refused_only_when_nothing_that_could_make_room_is_idle() {
        let mut t = PeerTable::new(10, 2);
        let a = Tracker::new();
        let b = Tracker::new();
        let _fa = a.request_started(http::Version::HTTP_11);
        let _fb = b.request_started(http::Version::HTTP_11);
        t.admit(ip(2), a).unwrap();
        t.admit(ip(2), b).unwrap();
        assert_eq!(
            t.admit(ip(2), Tracker::new()).unwrap_err(),
            Refused::NoIdleConnection
        );
        assert_eq!(t.count(ip(2)), 2);
    }

    #[test]
    fn tickets_give_their_place_back_once() {
        let table = Arc::new(Mutex::new(PeerTable::new(2, 2)));
        let first = PeerTable::admit_shared(&table, ip(2), Tracker::new()).unwrap();
        let second = PeerTable::admit_shared(&table, ip(2), Tracker::new()).unwrap();
        // A third evicts the first; the first's ticket, dropped later, must not free the slot
        // the third now holds.
        let third = PeerTable::admit_shared(&table, ip(2), Tracker::new()).unwrap();
        assert!(first.evict.is_cancelled());
        drop(first);
        assert_eq!(lock(&table).total, 2);
        drop(second);
        drop(third);
        assert_eq!(lock(&table).total, 0);
        assert!(lock(&table).peers.is_empty());
    }
}
