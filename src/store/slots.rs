//! The bounded slot table and the reserved keys: where a bucket lives, and the debit and
//! give-back on it, each a read-decide-write through [`retry`].
//!
//! Shared data has no delete, so one key per tenant would grow without bound. Instead there
//! are `max_tenants` slots (`trl/<namespace>/<slot>`); each bucket owner hashes to a few
//! candidate slots. A slot holding a *full* bucket may be taken over, because a full bucket
//! is indistinguishable from a new one: reuse never grants tokens. The record stores a
//! 128-bit hash of its owner, so two owners sharing a slot are never merged silently.
//!
//! Tenants listed in the config (and their per-rule buckets) do not use the slot table: each
//! has a reserved key of its own (`trl/<namespace>/r<owner hash>`), so their storage is
//! bounded by the config and no flood of other tenant ids can take it (see [`Home`]).

use super::record::{Grant, Namespace, Record};
use super::{retry, swap, Attempt, GetError, SetError, SharedStore, CREATE_CAS};
use crate::bucket::{self, Limits, States, Verdicts, MAX_LIMITS};

/// Candidate slots per bucket owner.
pub const CANDIDATES: usize = 4;

/// The candidate slots of an owner, distinct, in a fixed order.
pub fn candidates(owner: u128, max_tenants: u32) -> ([u32; CANDIDATES], usize) {
    let mut out = [0u32; CANDIDATES];
    let mut n = 0;
    let slots = max_tenants.max(1) as u128;
    for i in 0..CANDIDATES {
        let slot = ((owner >> (32 * i)) as u32 as u128 % slots) as u32;
        if !out.get(..n).unwrap_or(&[]).contains(&slot) {
            if let Some(dst) = out.get_mut(n) {
                *dst = slot;
            }
            n += 1;
        }
    }
    (out, n)
}

/// What happened to a debit, with what the metrics need to know.
// The verdicts of several limits make `Decided` large; boxing them would allocate on the
// request path, and an outcome lives on the stack of one request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Decided {
        verdict: Verdicts,
        slot: SlotUse,
    },
    /// Every candidate slot holds a live bucket of another owner.
    NoSlot,
    /// A host error, or CAS retries exhausted.
    StoreError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotUse {
    Existing,
    /// Created a key that did not exist (the live-key count grew by one).
    Created,
    /// Took over a slot whose bucket was full.
    Reclaimed,
    /// Denied before a slot was written.
    Untouched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debit {
    pub outcome: Outcome,
    /// CAS mismatches seen (each one a retry).
    pub cas_retries: u32,
    /// The extra tokens taken along ([`Extra`]).
    pub extra: u64,
}

impl Debit {
    fn failed(cas_retries: u32) -> Debit {
        Debit { outcome: Outcome::StoreError, cas_retries, extra: 0 }
    }
}

/// Tokens to take along with a request's own cost, for the caller to hand out later (worker
/// leases), from every limit at once: taken only if at least `floors[i]` tokens remain in
/// limit `i` afterwards. What those numbers should be is the caller's business (see
/// worker_lease.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extra {
    pub tokens: u64,
    pub floors: [u64; MAX_LIMITS],
}

/// One debit: `cost` (plus maybe `extra`) tokens from every limit of `owner`'s bucket, all or
/// nothing, at `now_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawal {
    pub owner: u128,
    pub limits: Limits,
    pub cost: u64,
    pub extra: Extra,
    pub now_ns: u64,
}

/// Where an owner's bucket lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// The slot table of this many slots: tenants the config does not list.
    Slots(u32),
    /// A key of its own ([`Namespace::reserved_key`]): tenants listed in the config and their
    /// per-rule buckets. No traffic can take this storage, and there are at most
    /// `listed tenants x (1 + rules with their own limit)` such keys. The number is the slot
    /// table's size: when the reserved key is first created, the owner's bucket is looked up
    /// there once and carried over (a tenant that was unlisted, or an upgrade from a version
    /// without reserved keys, keeps the tokens it spent).
    Reserved(u32),
}

/// Candidates read before the chosen free slot, each holding another owner's live bucket:
/// (slot, bytes, cas) as read.
pub type Skipped = [Option<(u32, Vec<u8>, u32)>; CANDIDATES];

