//! Buckets in Envoy shared data: the record codec, the bounded slot table and the
//! compare-and-swap debit loop. The host is reached through [`SharedStore`] so the same
//! loop runs against Envoy, the wasm test host, and the in-memory fake in the tests below.
//!
//! Shared data has no delete, so one key per tenant would grow without bound. Instead there
//! are `max_tenants` slots (`trl/<namespace>/<slot>`); each bucket owner hashes to a few
//! candidate slots. A slot holding a *full* bucket may be taken over, because a full bucket
//! is indistinguishable from a new one: reuse never grants tokens. The record stores a
//! 128-bit hash of its owner, so two owners sharing a slot are never merged silently.

use crate::bucket::{self, Limit, Verdict};

/// Record layout version; a record of another version is treated as free.
pub const RECORD_VERSION: u8 = 1;
/// version + owner + capacity + interval + t_full.
pub const RECORD_LEN: usize = 1 + 16 + 8 + 16 + 16;
/// The cas used to create a key. Envoy creates a missing key whatever cas is passed, but a
/// *nonzero* cas makes the write fail if another worker created the key in the meantime
/// (cas 0 would overwrite that worker's debit).
pub const CREATE_CAS: u32 = u32::MAX;
/// CAS attempts per request before `on_store_error` applies.
pub const MAX_CAS_ATTEMPTS: u32 = 16;
/// Candidate slots per bucket owner.
pub const CANDIDATES: usize = 4;

/// The host could not read shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Failed,
}

/// The shared-data calls the debit loop needs, with Envoy's semantics: a missing key reads
/// as `Ok(None)`; `set` with a stale nonzero cas on an existing key is `CasMismatch`.
pub trait SharedStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError>;
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// One bucket as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub owner: u128,
    /// The limit the state was written under, so a reconfiguration can carry it over.
    pub limit: Limit,
    pub t_full: u128,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        let mut w = Writer { out: &mut out, at: 0 };
        w.put(&[RECORD_VERSION]);
        w.put(&self.owner.to_le_bytes());
        w.put(&self.limit.capacity.to_le_bytes());
        w.put(&self.limit.interval.to_le_bytes());
        w.put(&self.t_full.to_le_bytes());
        out
    }

    /// `None` for anything that is not a record of this version (foreign, truncated, empty).
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        if bytes.len() != RECORD_LEN || bytes.first() != Some(&RECORD_VERSION) {
            return None;
        }
        let owner = u128::from_le_bytes(bytes.get(1..17)?.try_into().ok()?);
        let capacity = u64::from_le_bytes(bytes.get(17..25)?.try_into().ok()?);
        let interval = u128::from_le_bytes(bytes.get(25..41)?.try_into().ok()?);
        let t_full = u128::from_le_bytes(bytes.get(41..57)?.try_into().ok()?);
        if capacity == 0 || interval == 0 {
            return None;
        }
        Some(Record { owner, limit: Limit { capacity, interval }, t_full })
    }
}

struct Writer<'a> {
    out: &'a mut [u8; RECORD_LEN],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.at += bytes.len();
    }
}

