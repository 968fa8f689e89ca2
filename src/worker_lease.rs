//! The worker-local fast path (opt-in, `worker_lease`): a worker takes a few tokens from a
//! rich shared bucket in the same compare-and-swap as a request's own debit, then admits the
//! tenant's next requests from that lease without touching shared data. Every second the
//! worker gives back what it did not spend.
//!
//! Bounds: a leased token was debited from the shared bucket before it is spent, so the
//! lease never admits more than the bucket holds (no over-admission). Tokens sit in a lease
//! only while the bucket was at least half full when they were taken, and for at most one
//! tick; so the worst case under-admission is `workers x worker_lease` tokens per tenant,
//! held by workers that stopped receiving that tenant's requests, for up to one second.
//!
//! This module owns both thresholds (which buckets lease, and how full they must stay); the
//! store only takes the [`Extra`] tokens it is asked for.

use crate::bucket::{Limits, MAX_LIMITS};
use crate::response::Quota;
use crate::store::{give_back, Extra, Home, Namespace, SharedStore, Unspent};

/// Tenants a worker keeps leases for; more go the normal way.
pub const MAX_LEASES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u128,
    /// Where the owner's bucket is, to give unspent tokens back to.
    pub home: Home,
    /// The limits the tokens were taken from (all of them, at once).
    pub limits: Limits,
    pub tokens: u64,
    /// When the (oldest of the merged) tokens were taken: give-back deducts the time since.
    pub taken_ns: u64,
    /// The bucket's tightest limit as seen when the lease was taken, lease tokens excluded.
    pub quota: Quota,
}

impl Lease {
    fn unspent(&self) -> Unspent {
        Unspent {
            owner: self.owner,
            home: self.home,
            limits: self.limits,
            tokens: self.tokens,
            taken_ns: self.taken_ns,
        }
    }
}

#[derive(Debug, Default)]
pub struct WorkerLeases {
    entries: Vec<Lease>,
}

impl WorkerLeases {
    /// Spends `cost` tokens of `owner`'s lease; returns the bucket's approximate state (the
    /// remaining count as if the leased tokens were still in the shared bucket).
    pub fn spend(&mut self, owner: u128, limits: &Limits, cost: u64) -> Option<Quota> {
        let entry = self.entries.iter_mut().find(|e| e.owner == owner && e.limits == *limits && e.tokens >= cost)?;
        entry.tokens -= cost;
        Some(Quota { remaining: entry.quota.remaining.saturating_add(entry.tokens), ..entry.quota })
    }

    /// Whether a lease for `owner` could be stored.
    pub fn has_room(&self, owner: u128) -> bool {
        self.entries.len() < MAX_LEASES || self.entries.iter().any(|e| e.owner == owner)
    }

    /// The tokens to lease along with a debit of `owner`'s bucket (`worker_lease`, 0 = off),
    /// from every limit at once: only when every limit is at least four leases deep (small
    /// buckets stay exact to the token), and only while every limit stays at least half full
    /// (leases never compete for a scarce bucket).
    pub fn extra(&self, worker_lease: u64, owner: u128, limits: &Limits) -> Extra {
        if worker_lease == 0 || limits.min_capacity() / 4 < worker_lease || !self.has_room(owner) {
            return Extra::default();
        }
        let mut floors = [0; MAX_LIMITS];
        for (floor, limit) in floors.iter_mut().zip(limits.iter()) {
            *floor = limit.capacity.div_ceil(2);
        }
        Extra { tokens: worker_lease, floors }
    }

    /// Keeps tokens just leased; a lease of the owner under another limit goes back.
    pub fn keep(&mut self, store: &mut impl SharedStore, ns: &Namespace, entry: Lease, now_ns: u64) {
        if let Some(old) = self.add(entry) {
            give_back(store, ns, &old.unspent(), now_ns);
        }
    }

    /// Gives every unspent lease back to its shared bucket (every tick, and before a
    /// reconfiguration replaces the config).
    pub fn settle(&mut self, store: &mut impl SharedStore, ns: &Namespace, now_ns: u64) {
        for e in self.drain() {
            give_back(store, ns, &e.unspent(), now_ns);
        }
    }

    /// Stores a fresh lease. Any older lease of the owner is returned to the caller, to be
    /// given back (it was taken under a different limit, or is simply merged here).
    pub fn add(&mut self, entry: Lease) -> Option<Lease> {
        if let Some(existing) = self.entries.iter_mut().find(|e| e.owner == entry.owner) {
            if existing.limits == entry.limits {
                // Merged tokens keep the older taken time: give-back then deducts more
                // (under-admission), never less.
                existing.tokens = existing.tokens.saturating_add(entry.tokens);
                existing.taken_ns = existing.taken_ns.min(entry.taken_ns);
                existing.quota = entry.quota;
                return None;
            }
            return Some(std::mem::replace(existing, entry));
        }
        if self.entries.len() < MAX_LEASES {
            self.entries.push(entry);
            None
        } else {
            Some(entry)
        }
    }

    /// Removes every lease; those with tokens left are to be given back.
    pub fn drain(&mut self) -> impl Iterator<Item = Lease> + '_ {
        self.entries.drain(..).filter(|e| e.tokens > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Limit;

    fn limits(capacity: u64, rate: f64) -> Limits {
        Limits::one(0, Limit::new(capacity, rate).unwrap())
    }

    fn entry(owner: u128, tokens: u64) -> Lease {
        Lease {
            owner,
            home: Home::Slots(10),
            limits: limits(100, 1.0),
            tokens,
            taken_ns: 0,
            quota: Quota {
                capacity: 100,
                remaining: 60,
                reset_seconds: 40,
                next_seconds: 1,
                window_seconds: 100,
                limit: 0,
            },
        }
    }

    #[test]
    fn spends_until_empty() {
        let mut l = WorkerLeases::default();
        let limit = limits(100, 1.0);
        assert_eq!(l.add(entry(1, 3)), None);
        assert_eq!(l.spend(1, &limit, 2).unwrap().remaining, 61);
        assert_eq!(l.spend(1, &limit, 2), None);
        assert_eq!(l.spend(1, &limit, 1).unwrap().remaining, 60);
        assert_eq!(l.spend(1, &limit, 1), None);
        assert_eq!(l.spend(2, &limit, 1), None);
        // Another limit (reconfigured) never spends the old lease.
        l.add(entry(3, 5));
        assert_eq!(l.spend(3, &limits(100, 2.0), 1), None);
    }

    #[test]
    fn bounded_and_drained() {
        let mut l = WorkerLeases::default();
        for owner in 0..MAX_LEASES as u128 {
            assert_eq!(l.add(entry(owner, 2)), None);
        }
        assert!(!l.has_room(999));
        assert!(l.has_room(5));
        assert_eq!(l.add(entry(999, 2)).map(|e| e.owner), Some(999));
        let limit = limits(100, 1.0);
        l.spend(0, &limit, 2);
        assert_eq!(l.drain().count(), MAX_LEASES - 1);
        assert_eq!(l.drain().count(), 0);
    }
}