/// Where an owner's record is, or may be created.
pub enum Location {
    Own { slot: u32, bytes: Vec<u8>, cas: u32 },
    Free { slot: u32, cas: Option<u32>, skipped: Skipped },
    Full,
}

/// Who holds a slot, and whether it may be taken over: a bucket that is full again, or a
/// service grant that expired or is spent, is worth nothing to its owner.
fn occupant(bytes: &[u8], now_ns: u64) -> Option<(u128, bool)> {
    if let Some(r) = Record::decode(bytes) {
        return Some((r.owner, r.is_full(now_ns)));
    }
    Grant::decode(bytes).map(|g| (g.owner, g.tokens == 0 || g.expires_ns <= now_ns))
}

/// The slot table of one plugin: its key namespace and its number of slots (`max_tenants`).
#[derive(Debug, Clone, Copy)]
pub struct SlotTable<'a> {
    pub ns: &'a Namespace,
    pub slots: u32,
}

impl SlotTable<'_> {
    /// Finds `owner`'s record (a bucket or a grant) among its candidate slots, or a slot it
    /// may take.
    pub fn locate(&self, store: &mut impl SharedStore, owner: u128, now_ns: u64) -> Result<Location, GetError> {
        let (slots, n) = candidates(owner, self.slots);
        let mut free: Option<(u32, Option<u32>)> = None;
        let mut skipped: Skipped = Default::default();
        for (i, &slot) in slots.get(..n).unwrap_or(&[]).iter().enumerate() {
            match store.get(self.ns.slot_key(slot).as_str())? {
                None => {
                    free.get_or_insert((slot, None));
                }
                Some((bytes, cas)) => match occupant(&bytes, now_ns) {
                    Some((o, _)) if o == owner => return Ok(Location::Own { slot, bytes, cas }),
                    Some((_, false)) => {
                        if free.is_none() {
                            if let Some(s) = skipped.get_mut(i) {
                                *s = Some((slot, bytes, cas));
                            }
                        }
                    }
                    // Reusable, or bytes that are no record of ours.
                    _ => {
                        free.get_or_insert((slot, Some(cas)));
                    }
                },
            }
        }
        Ok(match free {
            Some((slot, cas)) => Location::Free { slot, cas, skipped },
            None => Location::Full,
        })
    }
}

/// Debits a withdrawal from its owner's bucket, in the slot table or its reserved key.
pub fn debit(store: &mut impl SharedStore, ns: &Namespace, home: Home, w: &Withdrawal) -> Debit {
    match home {
        Home::Slots(max_tenants) => debit_slots(store, ns, max_tenants, w),
        Home::Reserved(max_tenants) => debit_reserved(store, ns, max_tenants, w),
    }
}