/// A 128-bit, seed-free hash (two independent 64-bit lanes), stable across VMs and builds
/// because buckets outlive a VM. Not cryptographic; see README "Memory bound" for what a
/// crafted collision can and cannot do.
pub fn hash128(parts: &[&[u8]]) -> u128 {
    let mut a: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut b: u64 = 0xc2b2_ae3d_27d4_eb4f;
    for part in parts {
        for &byte in part.iter() {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
        }
        // Separate parts so ("ab","c") and ("a","bc") differ.
        a = (a ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ part.len() as u64).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    }
    ((mix(a) as u128) << 64) | mix(b ^ a.rotate_left(17)) as u128
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The key prefix of one plugin: `trl/<16 hex digits of the root id's hash>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    prefix: [u8; NS_LEN],
}

const NS_LEN: usize = 4 + 16 + 1;
const KEY_CAP: usize = NS_LEN + 20;

impl Namespace {
    pub fn new(root_id: &str) -> Namespace {
        let mut prefix = [0u8; NS_LEN];
        let h = hash128(&[root_id.as_bytes()]) as u64;
        let mut at = 0;
        for &b in b"trl/" {
            set(&mut prefix, &mut at, b);
        }
        for shift in (0..16).rev() {
            let nibble = (h >> (shift * 4)) & 0xf;
            set(&mut prefix, &mut at, b"0123456789abcdef".get(nibble as usize).copied().unwrap_or(b'0'));
        }
        set(&mut prefix, &mut at, b'/');
        Namespace { prefix }
    }

    /// The key of slot `slot`, built on the stack.
    pub fn slot_key(&self, slot: u32) -> Key {
        let mut key = Key { buf: [0; KEY_CAP], len: 0 };
        key.push(&self.prefix);
        let mut digits = [0u8; 10];
        let mut n = slot;
        let mut count = 0;
        loop {
            if let Some(d) = digits.get_mut(count) {
                *d = b'0' + (n % 10) as u8;
            }
            count += 1;
            n /= 10;
            if n == 0 || count == digits.len() {
                break;
            }
        }
        for i in (0..count).rev() {
            key.push(digits.get(i..=i).unwrap_or(b"0"));
        }
        key
    }

    pub fn named_key(&self, name: &str) -> Key {
        let mut key = Key { buf: [0; KEY_CAP], len: 0 };
        key.push(&self.prefix);
        key.push(name.as_bytes());
        key
    }
}

fn set(buf: &mut [u8], at: &mut usize, b: u8) {
    if let Some(dst) = buf.get_mut(*at) {
        *dst = b;
    }
    *at += 1;
}

/// A shared-data key in a fixed buffer (ASCII only).
pub struct Key {
    buf: [u8; KEY_CAP],
    len: usize,
}

impl Key {
    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(KEY_CAP);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..end), bytes.get(..end - self.len)) {
            dst.copy_from_slice(src);
        }
        self.len = end;
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.buf.get(..self.len).unwrap_or(&[])).unwrap_or("")
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Decided {
        verdict: Verdict,
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
    /// Extra tokens taken for the worker's lease (see `debit`'s `grab`).
    pub granted: u64,
}

/// Where an owner's record is, or may be created.
enum Location {
    Own { slot: u32, bytes: Vec<u8>, cas: u32 },
    Free { slot: u32, cas: Option<u32> },
    Full,
}

/// Who holds a slot, and whether it may be taken over: a bucket that is full again, or a
/// lease that expired or is spent, is worth nothing to its owner.
fn occupant(bytes: &[u8], now_ns: u64) -> Option<(u128, bool)> {
    if let Some(r) = Record::decode(bytes) {
        return Some((r.owner, bucket::is_full(r.t_full, now_ns)));
    }
    Lease::decode(bytes).map(|l| (l.owner, l.tokens == 0 || l.expires_ns <= now_ns))
}

fn locate(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    max_tenants: u32,
    now_ns: u64,
) -> Result<Location, GetError> {
    let (slots, n) = candidates(owner, max_tenants);
    let mut free = None;
    for &slot in slots.get(..n).unwrap_or(&[]) {
        match store.get(ns.slot_key(slot).as_str())? {
            None => {
                free.get_or_insert(Location::Free { slot, cas: None });
            }
            Some((bytes, cas)) => match occupant(&bytes, now_ns) {
                Some((o, _)) if o == owner => return Ok(Location::Own { slot, bytes, cas }),
                Some((_, false)) => {}
                // Reusable, or bytes that are no record of ours.
                _ => {
                    free.get_or_insert(Location::Free { slot, cas: Some(cas) });
                }
            },
        }
    }
    Ok(free.unwrap_or(Location::Full))
}

/// Debits `cost` tokens from `owner`'s bucket in the slot table. With `grab > 0` it also
/// takes `grab` extra tokens for a worker-local lease, but only if the bucket is still at
/// least half full afterwards (so leases never compete for a scarce bucket).
#[allow(clippy::too_many_arguments)]
pub fn debit(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    limit: &Limit,
    cost: u64,
    grab: u64,
    now_ns: u64,
    max_tenants: u32,
) -> Debit {
    let mut cas_retries = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let location = match locate(store, ns, owner, max_tenants, now_ns) {
            Ok(l) => l,
            Err(GetError) => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
        };
        let (slot, state, cas, use_) = match location {
            Location::Own { slot, bytes, cas } => {
                (slot, stored_state(&bytes, owner, limit, now_ns), cas, SlotUse::Existing)
            }
            Location::Free { slot, cas: None } => (slot, (0, false), CREATE_CAS, SlotUse::Created),
            Location::Free { slot, cas: Some(cas) } => (slot, (0, false), cas, SlotUse::Reclaimed),
            Location::Full => return Debit { outcome: Outcome::NoSlot, cas_retries, granted: 0 },
        };
        let granted = if grab > 0 {
            let with_lease = bucket::debit(limit, state.0, now_ns, cost.saturating_add(grab));
            if with_lease.allowed && with_lease.remaining.saturating_mul(2) >= limit.capacity {
                grab
            } else {
                0
            }
        } else {
            0
        };
        match write(store, ns.slot_key(slot).as_str(), owner, limit, state, cas, cost + granted, now_ns) {
            Step::Done(verdict, wrote) => {
                // A denial on a free slot wrote nothing, so it neither created nor reclaimed.
                let slot = if wrote || use_ == SlotUse::Existing { use_ } else { SlotUse::Untouched };
                return Debit { outcome: Outcome::Decided { verdict, slot }, cas_retries, granted };
            }
            Step::Retry => cas_retries += 1,
            Step::Failed => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
        }
    }
    Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 }
}

/// `owner`'s bucket as stored, carried over to `limit`: its `t_full`, and whether the limit
/// changed (then the carried state must be written back even on a denial). Anything else
/// (another owner, a lease, foreign bytes) reads as a new, full bucket.
fn stored_state(bytes: &[u8], owner: u128, limit: &Limit, now_ns: u64) -> (u128, bool) {
    match Record::decode(bytes) {
        Some(r) if r.owner == owner => (bucket::rescale(r.t_full, now_ns, &r.limit, limit), r.limit != *limit),
        _ => (0, false),
    }
}

/// Debits a bucket under a fixed key (the shared overflow bucket).
pub fn debit_named(
    store: &mut impl SharedStore,
    key: &str,
    owner: u128,
    limit: &Limit,
    cost: u64,
    now_ns: u64,
) -> Debit {
    let mut cas_retries = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (state, cas, creating) = match store.get(key) {
            Err(GetError) => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
            Ok(None) => ((0, false), CREATE_CAS, true),
            Ok(Some((bytes, cas))) => (stored_state(&bytes, owner, limit, now_ns), cas, false),
        };
        match write(store, key, owner, limit, state, cas, cost, now_ns) {
            Step::Done(verdict, wrote) => {
                // Creating the key counts toward live_slots like any other key.
                let slot = if wrote && creating { SlotUse::Created } else { SlotUse::Existing };
                return Debit { outcome: Outcome::Decided { verdict, slot }, cas_retries, granted: 0 };
            }
            Step::Retry => cas_retries += 1,
            Step::Failed => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
        }
    }
    Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 }
}

/// Returns `tokens` a worker leased but did not spend to `owner`'s bucket: `t_full` moves
/// back by that many intervals, never before `now` (a bucket cannot be more than full). If
/// the bucket was reconfigured or its slot reused meanwhile, the tokens are dropped, which
/// can only under-admit. Returns whether they went back.
pub fn give_back(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    limit: &Limit,
    tokens: u64,
    now_ns: u64,
    max_tenants: u32,
) -> bool {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (slot, record, cas) = match locate(store, ns, owner, max_tenants, now_ns) {
            Ok(Location::Own { slot, bytes, cas }) => match Record::decode(&bytes) {
                Some(r) if r.limit == *limit => (slot, r, cas),
                _ => return false,
            },
            _ => return false,
        };
        let back = limit.interval.saturating_mul(u128::from(tokens));
        let t_full = record.t_full.saturating_sub(back).max(bucket::now_ticks(now_ns));
        if t_full >= record.t_full {
            return true; // already full: nothing to give back
        }
        match store.set(ns.slot_key(slot).as_str(), &Record { t_full, ..record }.encode(), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => {}
            Err(SetError::Failed) => return false,
        }
    }
    false
}

/// Layout version of a lease record.
pub const LEASE_VERSION: u8 = 2;
/// version + owner + tokens + expiry.
pub const LEASE_LEN: usize = 1 + 16 + 8 + 8;

/// Tokens a rate-limit service granted this proxy, spendable until the service's window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u128,
    pub tokens: u64,
    pub expires_ns: u64,
}

impl Lease {
    pub fn encode(&self) -> [u8; LEASE_LEN] {
        let mut out = [0u8; LEASE_LEN];
        let mut at = 0;
        for part in [
            &[LEASE_VERSION][..],
            &self.owner.to_le_bytes(),
            &self.tokens.to_le_bytes(),
            &self.expires_ns.to_le_bytes(),
        ] {
            if let Some(dst) = out.get_mut(at..at + part.len()) {
                dst.copy_from_slice(part);
            }
            at += part.len();
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        if bytes.len() != LEASE_LEN || bytes.first() != Some(&LEASE_VERSION) {
            return None;
        }
        Some(Lease {
            owner: u128::from_le_bytes(bytes.get(1..17)?.try_into().ok()?),
            tokens: u64::from_le_bytes(bytes.get(17..25)?.try_into().ok()?),
            expires_ns: u64::from_le_bytes(bytes.get(25..33)?.try_into().ok()?),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTake {
    /// `cost` tokens were taken from an unexpired lease.
    Taken {
        left: u64,
    },
    /// No lease, an expired one, or too few tokens: ask the service.
    Empty,
    StoreError,
}

/// Spends `cost` tokens of `owner`'s lease, if it has them.
pub fn lease_take(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    cost: u64,
    now_ns: u64,
    max: u32,
) -> LeaseTake {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (slot, lease, cas) = match locate(store, ns, owner, max, now_ns) {
            Err(GetError) => return LeaseTake::StoreError,
            Ok(Location::Own { slot, bytes, cas }) => match Lease::decode(&bytes) {
                Some(l) => (slot, l, cas),
                None => return LeaseTake::Empty,
            },
            Ok(_) => return LeaseTake::Empty,
        };
        if lease.expires_ns <= now_ns || lease.tokens < cost {
            return LeaseTake::Empty;
        }
        let left = lease.tokens - cost;
        match store.set(ns.slot_key(slot).as_str(), &Lease { tokens: left, ..lease }.encode(), cas) {
            Ok(()) => return LeaseTake::Taken { left },
            Err(SetError::CasMismatch) => {}
            Err(SetError::Failed) => return LeaseTake::StoreError,
        }
    }
    LeaseTake::StoreError
}

/// Adds tokens the service granted to `owner`'s lease. Tokens still unexpired are kept, and
/// the earlier expiry wins, so tokens of one window are never spent in the next (that would
/// admit more than the service granted). If the lease cannot be stored the tokens are
/// dropped: that can only under-admit.
pub fn lease_add(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    tokens: u64,
    expires_ns: u64,
    now_ns: u64,
    max: u32,
) -> bool {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (slot, lease, cas) = match locate(store, ns, owner, max, now_ns) {
            Err(GetError) | Ok(Location::Full) => return false,
            Ok(Location::Free { slot, cas }) => (slot, Lease { owner, tokens, expires_ns }, cas.unwrap_or(CREATE_CAS)),
            Ok(Location::Own { slot, bytes, cas }) => {
                let merged = match Lease::decode(&bytes) {
                    Some(old) if old.expires_ns > now_ns && old.tokens > 0 => Lease {
                        owner,
                        tokens: old.tokens.saturating_add(tokens),
                        expires_ns: old.expires_ns.min(expires_ns),
                    },
                    _ => Lease { owner, tokens, expires_ns },
                };
                (slot, merged, cas)
            }
        };
        match store.set(ns.slot_key(slot).as_str(), &lease.encode(), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => {}
            Err(SetError::Failed) => return false,
        }
    }
    false
}

enum Step {
    /// Decided; `true` if the record was written.
    Done(Verdict, bool),
    Retry,
    Failed,
}

/// Decides on the state that was read and, if admitted, swaps in the new state. A denial
/// writes nothing: the state is unchanged, so there is nothing to race on.
#[allow(clippy::too_many_arguments)]
fn write(
    store: &mut impl SharedStore,
    key: &str,
    owner: u128,
    limit: &Limit,
    state: (u128, bool),
    cas: u32,
    cost: u64,
    now_ns: u64,
) -> Step {
    let (t_full, rescaled) = state;
    let verdict = bucket::debit(limit, t_full, now_ns, cost);
    if !verdict.allowed && !rescaled {
        return Step::Done(verdict, false);
    }
    // A denial writes only to record a reconfiguration (the state carried over to the new
    // limit); otherwise it changes nothing, so there is nothing to race on.
    let record = Record { owner, limit: *limit, t_full: verdict.t_full };
    match store.set(key, &record.encode(), cas) {
        Ok(()) => Step::Done(verdict, verdict.allowed),
        Err(SetError::CasMismatch) => Step::Retry,
        Err(SetError::Failed) if !verdict.allowed => Step::Done(verdict, false),
        Err(SetError::Failed) => Step::Failed,
    }
}

/// An in-memory store with Envoy's semantics, for unit tests of this module and others.
#[cfg(test)]
pub mod fake {
    use super::{GetError, SetError, SharedStore};
    use std::collections::BTreeMap;

    #[derive(Default)]
    pub struct FakeStore {
        pub data: BTreeMap<String, (Vec<u8>, u32)>,
        pub next_cas: u32,
        /// Fail this many upcoming `set`s with `CasMismatch`.
        pub conflicts: u32,
        pub fail_sets: bool,
        pub fail_gets: bool,
        pub gets: u32,
    }

    impl FakeStore {
        fn bump(&mut self) -> u32 {
            self.next_cas = self.next_cas.wrapping_add(1).max(1);
            self.next_cas
        }
    }

    impl SharedStore for FakeStore {
        fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError> {
            self.gets += 1;
            if self.fail_gets {
                return Err(GetError);
            }
            Ok(self.data.get(key).cloned())
        }

        fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            if self.fail_sets {
                return Err(SetError::Failed);
            }
            if self.conflicts > 0 {
                self.conflicts -= 1;
                let c = self.bump();
                if let Some(entry) = self.data.get_mut(key) {
                    entry.1 = c;
                }
                return Err(SetError::CasMismatch);
            }
            let current = self.data.get(key).map(|e| e.1);
            if let Some(current) = current {
                if cas != 0 && cas != current {
                    return Err(SetError::CasMismatch);
                }
            }
            let c = self.bump();
            self.data.insert(key.to_string(), (value.to_vec(), c));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeStore;
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn lim(c: u64, r: f64) -> Limit {
        Limit::new(c, r).unwrap()
    }

    fn allowed(d: &Debit) -> bool {
        matches!(d.outcome, Outcome::Decided { verdict, .. } if verdict.allowed)
    }

    #[test]
    fn record_roundtrip_and_garbage() {
        let r = Record { owner: 42 << 100 | 7, limit: lim(5, 0.5), t_full: 123456789 };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(&[]), None);
        assert_eq!(Record::decode(&[9; RECORD_LEN]), None);
        assert_eq!(Record::decode(&r.encode()[..10]), None);
    }

    #[test]
    fn keys_are_namespaced_and_small() {
        let ns = Namespace::new("my-root");
        let k = ns.slot_key(4_294_967_295);
        assert!(k.as_str().starts_with("trl/"), "{}", k.as_str());
        assert!(k.as_str().ends_with("/4294967295"));
        assert_eq!(ns.slot_key(0).as_str().rsplit('/').next(), Some("0"));
        assert_ne!(Namespace::new("a").slot_key(1).as_str(), Namespace::new("b").slot_key(1).as_str());
        assert!(ns.named_key("overflow").as_str().ends_with("/overflow"));
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
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, owner, &l, 1, 0, T0, 100))).count();
        assert_eq!(n, 5);
        assert_eq!(s.data.len(), 1);
    }

    #[test]
    fn fast_path_is_one_get() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let owner = hash128(&[b"acme"]);
        debit(&mut s, &ns, owner, &lim(5, 1.0), 1, 0, T0, 1000);
        s.gets = 0;
        debit(&mut s, &ns, owner, &lim(5, 1.0), 1, 0, T0, 1000);
        assert_eq!(s.gets, 1);
    }

    #[test]
    fn cas_conflicts_are_retried_then_reported() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        s.conflicts = 3;
        let d = debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0, 10);
        assert!(allowed(&d));
        assert_eq!(d.cas_retries, 3);
        s.conflicts = MAX_CAS_ATTEMPTS;
        let d = debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0, 10);
        assert_eq!(d.outcome, Outcome::StoreError);
        assert_eq!(d.cas_retries, MAX_CAS_ATTEMPTS);
        s.conflicts = 0;
        s.fail_sets = true;
        assert_eq!(debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0, 10).outcome, Outcome::StoreError);
        s.fail_sets = false;
        s.fail_gets = true;
        assert_eq!(debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0, 10).outcome, Outcome::StoreError);
    }

    #[test]
    fn slot_table_is_bounded_and_reclaims_only_full_buckets() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(2, 1.0);
        let mut no_slot = 0;
        for i in 0..1000u32 {
            let d = debit(&mut s, &ns, hash128(&[&i.to_le_bytes()]), &l, 1, 0, T0, 16);
            if d.outcome == Outcome::NoSlot {
                no_slot += 1;
            }
        }
        assert!(s.data.len() <= 16);
        assert!(no_slot > 900);
        // After the buckets refilled, new owners reclaim slots.
        let d = debit(&mut s, &ns, hash128(&[b"late"]), &l, 1, 0, T0 + 10 * SEC, 16);
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
        let blocker = Record { owner: 99, limit: l, t_full: bucket::now_ticks(T0 + 1000 * SEC) };
        s.data.insert(ns.slot_key(c[0]).as_str().to_string(), (blocker.encode().to_vec(), 5));
        for _ in 0..3 {
            assert!(allowed(&debit(&mut s, &ns, owner, &l, 1, 0, T0, 1000)));
        }
        // The blocker refills; the owner must still find its own (empty) bucket, not a new one.
        let later = T0 + 2000 * SEC;
        let d = debit(&mut s, &ns, owner, &l, 1, 0, later, 1000);
        assert!(allowed(&d)); // two tokens refilled at 0.001/s over 2000 s
        assert!(allowed(&debit(&mut s, &ns, owner, &l, 1, 0, later, 1000)));
        assert!(!allowed(&debit(&mut s, &ns, owner, &l, 1, 0, later, 1000)));
    }

    #[test]
    fn a_denial_after_shrinking_records_the_clamped_debt() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let old = lim(10, 0.001);
        for _ in 0..7 {
            assert!(allowed(&debit(&mut s, &ns, 3, &old, 1, 0, T0, 10)));
        }
        let new = lim(5, 0.001); // one token per 1000 s
        assert!(!allowed(&debit(&mut s, &ns, 3, &new, 1, 0, T0, 10)));
        // The debt was clamped to 5 tokens and stored: the first token is due after 1000 s,
        // not after the 3000 s the unclamped debt of 7 would take.
        assert!(allowed(&debit(&mut s, &ns, 3, &new, 1, 0, T0 + 1000 * SEC, 10)));
    }

    #[test]
    fn named_bucket() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let key = ns.named_key("overflow");
        let first = debit_named(&mut s, key.as_str(), 7, &lim(3, 1.0), 1, T0);
        assert!(matches!(first.outcome, Outcome::Decided { slot: SlotUse::Created, .. }));
        let n = (0..9).filter(|_| allowed(&debit_named(&mut s, key.as_str(), 7, &lim(3, 1.0), 1, T0))).count();
        assert_eq!(n, 2);
    }

    #[test]
    fn leases_are_spent_until_empty_or_expired() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        assert_eq!(lease_take(&mut s, &ns, 9, 1, T0, 10), LeaseTake::Empty);
        assert!(lease_add(&mut s, &ns, 9, 3, T0 + SEC, T0, 10));
        assert_eq!(lease_take(&mut s, &ns, 9, 1, T0, 10), LeaseTake::Taken { left: 2 });
        assert_eq!(lease_take(&mut s, &ns, 9, 2, T0, 10), LeaseTake::Taken { left: 0 });
        assert_eq!(lease_take(&mut s, &ns, 9, 1, T0, 10), LeaseTake::Empty);
        // A second grant in the same window adds up; the earlier expiry wins.
        assert!(lease_add(&mut s, &ns, 9, 2, T0 + 5 * SEC, T0, 10));
        assert!(lease_add(&mut s, &ns, 9, 2, T0 + 9 * SEC, T0, 10));
        assert_eq!(Lease::decode(&s.data.values().next().unwrap().0).unwrap().expires_ns, T0 + 5 * SEC);
        assert_eq!(lease_take(&mut s, &ns, 9, 4, T0, 10), LeaseTake::Taken { left: 0 });
        // Expired tokens are never spent.
        assert!(lease_add(&mut s, &ns, 9, 5, T0 + SEC, T0, 10));
        assert_eq!(lease_take(&mut s, &ns, 9, 1, T0 + SEC, 10), LeaseTake::Empty);
    }

    #[test]
    fn leases_and_buckets_share_the_slot_table() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        // One slot: a live bucket blocks a lease; an expired lease is reclaimed by a bucket.
        assert!(allowed(&debit(&mut s, &ns, 1, &lim(5, 0.001), 1, 0, T0, 1)));
        assert!(!lease_add(&mut s, &ns, 2, 3, T0 + SEC, T0, 1));
        let mut s = FakeStore::default();
        assert!(lease_add(&mut s, &ns, 2, 3, T0 + SEC, T0, 1));
        assert_eq!(debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0, 1).outcome, Outcome::NoSlot);
        let d = debit(&mut s, &ns, 1, &lim(5, 1.0), 1, 0, T0 + 2 * SEC, 1);
        assert!(matches!(d.outcome, Outcome::Decided { slot: SlotUse::Reclaimed, .. }));
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
                if allowed(&debit(&mut s, &ns, 5, &l, 1, 0, T0, 64)) { n += 1; }
            }
            prop_assert!(n <= cap);
        }
    }
}
