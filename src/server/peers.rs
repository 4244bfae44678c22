//! Connection admission by peer address. Built for the admin listener, the port that, in
//! Kubernetes, anyone in the cluster can reach and that kubelet's probes must always get
//! through; the proxy listeners use it too, with no per-peer limit (`per_peer = max`).
//!
//! A plain connection cap lets a client that holds enough idle connections starve everyone
//! else: the probes time out and kubelet restarts a healthy sidecar, or an application's own
//! pool of idle keep-alive connections keeps its newer connections waiting until the idle
//! timeout. Here a new connection is always served if *some* connection can make room for it:
//!
//! - a peer (IP address, port ignored) holding `per_peer` connections that opens another loses
//!   its own oldest idle connection;
//! - when the listener holds `max` connections, the peer holding the most loses its oldest idle
//!   one;
//! - only when none of the connections that could make room is idle is the new one refused: a
//!   busy connection is never cut for a newcomer. The admin listener closes a refused
//!   connection; a proxy listener holds it (and accepts nothing else) until a connection ends
//!   or goes idle, as if it were still in the kernel backlog.
//!
//! The victim is the oldest connection kept alive between requests and quiet for
//! [`KEPT_ALIVE_QUIET`] (closing it costs its client a reconnect at most; a connection that
//! just carried a request may be the one the client is reusing this instant); failing that, where the listener allows it (the admin listener), the
//! oldest with no request in flight at all: silent, or still sending its head. An attacker's
//! connections are of that kind by construction, and older than a probe's, so they are the
//! ones that go. The proxy listeners never evict a connection that has not finished its first
//! request: under a burst of new connections that would cut requests already sent. Kubelet probes all come from the node's address and Prometheus
//! from its pod's: neither shares the limit with an attacker in another pod; an attacker on the
//! node's own address (a host-network pod) shares it with kubelet, and still cannot keep a
//! probe out, because each probe's new connection evicts an older idle one.
//!
//! Invariants: the table holds at most `max` entries, at most `per_peer` per address, one per
//! live connection; the decision ([`PeerTable::admit`]) reads only the table and the
//! connections' trackers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::conn::Tracker;

/// How long a kept-alive connection must have been quiet before a newcomer may close it.
pub(crate) const KEPT_ALIVE_QUIET: std::time::Duration = std::time::Duration::from_millis(250);

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
    /// Whether connections that have not completed a request may be evicted.
    evict_fresh: bool,
    next_id: u64,
    total: usize,
    peers: HashMap<IpAddr, Vec<Entry>>,
    /// Each eviction signal is a child of this one (the server's stop signal): a connection
    /// task then waits on one signal for both, instead of polling two per wake-up.
    parent: CancellationToken,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every connection that could have made room has a request in flight.
    NoIdleConnection,
}

/// One listener's table, shared by its accept loop and its connections' tickets.
#[derive(Debug)]
pub(crate) struct Admissions {
    table: Mutex<PeerTable>,
    /// Signalled when a connection ends, for an accept loop waiting for room.
    freed: Notify,
}

impl Admissions {
    /// `stop`: the server's stop signal; every eviction signal fires with it too.
    pub(crate) fn new(
        max: usize,
        per_peer: usize,
        evict_fresh: bool,
        stop: &CancellationToken,
    ) -> Arc<Admissions> {
        let mut table = PeerTable::new(max, per_peer, evict_fresh);
        table.parent = stop.clone();
        Arc::new(Admissions {
            table: Mutex::new(table),
            freed: Notify::new(),
        })
    }

    /// Admits a connection from `peer`, evicting one idle connection first when a limit would
    /// be exceeded.
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        tracker: Arc<Tracker>,
    ) -> Result<Ticket, Refused> {
        let (id, evict) = lock(&self.table).admit(peer, tracker)?;
        Ok(Ticket {
            shared: self.clone(),
            peer,
            id,
            evict,
        })
    }

    /// Resolves when a connection has ended (or after `poll`, since a busy connection going
    /// idle is not signalled).
    pub(crate) async fn room(&self, poll: std::time::Duration) {
        let _ = tokio::time::timeout(poll, self.freed.notified()).await;
    }
}

/// What a newly accepted connection holds: its eviction signal, and its place in the table,
/// given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    shared: Arc<Admissions>,
    peer: IpAddr,
    id: u64,
    pub(crate) evict: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.shared.table).remove(self.peer, self.id);
        self.shared.freed.notify_one();
    }
}

