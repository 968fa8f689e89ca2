//! Buckets in Envoy shared data: the record codec, the bounded slot table and the
//! compare-and-swap debit loop. The host is reached through [`SharedStore`] so the same
//! loop runs against Envoy, the wasm test host, and the in-memory fake in the tests below.
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
/// The longest key: a reserved key, `r` + 32 hex digits after the prefix.
const KEY_CAP: usize = NS_LEN + 33;
const HEX: &[u8; 16] = b"0123456789abcdef";

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
            set(&mut prefix, &mut at, HEX.get(nibble as usize).copied().unwrap_or(b'0'));
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

    /// The reserved key of `owner` (a listed tenant or one of its per-rule buckets):
    /// `r` + the owner hash in hex. The owner hash comes from the tenant's (and rule's) name,
    /// not from its position in the config, so a config push that reorders tenants keeps
    /// the tokens they spent.
    pub fn reserved_key(&self, owner: u128) -> Key {
        let mut key = Key { buf: [0; KEY_CAP], len: 0 };
        key.push(&self.prefix);
        key.push(b"r");
        for shift in (0..32).rev() {
            let nibble = (owner >> (shift * 4)) as usize & 0xf;
            key.push(HEX.get(nibble..=nibble).unwrap_or(b"0"));
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
type Skipped = [Option<(u32, Vec<u8>, u32)>; CANDIDATES];

/// Where an owner's record is, or may be created.
enum Location {
    Own { slot: u32, bytes: Vec<u8>, cas: u32 },
    Free { slot: u32, cas: Option<u32>, skipped: Skipped },
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
    let mut free: Option<(u32, Option<u32>)> = None;
    let mut skipped: Skipped = Default::default();
    for (i, &slot) in slots.get(..n).unwrap_or(&[]).iter().enumerate() {
        match store.get(ns.slot_key(slot).as_str())? {
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

/// Debits `cost` tokens from `owner`'s bucket, in the slot table or its reserved key. With
/// `grab > 0` it also takes `grab` extra tokens for a worker-local lease, but only if the
/// bucket is still at least half full afterwards (so leases never compete for a scarce bucket).
#[allow(clippy::too_many_arguments)]
pub fn debit(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    home: Home,
    limit: &Limit,
    cost: u64,
    grab: u64,
    now_ns: u64,
) -> Debit {
    match home {
        Home::Slots(max_tenants) => debit_slots(store, ns, owner, limit, cost, grab, now_ns, max_tenants),
        Home::Reserved(max_tenants) => debit_reserved(store, ns, owner, limit, cost, grab, now_ns, max_tenants),
    }
}

/// The lease tokens to take along with a debit of `cost` from state `t_full`.
fn lease_grant(limit: &Limit, t_full: u128, now_ns: u64, cost: u64, grab: u64) -> u64 {
    if grab == 0 {
        return 0;
    }
    let with_lease = bucket::debit(limit, t_full, now_ns, cost.saturating_add(grab));
    if with_lease.allowed && with_lease.remaining.saturating_mul(2) >= limit.capacity {
        grab
    } else {
        0
    }
}

#[allow(clippy::too_many_arguments)]
fn debit_slots(
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
    // A key created by an attempt that was then folded into another slot still exists.
    let mut created = false;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let location = match locate(store, ns, owner, max_tenants, now_ns) {
            Ok(l) => l,
            Err(GetError) => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
        };
        let (slot, state, cas, use_, skipped) = match location {
            Location::Own { slot, bytes, cas } => {
                (slot, stored_state(&bytes, owner, limit, now_ns), cas, SlotUse::Existing, None)
            }
            Location::Free { slot, cas: None, skipped } => {
                (slot, (0, false), CREATE_CAS, SlotUse::Created, Some(skipped))
            }
            Location::Free { slot, cas: Some(cas), skipped } => {
                (slot, (0, false), cas, SlotUse::Reclaimed, Some(skipped))
            }
            Location::Full => return Debit { outcome: Outcome::NoSlot, cas_retries, granted: 0 },
        };
        let granted = lease_grant(limit, state.0, now_ns, cost, grab);
        match write(store, ns.slot_key(slot).as_str(), owner, limit, state, cas, cost + granted, now_ns) {
            Step::Done(verdict, wrote) => {
                created |= wrote && use_ == SlotUse::Created;
                if let (true, Some(skipped)) = (wrote, skipped) {
                    if pin(store, ns, owner, slot, verdict.t_full, skipped, now_ns) == Pinned::Duplicate {
                        // Our bucket was a second one and is folded away: decide again
                        // against the owner's first bucket.
                        cas_retries += 1;
                        continue;
                    }
                }
                // A denial on a free slot wrote nothing, so it neither created nor reclaimed.
                let slot = if created {
                    SlotUse::Created
                } else if wrote || use_ == SlotUse::Existing {
                    use_
                } else {
                    SlotUse::Untouched
                };
                return Debit { outcome: Outcome::Decided { verdict, slot }, cas_retries, granted };
            }
            Step::Retry => cas_retries += 1,
            Step::Failed => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
        }
    }
    Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 }
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
    written: u128,
    skipped: Skipped,
    now_ns: u64,
) -> Pinned {
    for (slot, mut bytes, mut cas) in skipped.into_iter().flatten() {
        let key = ns.slot_key(slot);
        for _ in 0..MAX_CAS_ATTEMPTS {
            match store.set(key.as_str(), &bytes, cas) {
                Ok(()) => break,
                // The host fails: keep the decision (the race needs a failing host too).
                Err(SetError::Failed) => return Pinned::Alone,
                Err(SetError::CasMismatch) => {}
            }
            match store.get(key.as_str()) {
                Ok(Some((now_bytes, now_cas))) => {
                    if matches!(Record::decode(&now_bytes), Some(r) if r.owner == owner) {
                        fold(store, ns, owner, mine, written, slot, now_ns);
                        return Pinned::Duplicate;
                    }
                    // Someone else's write (its owner's debit, a reclaim by a third owner):
                    // pin what is there now.
                    bytes = now_bytes;
                    cas = now_cas;
                }
                _ => return Pinned::Alone,
            }
        }
    }
    Pinned::Alone
}

/// Folds `owner`'s bucket in slot `mine` (which we wrote with state `written`) into its bucket
/// in the earlier slot `first`: what other workers debited from `mine` since our write moves
/// to `first` before `mine` is freed, so no token is lost (moving first and freeing after
/// can only count a debit twice, which under-admits). Our own debit is dropped with `mine`:
/// the caller decides the request again against `first`.
fn fold(store: &mut impl SharedStore, ns: &Namespace, owner: u128, mine: u32, written: u128, first: u32, now_ns: u64) {
    let key = ns.slot_key(mine);
    let mut moved: u128 = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Ok(Some((bytes, cas))) = store.get(key.as_str()) else { return };
        let Some(record) = Record::decode(&bytes).filter(|r| r.owner == owner) else { return };
        let extra = record.t_full.saturating_sub(written).saturating_sub(moved);
        if extra > 0 {
            if !add_debt(store, ns.slot_key(first).as_str(), owner, extra, now_ns) {
                return;
            }
            moved += extra;
        }
        // A full bucket: free for any owner to reclaim, and worth nothing to this one.
        let freed = Record { t_full: 0, ..record };
        match store.set(key.as_str(), &freed.encode(), cas) {
            Ok(()) | Err(SetError::Failed) => return,
            Err(SetError::CasMismatch) => {}
        }
    }
}

/// Adds `ticks` of debt to `owner`'s bucket under `key`; false if it is not there.
fn add_debt(store: &mut impl SharedStore, key: &str, owner: u128, ticks: u128, now_ns: u64) -> bool {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Ok(Some((bytes, cas))) = store.get(key) else { return false };
        let Some(record) = Record::decode(&bytes).filter(|r| r.owner == owner) else { return false };
        let t_full = record.t_full.max(bucket::now_ticks(now_ns)).saturating_add(ticks);
        match store.set(key, &Record { t_full, ..record }.encode(), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => {}
            Err(SetError::Failed) => return false,
        }
    }
    false
}

/// Debits `owner`'s reserved key, creating it on first use.
#[allow(clippy::too_many_arguments)]
fn debit_reserved(
    store: &mut impl SharedStore,
    ns: &Namespace,
    owner: u128,
    limit: &Limit,
    cost: u64,
    grab: u64,
    now_ns: u64,
    max_tenants: u32,
) -> Debit {
    let key = ns.reserved_key(owner);
    let mut cas_retries = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (state, cas, creating) = match store.get(key.as_str()) {
            Err(GetError) => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
            Ok(Some((bytes, cas))) => (stored_state(&bytes, owner, limit, now_ns), cas, false),
            Ok(None) => {
                // Start from the owner's bucket in the slot table, if it has one. The state is
                // written even on a denial (`true`), so this lookup happens once per owner.
                let carried = match locate(store, ns, owner, max_tenants, now_ns) {
                    Ok(Location::Own { bytes, .. }) => stored_state(&bytes, owner, limit, now_ns).0,
                    Ok(_) => 0,
                    Err(GetError) => return Debit { outcome: Outcome::StoreError, cas_retries, granted: 0 },
                };
                ((carried, true), CREATE_CAS, true)
            }
        };
        let granted = lease_grant(limit, state.0, now_ns, cost, grab);
        match write(store, key.as_str(), owner, limit, state, cas, cost + granted, now_ns) {
            Step::Done(verdict, wrote) => {
                let slot = match (creating, wrote) {
                    (true, true) => SlotUse::Created,
                    (true, false) => SlotUse::Untouched,
                    (false, _) => SlotUse::Existing,
                };
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
    home: Home,
    limit: &Limit,
    tokens: u64,
    now_ns: u64,
) -> bool {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let found = match home {
            Home::Reserved(_) => {
                let key = ns.reserved_key(owner);
                match store.get(key.as_str()) {
                    Ok(Some((bytes, cas))) => Some((key, bytes, cas)),
                    _ => None,
                }
            }
            Home::Slots(max_tenants) => match locate(store, ns, owner, max_tenants, now_ns) {
                Ok(Location::Own { slot, bytes, cas }) => Some((ns.slot_key(slot), bytes, cas)),
                _ => None,
            },
        };
        let Some((key, bytes, cas)) = found else { return false };
        let record = match Record::decode(&bytes) {
            Some(r) if r.owner == owner && r.limit == *limit => r,
            _ => return false,
        };
        let back = limit.interval.saturating_mul(u128::from(tokens));
        let t_full = record.t_full.saturating_sub(back).max(bucket::now_ticks(now_ns));
        if t_full >= record.t_full {
            return true; // already full: nothing to give back
        }
        match store.set(key.as_str(), &Record { t_full, ..record }.encode(), cas) {
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
            Ok(Location::Free { slot, cas, .. }) => {
                (slot, Lease { owner, tokens, expires_ns }, cas.unwrap_or(CREATE_CAS))
            }
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
        Ok(()) => Step::Done(verdict, true),
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
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, owner, Home::Slots(100), &l, 1, 0, T0))).count();
        assert_eq!(n, 5);
        assert_eq!(s.data.len(), 1);
    }

    #[test]
    fn fast_path_is_one_get() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let owner = hash128(&[b"acme"]);
        debit(&mut s, &ns, owner, Home::Slots(1000), &lim(5, 1.0), 1, 0, T0);
        s.gets = 0;
        debit(&mut s, &ns, owner, Home::Slots(1000), &lim(5, 1.0), 1, 0, T0);
        assert_eq!(s.gets, 1);
    }

    #[test]
    fn cas_conflicts_are_retried_then_reported() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        s.conflicts = 3;
        let d = debit(&mut s, &ns, 1, Home::Slots(10), &lim(5, 1.0), 1, 0, T0);
        assert!(allowed(&d));
        assert_eq!(d.cas_retries, 3);
        s.conflicts = MAX_CAS_ATTEMPTS;
        let d = debit(&mut s, &ns, 1, Home::Slots(10), &lim(5, 1.0), 1, 0, T0);
        assert_eq!(d.outcome, Outcome::StoreError);
        assert_eq!(d.cas_retries, MAX_CAS_ATTEMPTS);
        s.conflicts = 0;
        s.fail_sets = true;
        assert_eq!(debit(&mut s, &ns, 1, Home::Slots(10), &lim(5, 1.0), 1, 0, T0).outcome, Outcome::StoreError);
        s.fail_sets = false;
        s.fail_gets = true;
        assert_eq!(debit(&mut s, &ns, 1, Home::Slots(10), &lim(5, 1.0), 1, 0, T0).outcome, Outcome::StoreError);
    }

    #[test]
    fn slot_table_is_bounded_and_reclaims_only_full_buckets() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(2, 1.0);
        let mut no_slot = 0;
        for i in 0..1000u32 {
            let d = debit(&mut s, &ns, hash128(&[&i.to_le_bytes()]), Home::Slots(16), &l, 1, 0, T0);
            if d.outcome == Outcome::NoSlot {
                no_slot += 1;
            }
        }
        assert!(s.data.len() <= 16);
        assert!(no_slot > 900);
        // After the buckets refilled, new owners reclaim slots.
        let d = debit(&mut s, &ns, hash128(&[b"late"]), Home::Slots(16), &l, 1, 0, T0 + 10 * SEC);
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
            assert!(allowed(&debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, T0)));
        }
        // The blocker refills; the owner must still find its own (empty) bucket, not a new one.
        let later = T0 + 2000 * SEC;
        let d = debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, later);
        assert!(allowed(&d)); // two tokens refilled at 0.001/s over 2000 s
        assert!(allowed(&debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, later)));
        assert!(!allowed(&debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, later)));
    }

    #[test]
    fn a_denial_after_shrinking_records_the_clamped_debt() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let old = lim(10, 0.001);
        for _ in 0..7 {
            assert!(allowed(&debit(&mut s, &ns, 3, Home::Slots(10), &old, 1, 0, T0)));
        }
        let new = lim(5, 0.001); // one token per 1000 s
        assert!(!allowed(&debit(&mut s, &ns, 3, Home::Slots(10), &new, 1, 0, T0)));
        // The debt was clamped to 5 tokens and stored: the first token is due after 1000 s,
        // not after the 3000 s the unclamped debt of 7 would take.
        assert!(allowed(&debit(&mut s, &ns, 3, Home::Slots(10), &new, 1, 0, T0 + 1000 * SEC)));
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
        assert!(allowed(&debit(&mut s, &ns, 1, Home::Slots(1), &lim(5, 0.001), 1, 0, T0)));
        assert!(!lease_add(&mut s, &ns, 2, 3, T0 + SEC, T0, 1));
        let mut s = FakeStore::default();
        assert!(lease_add(&mut s, &ns, 2, 3, T0 + SEC, T0, 1));
        assert_eq!(debit(&mut s, &ns, 1, Home::Slots(1), &lim(5, 1.0), 1, 0, T0).outcome, Outcome::NoSlot);
        let d = debit(&mut s, &ns, 1, Home::Slots(1), &lim(5, 1.0), 1, 0, T0 + 2 * SEC);
        assert!(matches!(d.outcome, Outcome::Decided { slot: SlotUse::Reclaimed, .. }));
    }

    #[test]
    fn reserved_keys_are_namespaced_and_stable() {
        let ns = Namespace::new("my-root");
        let k = ns.reserved_key(u128::MAX);
        assert_eq!(k.as_str(), format!("{}r{}", ns.named_key("").as_str(), "f".repeat(32)));
        assert!(ns.reserved_key(0x1234).as_str().ends_with("/r00000000000000000000000000001234"));
    }

    #[test]
    fn reserved_bucket_is_exact_whatever_fills_the_slot_table() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let junk = lim(5, 0.001);
        // Junk owners fill every slot with live buckets.
        for i in 0..500u32 {
            debit(&mut s, &ns, hash128(&[&i.to_le_bytes()]), Home::Slots(8), &junk, 1, 0, T0);
        }
        let vip = hash128(&[b"vip"]);
        assert_eq!(debit(&mut s, &ns, vip, Home::Slots(8), &junk, 1, 0, T0).outcome, Outcome::NoSlot);
        let l = lim(10, 0.001);
        let first = debit(&mut s, &ns, vip, Home::Reserved(8), &l, 1, 0, T0);
        assert!(matches!(first.outcome, Outcome::Decided { slot: SlotUse::Created, .. }), "{first:?}");
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, vip, Home::Reserved(8), &l, 1, 0, T0))).count();
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
            assert!(allowed(&debit(&mut s, &ns, 7, Home::Slots(100), &l, 1, 0, T0)));
        }
        assert!(allowed(&debit(&mut s, &ns, 7, Home::Reserved(100), &l, 1, 0, T0)));
        assert!(!allowed(&debit(&mut s, &ns, 7, Home::Reserved(100), &l, 1, 0, T0)));
        // A denial on a new reserved key stores the carried state too, so the slot table is
        // read once per owner.
        let mut s = FakeStore::default();
        for _ in 0..5 {
            debit(&mut s, &ns, 8, Home::Slots(100), &l, 1, 0, T0);
        }
        let d = debit(&mut s, &ns, 8, Home::Reserved(100), &l, 1, 0, T0);
        assert!(matches!(d.outcome, Outcome::Decided { verdict, slot: SlotUse::Created } if !verdict.allowed));
        s.gets = 0;
        assert!(!allowed(&debit(&mut s, &ns, 8, Home::Reserved(100), &l, 1, 0, T0)));
        assert_eq!(s.gets, 1);
    }

    #[test]
    fn give_back_reaches_reserved_buckets() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let l = lim(10, 0.001);
        let d = debit(&mut s, &ns, 9, Home::Reserved(4), &l, 1, 4, T0);
        assert_eq!(d.granted, 4);
        assert!(give_back(&mut s, &ns, 9, Home::Reserved(4), &l, 4, T0));
        let n = (0..20).filter(|_| allowed(&debit(&mut s, &ns, 9, Home::Reserved(4), &l, 1, 0, T0))).count();
        assert_eq!(n, 9);
        // A slot-table give-back never touches the reserved key.
        assert!(!give_back(&mut s, &ns, 9, Home::Slots(4), &l, 4, T0));
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
        let blocker = Record { owner: 99, limit: l, t_full: bucket::now_ticks(t_star) };
        inner.data.insert(ns.slot_key(c[0]).as_str().to_string(), (blocker.encode().to_vec(), 5));
        inner.next_cas = 5;
        let mut b_allowed = false;
        let mut s = Racing {
            inner,
            trigger: ns.slot_key(c[1]).as_str().to_string(),
            other: Some(|st: &mut FakeStore| {
                b_allowed = allowed(&debit(st, &ns, owner, Home::Slots(1000), &l, 1, 0, t_star));
            }),
        };
        let a = debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, t_star - 1);
        let mut s = s.inner;
        assert!(b_allowed);
        let mut admitted = u32::from(allowed(&a)) + 1;
        for _ in 0..5 {
            admitted += u32::from(allowed(&debit(&mut s, &ns, owner, Home::Slots(1000), &l, 1, 0, t_star)));
        }
        assert_eq!(admitted, 2, "one bucket of capacity 2");
        // c1 was freed: any owner may take it.
        let c1 = Record::decode(&s.data[ns.slot_key(c[1]).as_str()].0).unwrap();
        assert!(bucket::is_full(c1.t_full, t_star));
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
                if allowed(&debit(&mut s, &ns, 5, Home::Slots(64), &l, 1, 0, T0)) { n += 1; }
            }
            prop_assert!(n <= cap);
        }
    }
}