fn debit_slots(store: &mut impl SharedStore, ns: &Namespace, max_tenants: u32, w: &Withdrawal) -> Debit {
    let mut cas_retries = 0;
    // A key created by an attempt that was then folded into another slot still exists.
    let mut created = false;
    let done = retry(&mut cas_retries, || {
        let location = match (SlotTable { ns, slots: max_tenants }).locate(store, w.owner, w.now_ns) {
            Ok(l) => l,
            Err(GetError) => return Attempt::Failed,
        };
        let (slot, state, cas, found, skipped) = match location {
            Location::Own { slot, bytes, cas } => (slot, stored_state(&bytes, w), cas, SlotUse::Existing, None),
            Location::Free { slot, cas: None, skipped } => {
                (slot, ([0; MAX_LIMITS], false), CREATE_CAS, SlotUse::Created, Some(skipped))
            }
            Location::Free { slot, cas: Some(cas), skipped } => {
                (slot, ([0; MAX_LIMITS], false), cas, SlotUse::Reclaimed, Some(skipped))
            }
            Location::Full => return Attempt::Done(Debit { outcome: Outcome::NoSlot, cas_retries: 0, extra: 0 }),
        };
        let (verdict, extra, wrote) = match write(store, ns.slot_key(slot).as_str(), w, state, cas) {
            Attempt::Done(d) => d,
            Attempt::Conflict => return Attempt::Conflict,
            Attempt::Failed => return Attempt::Failed,
        };
        created |= wrote && found == SlotUse::Created;
        if let (true, Some(skipped)) = (wrote, skipped) {
            if pin(store, ns, w.owner, slot, verdict.states(), skipped, w.now_ns) == Pinned::Duplicate {
                // Our bucket was a second one and is folded away: decide again against the
                // owner's first bucket.
                return Attempt::Conflict;
            }
        }
        // A denial on a free slot wrote nothing, so it neither created nor reclaimed.
        let slot = if created {
            SlotUse::Created
        } else if wrote || found == SlotUse::Existing {
            found
        } else {
            SlotUse::Untouched
        };
        Attempt::Done(Debit { outcome: Outcome::Decided { verdict, slot }, cas_retries: 0, extra })
    });
    match done {
        Some(d) => Debit { cas_retries, ..d },
        None => Debit::failed(cas_retries),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pinned {
    Alone,
    Duplicate,
}

/// Run after a worker created or reclaimed slot `mine` for `owner` (writing `written`): makes
/// sure the owner cannot end up with a second bucket in an earlier candidate.
///
/// The race (issue 15, item 7): worker A reads candidate c0 while another owner's bucket
/// there is live and puts the owner in c1; worker B reads c0 an instant later, when that
/// bucket is full again, and c1 before A's write, and reclaims c0 for the same owner. Two
/// buckets, each admitting. A cannot stop B with its own write, since A never writes c0; so
/// A *pins* every candidate it skipped: it rewrites the bytes it read there with the cas it
/// read. If the pin succeeds, the slot did not change between A's read and the pin, and:
/// - a worker that read it before the pin holds a stale cas, so its reclaim fails and it
///   reads again;
/// - a worker that reads it after the pin reads the later candidates after A's write (a
///   lookup reads candidates in order), so it finds A's bucket.
///
/// If a pin fails, the slot changed; if it now holds the owner's bucket, that one (the
/// earlier candidate, which every lookup finds first) is kept, and ours is folded into it.
/// So the worker that wrote the later candidate always settles the race, and a request is
/// only ever decided against one bucket. A pin costs one extra `set` per skipped candidate,
/// only when a slot is created or reclaimed in a later candidate; a pinned bucket's owner
/// at most retries one CAS.
fn pin(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    mine: u32,
    written: States,
    skipped: Skipped,
    now_ns: u64,
) -> Pinned {
    for (slot, bytes, cas) in skipped.into_iter().flatten() {
        let key = ns.slot_key(slot);
        let mut seen = Some((bytes, cas));
        // Done(None): the host failed; keep the decision (the race needs a failing host too).
        let pinned = retry(&mut 0, || {
            let (bytes, cas) = match seen.take() {
                Some(read) => read,
                None => match store.get(key.as_str()) {
                    Ok(Some(read)) => read,
                    _ => return Attempt::Done(None),
                },
            };
            if matches!(Record::decode(&bytes), Some(r) if r.owner == owner) {
                fold(store, ns, owner, mine, written, slot, now_ns);
                return Attempt::Done(Some(Pinned::Duplicate));
            }
            // Pin what is there: the bucket we skipped or, after a conflict, someone else's
            // write (its owner's debit, a reclaim by a third owner).
            match swap(store, key.as_str(), &bytes, cas) {
                Attempt::Done(()) => Attempt::Done(Some(Pinned::Alone)),
                Attempt::Conflict => Attempt::Conflict,
                Attempt::Failed => Attempt::Done(None),
            }
        });
        match pinned {
            Some(Some(Pinned::Alone)) | None => {}
            Some(Some(Pinned::Duplicate)) => return Pinned::Duplicate,
            Some(None) => return Pinned::Alone,
        }
    }
    Pinned::Alone
}

/// Folds `owner`'s bucket in slot `mine` (which we wrote with state `written`) into its bucket
/// in the earlier slot `first`: what other workers debited from `mine` since our write moves
/// to `first` before `mine` is freed, so no token is lost (moving first and freeing after
/// can only count a debit twice, which under-admits). Our own debit is dropped with `mine`:
/// the caller decides the request again against `first`.
fn fold(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    mine: u32,
    written: States,
    first: u32,
    now_ns: u64,
) {
    let key = ns.slot_key(mine);
    let mut moved: States = [0; MAX_LIMITS];
    retry(&mut 0, || {
        let Ok(Some((bytes, cas))) = store.get(key.as_str()) else { return Attempt::Failed };
        let Some(record) = Record::decode(&bytes).filter(|r| r.owner == owner) else { return Attempt::Failed };
        let mut extra: States = [0; MAX_LIMITS];
        for (((e, t), w), m) in extra.iter_mut().zip(record.t_full).zip(written).zip(moved) {
            *e = t.saturating_sub(w).saturating_sub(m);
        }
        if extra.iter().any(|e| *e > 0) {
            if !add_debt(store, ns.slot_key(first).as_str(), owner, &extra, now_ns) {
                return Attempt::Failed;
            }
            for (m, e) in moved.iter_mut().zip(extra) {
                *m += e;
            }
        }
        // A full bucket: free for any owner to reclaim, and worth nothing to this one.
        swap(store, key.as_str(), Record { t_full: [0; MAX_LIMITS], ..record }.encode().as_bytes(), cas)
    });
}

/// Adds `ticks[i]` of debt to limit `i` of `owner`'s bucket under `key`; false if it is not
/// there.
fn add_debt(store: &mut impl SharedStore, key: &str, owner: u128, ticks: &States, now_ns: u64) -> bool {
    retry(&mut 0, || {
        let Ok(Some((bytes, cas))) = store.get(key) else { return Attempt::Failed };
        let Some(mut record) = Record::decode(&bytes).filter(|r| r.owner == owner) else { return Attempt::Failed };
        for (t, add) in record.t_full.iter_mut().zip(ticks) {
            *t = (*t).max(bucket::now_ticks(now_ns)).saturating_add(*add);
        }
        swap(store, key, record.encode().as_bytes(), cas)
    })
    .is_some()
}

/// Debits `owner`'s reserved key, creating it on first use.
fn debit_reserved(store: &mut impl SharedStore, ns: &Namespace, max_tenants: u32, w: &Withdrawal) -> Debit {
    let key = ns.reserved_key(w.owner);
    debit_key(store, key.as_str(), w, Some(SlotTable { ns, slots: max_tenants }))
}

/// Debits a bucket under a fixed key (the shared overflow bucket).
pub fn debit_named(store: &mut impl SharedStore, key: &str, w: &Withdrawal) -> Debit {
    debit_key(store, key, w, None)
}

/// Debits the bucket under one fixed key. A key not created yet starts full, or with `carry`
/// (a reserved key) from the owner's bucket in that slot table, if it has one; the state is
/// then written even on a denial, so this lookup happens once per owner.
fn debit_key(store: &mut impl SharedStore, key: &str, w: &Withdrawal, carry: Option<SlotTable>) -> Debit {
    let mut cas_retries = 0;
    let done = retry(&mut cas_retries, || {
        let (state, cas, creating) = match store.get(key) {
            Err(GetError) => return Attempt::Failed,
            Ok(Some((bytes, cas))) => (stored_state(&bytes, w), cas, false),
            Ok(None) => {
                let state = match carry {
                    None => ([0; MAX_LIMITS], false),
                    Some(table) => match table.locate(store, w.owner, w.now_ns) {
                        Ok(Location::Own { bytes, .. }) => (stored_state(&bytes, w).0, true),
                        Ok(_) => ([0; MAX_LIMITS], true),
                        Err(GetError) => return Attempt::Failed,
                    },
                };
                (state, CREATE_CAS, true)
            }
        };
        match write(store, key, w, state, cas) {
            Attempt::Done((verdict, extra, wrote)) => {
                // Creating the key counts toward live_slots like any other key.
                let slot = match (creating, wrote) {
                    (true, true) => SlotUse::Created,
                    (true, false) => SlotUse::Untouched,
                    (false, _) => SlotUse::Existing,
                };
                Attempt::Done(Debit { outcome: Outcome::Decided { verdict, slot }, cas_retries: 0, extra })
            }
            Attempt::Conflict => Attempt::Conflict,
            Attempt::Failed => Attempt::Failed,
        }
    });
    match done {
        Some(d) => Debit { cas_retries, ..d },
        None => Debit::failed(cas_retries),
    }
}

/// The owner's bucket as stored, carried over to the withdrawal's limits
/// ([`Record::carried`]): the states, and whether the limits changed (then the carried state
/// must be written back even on a denial). Anything else (another owner, a grant, foreign
/// bytes) reads as a new, full bucket.
fn stored_state(bytes: &[u8], w: &Withdrawal) -> (States, bool) {
    match Record::decode(bytes) {
        Some(r) if r.owner == w.owner => (r.carried(&w.limits, w.now_ns), r.limits != w.limits),
        _ => ([0; MAX_LIMITS], false),
    }
}

/// Tokens a worker took from `owner`'s bucket at `taken_ns` and did not spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unspent {
    pub owner: u128,
    pub home: Home,
    pub limits: Limits,
    pub tokens: u64,
    pub taken_ns: u64,
}

/// Returns unspent lease tokens to their bucket: `t_full` moves back by `tokens` intervals
/// **less the time since they were taken**, never before `now`. Why the deduction: while the
/// tokens sat in the lease, the bucket without them might have been full, and a full bucket
/// loses refill; the tokens' debt went on refilling instead. Moving `t_full` back by the full
/// amount would hand that lost refill out again (over-admission). Refill lost while full is
/// at most the time elapsed, so deducting it never returns more than the bucket would hold
/// had the lease never been taken. If the bucket was reconfigured or its slot reused
/// meanwhile, the tokens are dropped. Both only under-admit. Returns whether a record was
/// updated (or needed no update).
pub fn give_back(store: &mut impl SharedStore, ns: &Namespace, unspent: &Unspent, now_ns: u64) -> bool {
    let Unspent { owner, home, limits, tokens, taken_ns } = *unspent;
    retry(&mut 0, || {
        let found = match home {
            Home::Reserved(_) => {
                let key = ns.reserved_key(owner);
                match store.get(key.as_str()) {
                    Ok(Some((bytes, cas))) => Some((key, bytes, cas)),
                    _ => None,
                }
            }
            Home::Slots(slots) => match (SlotTable { ns, slots }).locate(store, owner, now_ns) {
                Ok(Location::Own { slot, bytes, cas }) => Some((ns.slot_key(slot), bytes, cas)),
                _ => None,
            },
        };
        let Some((key, bytes, cas)) = found else { return Attempt::Failed };
        let mut record = match Record::decode(&bytes) {
            Some(r) if r.owner == owner && r.limits == limits => r,
            _ => return Attempt::Failed,
        };
        let now = bucket::now_ticks(now_ns);
        let elapsed = now.saturating_sub(bucket::now_ticks(taken_ns));
        let mut changed = false;
        for (limit, t_full) in limits.iter().zip(record.t_full.iter_mut()) {
            let back = limit.interval.saturating_mul(u128::from(tokens)).saturating_sub(elapsed);
            let moved = t_full.saturating_sub(back).max(now);
            changed |= moved < *t_full;
            *t_full = moved.min(*t_full);
        }
        if !changed {
            return Attempt::Done(()); // already full: nothing to give back
        }
        swap(store, key.as_str(), record.encode().as_bytes(), cas)
    })
    .is_some()
}

/// Decides the withdrawal on the states that were read (and whether they were carried over
/// to new limits) and swaps in the new states: (verdicts, extra tokens taken, written).
/// A denial writes only to record a reconfiguration (the states carried over to the new
/// limits); otherwise it changes nothing, so there is nothing to race on.
fn write(
    store: &mut impl SharedStore,
    key: &str,
    w: &Withdrawal,
    (states, rescaled): (States, bool),
    cas: u32,
) -> Attempt<(Verdicts, u64, bool)> {
    let (verdict, extra) = decide(w, &states);
    if !verdict.allowed && !rescaled {
        return Attempt::Done((verdict, 0, false));
    }
    let record = Record { owner: w.owner, limits: w.limits, t_full: verdict.states() };
    match store.set(key, record.encode().as_bytes(), cas) {
        Ok(()) => Attempt::Done((verdict, extra, true)),
        Err(SetError::CasMismatch) => Attempt::Conflict,
        Err(SetError::Failed) if !verdict.allowed => Attempt::Done((verdict, 0, false)),
        Err(SetError::Failed) => Attempt::Failed,
    }
}

/// The bucket math of one withdrawal: with its extra tokens if every limit keeps at least
/// its floor, else the cost alone; all limits or none.
fn decide(w: &Withdrawal, states: &States) -> (Verdicts, u64) {
    if w.extra.tokens > 0 {
        let with_extra = bucket::debit_all(&w.limits, states, w.now_ns, w.cost.saturating_add(w.extra.tokens));
        if with_extra.allowed && with_extra.iter().zip(w.extra.floors).all(|(v, floor)| v.remaining >= floor) {
            return (with_extra, w.extra.tokens);
        }
    }
    (bucket::debit_all(&w.limits, states, w.now_ns, w.cost), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Limit;
    use crate::store::fake::FakeStore;
    use crate::store::record::hash128;
    use crate::store::MAX_CAS_ATTEMPTS;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn lim(c: u64, r: f64) -> Limit {
        Limit::new(c, r).unwrap()
    }

    /// A withdrawal; `extra` tokens are taken along while the bucket stays half full.
    fn w(owner: u128, limit: &Limit, cost: u64, extra: u64, now_ns: u64) -> Withdrawal {
        let extra = Extra { tokens: extra, floors: [limit.capacity.div_ceil(2); MAX_LIMITS] };
        Withdrawal { owner, limits: Limits::one(0, *limit), cost, extra, now_ns }
    }

    fn allowed(d: &Debit) -> bool {
        matches!(d.outcome, Outcome::Decided { verdict, .. } if verdict.allowed)
    }

    #[test]
    fn candidates_are_distinct_and_in_range() {
        for owner in [0u128, 1, u128::MAX, hash128(&[b"x"])] {
            for max in [1u32, 2, 3, 10_000] {
                let (c, n) = candidates(owner, max);
                let c = &c[..n];
                assert!(c.iter().all(|&s| s < max));
                for (i, s) in c.iter().enumerate() {
                    assert!(!c[..i].contains(s));
                }
            }
        }
    }

    #[test]
    fn debits_exactly_capacity() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(5, 1.0);
        let owner = hash128(&[b"acme"]);
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, Home::Slots(100), &w(owner, &l, 1, 0, T0)))).count();
        assert_eq!(n, 5);
        assert_eq!(s.data.len(), 1);
    }

    #[test]
    fn fast_path_is_one_get() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let owner = hash128(&[b"acme"]);
        debit(&mut s, &ns, Home::Slots(1000), &w(owner, &lim(5, 1.0), 1, 0, T0));
        s.gets = 0;
        debit(&mut s, &ns, Home::Slots(1000), &w(owner, &lim(5, 1.0), 1, 0, T0));
        assert_eq!(s.gets, 1);
    }

    #[test]
    fn cas_conflicts_are_retried_then_reported() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        s.conflicts = 3;
        let d = debit(&mut s, &ns, Home::Slots(10), &w(1, &lim(5, 1.0), 1, 0, T0));
        assert!(allowed(&d));
        assert_eq!(d.cas_retries, 3);
        s.conflicts = MAX_CAS_ATTEMPTS;
        let d = debit(&mut s, &ns, Home::Slots(10), &w(1, &lim(5, 1.0), 1, 0, T0));
        assert_eq!(d.outcome, Outcome::StoreError);
        assert_eq!(d.cas_retries, MAX_CAS_ATTEMPTS);
        s.conflicts = 0;
        s.fail_sets = true;
        assert_eq!(debit(&mut s, &ns, Home::Slots(10), &w(1, &lim(5, 1.0), 1, 0, T0)).outcome, Outcome::StoreError);
        s.fail_sets = false;
        s.fail_gets = true;
        assert_eq!(debit(&mut s, &ns, Home::Slots(10), &w(1, &lim(5, 1.0), 1, 0, T0)).outcome, Outcome::StoreError);
    }

    #[test]
    fn slot_table_is_bounded_and_reclaims_only_full_buckets() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(2, 1.0);
        let mut no_slot = 0;
        for i in 0..1000u32 {
            let d = debit(&mut s, &ns, Home::Slots(16), &w(hash128(&[&i.to_le_bytes()]), &l, 1, 0, T0));
            if d.outcome == Outcome::NoSlot {
                no_slot += 1;
            }
        }
        assert!(s.data.len() <= 16);
        assert!(no_slot > 900);
        // After the buckets refilled, new owners reclaim slots.
        let d = debit(&mut s, &ns, Home::Slots(16), &w(hash128(&[b"late"]), &l, 1, 0, T0 + 10 * SEC));
        assert!(matches!(d.outcome, Outcome::Decided { slot: SlotUse::Reclaimed, .. }), "{d:?}");
        assert!(s.data.len() <= 16);
    }

    #[test]
    fn owner_found_in_later_candidate_is_not_duplicated() {
        // Occupy the first candidate with a live bucket, so the owner lands in a later one.
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(3, 0.001);
        let owner = hash128(&[b"acme"]);
        let (c, _) = candidates(owner, 1000);
        let blocker =
            Record { owner: 99, limits: Limits::one(0, l), t_full: [bucket::now_ticks(T0 + 1000 * SEC); MAX_LIMITS] };
        s.data.insert(ns.slot_key(c[0]).as_str().to_string(), (blocker.encode().as_bytes().to_vec(), 5));
        for _ in 0..3 {
            assert!(allowed(&debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, T0))));
        }
        // The blocker refills; the owner must still find its own (empty) bucket, not a new one.
        let later = T0 + 2000 * SEC;
        let d = debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, later));
        assert!(allowed(&d)); // two tokens refilled at 0.001/s over 2000 s
        assert!(allowed(&debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, later))));
        assert!(!allowed(&debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, later))));
    }

    #[test]
    fn a_denial_after_shrinking_records_the_clamped_debt() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let old = lim(10, 0.001);
        for _ in 0..7 {
            assert!(allowed(&debit(&mut s, &ns, Home::Slots(10), &w(3, &old, 1, 0, T0))));
        }
        let new = lim(5, 0.001); // one token per 1000 s
        assert!(!allowed(&debit(&mut s, &ns, Home::Slots(10), &w(3, &new, 1, 0, T0))));
        // The debt was clamped to 5 tokens and stored: the first token is due after 1000 s,
        // not after the 3000 s the unclamped debt of 7 would take.
        assert!(allowed(&debit(&mut s, &ns, Home::Slots(10), &w(3, &new, 1, 0, T0 + 1000 * SEC))));
    }

    #[test]
    fn named_bucket() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let key = ns.named_key("overflow");
        let first = debit_named(&mut s, key.as_str(), &w(7, &lim(3, 1.0), 1, 0, T0));
        assert!(matches!(first.outcome, Outcome::Decided { slot: SlotUse::Created, .. }));
        let n = (0..9).filter(|_| allowed(&debit_named(&mut s, key.as_str(), &w(7, &lim(3, 1.0), 1, 0, T0)))).count();
        assert_eq!(n, 2);
    }

    #[test]
    fn reserved_bucket_is_exact_whatever_fills_the_slot_table() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let junk = lim(5, 0.001);
        // Junk owners fill every slot with live buckets.
        for i in 0..500u32 {
            debit(&mut s, &ns, Home::Slots(8), &w(hash128(&[&i.to_le_bytes()]), &junk, 1, 0, T0));
        }
        let vip = hash128(&[b"vip"]);
        assert_eq!(debit(&mut s, &ns, Home::Slots(8), &w(vip, &junk, 1, 0, T0)).outcome, Outcome::NoSlot);
        let l = lim(10, 0.001);
        let first = debit(&mut s, &ns, Home::Reserved(8), &w(vip, &l, 1, 0, T0));
        assert!(matches!(first.outcome, Outcome::Decided { slot: SlotUse::Created, .. }), "{first:?}");
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, Home::Reserved(8), &w(vip, &l, 1, 0, T0)))).count();
        assert_eq!(n + 1, 10);
        // 8 slots + 1 reserved key, whatever the traffic.
        assert_eq!(s.data.len(), 9);
        assert!(s.data.contains_key(ns.reserved_key(vip).as_str()));
    }

    #[test]
    fn reserved_bucket_starts_from_the_slot_table_state() {
        // A tenant that was unlisted (or served by a build without reserved keys) keeps the
        // tokens it spent when it becomes listed.
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(5, 0.001);
        for _ in 0..4 {
            assert!(allowed(&debit(&mut s, &ns, Home::Slots(100), &w(7, &l, 1, 0, T0))));
        }
        assert!(allowed(&debit(&mut s, &ns, Home::Reserved(100), &w(7, &l, 1, 0, T0))));
        assert!(!allowed(&debit(&mut s, &ns, Home::Reserved(100), &w(7, &l, 1, 0, T0))));
        // A denial on a new reserved key stores the carried state too, so the slot table is
        // read once per owner.
        let mut s = FakeStore::default();
        for _ in 0..5 {
            debit(&mut s, &ns, Home::Slots(100), &w(8, &l, 1, 0, T0));
        }
        let d = debit(&mut s, &ns, Home::Reserved(100), &w(8, &l, 1, 0, T0));
        assert!(matches!(d.outcome, Outcome::Decided { verdict, slot: SlotUse::Created } if !verdict.allowed));
        s.gets = 0;
        assert!(!allowed(&debit(&mut s, &ns, Home::Reserved(100), &w(8, &l, 1, 0, T0))));
        assert_eq!(s.gets, 1);
    }

    #[test]
    fn give_back_reaches_reserved_buckets() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(10, 0.001);
        let d = debit(&mut s, &ns, Home::Reserved(4), &w(9, &l, 1, 4, T0));
        assert_eq!(d.extra, 4);
        assert!(give_back(
            &mut s,
            &ns,
            &Unspent { owner: 9, home: Home::Reserved(4), limits: Limits::one(0, l), tokens: 4, taken_ns: T0 },
            T0
        ));
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, Home::Reserved(4), &w(9, &l, 1, 0, T0)))).count();
        assert_eq!(n, 9);
        // A slot-table give-back never touches the reserved key.
        assert!(!give_back(
            &mut s,
            &ns,
            &Unspent { owner: 9, home: Home::Slots(4), limits: Limits::one(0, l), tokens: 4, taken_ns: T0 },
            T0
        ));
    }

    /// A store that runs `other` (another worker's whole request) just before the first set
    /// of `trigger`, as a worker on another thread could.
    struct Racing<F: FnMut(&mut FakeStore)> {
        inner: FakeStore,
        trigger: String,
        other: Option<F>,
    }

    impl<F: FnMut(&mut FakeStore)> SharedStore for Racing<F> {
        fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError> {
            self.inner.get(key)
        }
        fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            if key == self.trigger {
                if let Some(mut other) = self.other.take() {
                    other(&mut self.inner);
                }
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn two_first_requests_across_a_refill_instant_share_one_bucket() {
        // Issue 15, item 7: c0 holds another owner's bucket, full again at `t_star`. Worker A
        // reads c0 just before (live) and creates the owner in c1; worker B reads c0 at
        // `t_star` (reclaimable) and c1 before A's write, and reclaims c0.
        let ns = Namespace::new("r");
        let l = lim(2, 0.001);
        let owner = hash128(&[b"acme"]);
        let (c, n) = candidates(owner, 1000);
        assert!(n >= 2);
        let t_star = T0 + SEC;
        let mut inner = FakeStore::default();
        let blocker = Record { owner: 99, limits: Limits::one(0, l), t_full: [bucket::now_ticks(t_star); MAX_LIMITS] };
        inner.data.insert(ns.slot_key(c[0]).as_str().to_string(), (blocker.encode().as_bytes().to_vec(), 5));
        inner.next_cas = 5;
        let mut b_allowed = false;
        let mut s = Racing {
            inner,
            trigger: ns.slot_key(c[1]).as_str().to_string(),
            other: Some(|st: &mut FakeStore| {
                b_allowed = allowed(&debit(st, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, t_star)));
            }),
        };
        let a = debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, t_star - 1));
        let mut s = s.inner;
        assert!(b_allowed);
        let mut admitted = u32::from(allowed(&a)) + 1;
        for _ in 0..5 {
            admitted += u32::from(allowed(&debit(&mut s, &ns, Home::Slots(1000), &w(owner, &l, 1, 0, t_star))));
        }
        assert_eq!(admitted, 2, "one bucket of capacity 2");
        // c1 was freed: any owner may take it.
        let c1 = Record::decode(&s.data[ns.slot_key(c[1]).as_str()].0).unwrap();
        assert!(c1.is_full(t_star));
    }

    proptest! {
        /// Interleaved writers (a conflict before some sets) never admit more than the bucket holds.
        #[test]
        fn conflicts_never_over_admit(conflict_pattern in prop::collection::vec(0u32..4, 1..200), cap in 1u64..50) {
            let mut s = FakeStore::default();
            let ns = Namespace::new("r");
            let l = lim(cap, 0.001);
            let mut n = 0;
            for c in conflict_pattern {
                s.conflicts = c;
                if allowed(&debit(&mut s, &ns, Home::Slots(64), &w(5, &l, 1, 0, T0))) { n += 1; }
            }
            prop_assert!(n <= cap);
        }
    }
}