fn lock(table: &Mutex<PeerTable>) -> std::sync::MutexGuard<'_, PeerTable> {
    // The table stays consistent whatever panicked while holding it: every change is one
    // push or one remove.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerTable {
    fn new(max: usize, per_peer: usize, evict_fresh: bool) -> PeerTable {
        PeerTable {
            max: max.max(1),
            per_peer: per_peer.max(1),
            evict_fresh,
            next_id: 0,
            total: 0,
            peers: HashMap::new(),
            parent: CancellationToken::new(),
        }
    }

    /// The decision: room is made (one idle connection evicted) if a limit is reached, then the
    /// connection is recorded. Returns its id and eviction signal.
    fn admit(
        &mut self,
        peer: IpAddr,
        tracker: Arc<Tracker>,
    ) -> Result<(u64, CancellationToken), Refused> {
        let own = self.peers.get(&peer).map_or(0, Vec::len);
        // Whose connections may make room: this peer's own at its limit; at the listener's
        // limit, every peer's, the one holding the most first (ties broken by address so the
        // choice does not depend on hash order), so that one peer's busy connections never
        // keep out a newcomer while another peer has an idle one.
        let candidates: Vec<IpAddr> = if own >= self.per_peer {
            vec![peer]
        } else if self.total >= self.max {
            let mut by_count: Vec<(usize, IpAddr)> =
                self.peers.iter().map(|(ip, e)| (e.len(), *ip)).collect();
            by_count.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            by_count.into_iter().map(|(_, ip)| ip).collect()
        } else {
            Vec::new()
        };
        if !candidates.is_empty() {
            let evict_fresh = self.evict_fresh;
            // Prefer a connection kept alive and quiet (any candidate peer) over a fresh one
            // that has not sent a request yet.
            let pick = |entries: &Vec<Entry>, fresh: bool| {
                entries.iter().position(|e| {
                    if fresh {
                        e.tracker.is_idle()
                    } else {
                        e.tracker.is_kept_alive_idle(KEPT_ALIVE_QUIET)
                    }
                })
            };
            let found = [false, true]
                .into_iter()
                .filter(|fresh| !fresh || evict_fresh)
                .find_map(|fresh| {
                    candidates.iter().find_map(|vp| {
                        let entries = self.peers.get(vp)?;
                        pick(entries, fresh).map(|i| (*vp, i))
                    })
                });
            let (vp, oldest_idle) = found.ok_or(Refused::NoIdleConnection)?;
            let entries = self.peers.get_mut(&vp).ok_or(Refused::NoIdleConnection)?;
            let victim = entries.remove(oldest_idle);
            victim.evict.cancel();
            self.total -= 1;
            if entries.is_empty() {
                self.peers.remove(&vp);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = self.parent.child_token();
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
        let mut t = PeerTable::new(100, 3, true);
        let trackers: Vec<_> = (0..3).map(|_| Tracker::new()).collect();
        let mut signals = Vec::new();
        for tr in &trackers {
            signals.push(t.admit(ip(2), tr.clone()).unwrap().1);
        }
        // The oldest is busy: the second-oldest goes.
        let _busy = trackers[0].request_started(&mut http::Request::new(()));
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
        let mut t = PeerTable::new(5, 4, true);
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
    fn at_the_listener_cap_a_smaller_peer_makes_room_when_the_largest_is_busy() {
        let mut t = PeerTable::new(4, 4, true);
        let busy: Vec<_> = (0..3).map(|_| Tracker::new()).collect();
        let _in_flight: Vec<_> = busy
            .iter()
            .map(|b| b.request_started(&mut http::Request::new(())))
            .collect();
        for b in &busy {
            t.admit(ip(9), b.clone()).unwrap();
        }
        let other = t.admit(ip(1), Tracker::new()).unwrap().1;
        // Full (4), the largest peer all busy: the other peer's idle connection makes room.
        t.admit(ip(5), Tracker::new()).unwrap();
        assert!(other.is_cancelled());
        assert_eq!(t.count(ip(9)), 3);
        assert_eq!(t.total, 4);
    }

    #[test]
    fn a_newcomer_is_refused_only_when_nothing_that_could_make_room_is_idle() {
        let mut t = PeerTable::new(10, 2, true);
        let a = Tracker::new();
        let b = Tracker::new();
        let _fa = a.request_started(&mut http::Request::new(()));
        let _fb = b.request_started(&mut http::Request::new(()));
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
        let shared = Admissions::new(2, 2, true, &CancellationToken::new());
        let first = shared.admit(ip(2), Tracker::new()).unwrap();
        let second = shared.admit(ip(2), Tracker::new()).unwrap();
        // A third evicts the first; the first's ticket, dropped later, must not free the slot
        // the third now holds.
        let third = shared.admit(ip(2), Tracker::new()).unwrap();
        assert!(first.evict.is_cancelled());
        drop(first);
        assert_eq!(lock(&shared.table).total, 2);
        drop(second);
        drop(third);
        assert_eq!(lock(&shared.table).total, 0);
        assert!(lock(&shared.table).peers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn kept_alive_connections_go_first_and_fresh_ones_only_where_allowed() {
        let kept = Tracker::new();
        drop(kept.request_started(&mut http::Request::new(())));
        // Just used: not yet evictable (the client may be reusing it right now).
        let mut t = PeerTable::new(1, 1, false);
        t.admit(ip(2), kept.clone()).unwrap();
        assert!(t.admit(ip(2), Tracker::new()).is_err());
        tokio::time::advance(KEPT_ALIVE_QUIET).await;
        for evict_fresh in [true, false] {
            let mut t = PeerTable::new(2, 2, evict_fresh);
            let fresh = t.admit(ip(2), Tracker::new()).unwrap().1;
            let idle = t.admit(ip(2), kept.clone()).unwrap().1;
            // The younger, kept-alive connection goes before the older fresh one.
            t.admit(ip(2), Tracker::new()).unwrap();
            assert!(idle.is_cancelled() && !fresh.is_cancelled());
            // Now only fresh connections are left.
            let next = t.admit(ip(2), Tracker::new());
            assert_eq!(next.is_ok(), evict_fresh, "evict_fresh = {evict_fresh}");
            assert_eq!(fresh.is_cancelled(), evict_fresh);
        }
    }
}
