//! What shared data holds, byte for byte: a bucket [`Record`] or a service [`Grant`], both
//! written and read by the one codec here ([`Writer`], [`Reader`]); the owner hash; the key
//! names of one plugin.

use crate::bucket::{Limit, Limits, States, MAX_LIMITS};

/// Layout of a one-limit bucket record (the layout before several limits existed, kept so a
/// one-limit policy's record is byte for byte what earlier versions read and write).
pub const RECORD_VERSION: u8 = 1;
/// version + owner + capacity + interval + t_full.
pub const RECORD_LEN: usize = 1 + 16 + 8 + 16 + 16;
/// Layout of a record of several limits (2 is the grant's).
pub const LIMITS_VERSION: u8 = 3;
/// One limit in a several-limits record: id + capacity + interval + t_full.
pub const LIMIT_LEN: usize = 8 + 8 + 16 + 16;
/// version + owner + count, then the limits.
const LIMITS_HEAD: usize = 1 + 16 + 1;
/// The largest record: [`MAX_LIMITS`] limits.
pub const MAX_RECORD_LEN: usize = LIMITS_HEAD + MAX_LIMITS * LIMIT_LEN;
/// Layout version of a service grant.
pub const GRANT_VERSION: u8 = 2;
/// version + owner + tokens + expiry.
pub const GRANT_LEN: usize = 1 + 16 + 8 + 8;

/// One bucket owner's limits as stored: all of them in one record, so one compare-and-swap
/// decides them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub owner: u128,
    /// The limits the states were written under, so a reconfiguration can carry them over.
    pub limits: Limits,
    /// `t_full` of each limit, same order.
    pub t_full: States,
}

/// An encoded record, on the stack.
pub struct Encoded {
    buf: [u8; MAX_RECORD_LEN],
    len: usize,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl Record {
    /// One limit: the old layout (its id is not stored: a one-limit record's state belongs to
    /// the first limit of whatever policy reads it). Several: version 3, with the count and
    /// each limit's id.
    pub fn encode(&self) -> Encoded {
        let mut buf = [0u8; MAX_RECORD_LEN];
        let mut w = Writer { out: &mut buf, at: 0 };
        let several = self.limits.len() > 1;
        w.put(&[if several { LIMITS_VERSION } else { RECORD_VERSION }]);
        w.put(&self.owner.to_le_bytes());
        if several {
            w.put(&[self.limits.len() as u8]);
        }
        for ((id, limit), t_full) in self.limits.ids().iter().zip(self.limits.iter()).zip(self.t_full.iter()) {
            if several {
                w.put(&id.to_le_bytes());
            }
            w.put(&limit.capacity.to_le_bytes());
            w.put(&limit.interval.to_le_bytes());
            w.put(&t_full.to_le_bytes());
        }
        let len = w.at;
        Encoded { buf, len }
    }

    /// `None` for anything that is not a bucket record (foreign, truncated, empty, a grant).
    /// A one-limit record reads with id 0.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let several = *bytes.first()? == LIMITS_VERSION;
        let (version, n) =
            if several { (LIMITS_VERSION, usize::from(*bytes.get(LIMITS_HEAD - 1)?)) } else { (RECORD_VERSION, 1) };
        if !(1..=MAX_LIMITS).contains(&n) {
            return None;
        }
        let len = if several { LIMITS_HEAD + n * LIMIT_LEN } else { RECORD_LEN };
        let mut r = Reader::new(bytes, version, len)?;
        let owner = u128::from_le_bytes(r.take()?);
        if several {
            r.take::<1>()?;
        }
        let mut limits = Limits::default();
        let mut states = [0; MAX_LIMITS];
        for state in states.iter_mut().take(n) {
            let id = if several { u64::from_le_bytes(r.take()?) } else { 0 };
            let capacity = u64::from_le_bytes(r.take()?);
            let interval = u128::from_le_bytes(r.take()?);
            *state = u128::from_le_bytes(r.take()?);
            if capacity == 0 || interval == 0 {
                return None;
            }
            limits.push(id, Limit { capacity, interval });
        }
        Some(Record { owner, limits, t_full: states })
    }

    /// Whether every limit is full again (the record is then worth nothing to its owner).
    pub fn is_full(&self, now_ns: u64) -> bool {
        self.t_full.iter().take(self.limits.len()).all(|t| crate::bucket::is_full(*t, now_ns))
    }

    /// The stored states carried over to `limits` at `now_ns`: a limit found by id (or, in a
    /// one-limit record, the first limit) keeps the tokens it spent, clamped to its new
    /// capacity ([`crate::bucket::rescale`]); a limit the record does not have starts full;
    /// a stored limit no longer configured is dropped.
    pub fn carried(&self, limits: &Limits, now_ns: u64) -> States {
        let mut out = [0; MAX_LIMITS];
        let single = self.limits.len() == 1;
        for (i, ((o, id), new)) in out.iter_mut().zip(limits.ids()).zip(limits.iter()).enumerate() {
            let j =
                if single { Some(0).filter(|_| i == 0) } else { self.limits.ids().iter().position(|old| old == id) };
            if let Some((old, t_full)) = j.and_then(|j| Some((self.limits.iter().nth(j)?, *self.t_full.get(j)?))) {
                *o = crate::bucket::rescale(t_full, now_ns, old, new);
            }
        }
        out
    }
}

/// Tokens a rate-limit service granted this proxy (`lease_tokens`), spendable until the
/// service's window ends. Kept in the slot table, next to the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub owner: u128,
    pub tokens: u64,
    pub expires_ns: u64,
}

impl Grant {
    pub fn encode(&self) -> [u8; GRANT_LEN] {
        let mut out = [0u8; GRANT_LEN];
        let mut w = Writer { out: &mut out, at: 0 };
        w.put(&[GRANT_VERSION]);
        w.put(&self.owner.to_le_bytes());
        w.put(&self.tokens.to_le_bytes());
        w.put(&self.expires_ns.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Grant> {
        let mut r = Reader::new(bytes, GRANT_VERSION, GRANT_LEN)?;
        Some(Grant {
            owner: u128::from_le_bytes(r.take()?),
            tokens: u64::from_le_bytes(r.take()?),
            expires_ns: u64::from_le_bytes(r.take()?),
        })
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
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

/// Reads the fields after the version byte, in order.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// `None` unless `bytes` is exactly `len` long and starts with `version`.
    fn new(bytes: &'a [u8], version: u8, len: usize) -> Option<Reader<'a>> {
        (bytes.len() == len && bytes.first() == Some(&version)).then_some(Reader { bytes, at: 1 })
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let field = self.bytes.get(self.at..self.at + N)?.try_into().ok()?;
        self.at += N;
        Some(field)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_garbage() {
        let r = Record {
            owner: 42 << 100 | 7,
            limits: Limits::one(0, Limit::new(5, 0.5).unwrap()),
            t_full: [123456789, 0, 0, 0],
        };
        assert_eq!(r.encode().as_bytes().len(), RECORD_LEN);
        assert_eq!(Record::decode(r.encode().as_bytes()), Some(r));
        assert_eq!(Record::decode(&[]), None);
        assert_eq!(Record::decode(&[9; RECORD_LEN]), None);
        assert_eq!(Record::decode(&r.encode().as_bytes()[..10]), None);
        let g = Grant { owner: u128::MAX - 3, tokens: 7, expires_ns: 99 };
        assert_eq!(Grant::decode(&g.encode()), Some(g));
        assert_eq!(Grant::decode(r.encode().as_bytes()), None);
        assert_eq!(Record::decode(&g.encode()), None);
        assert_eq!(Grant::decode(&g.encode()[..GRANT_LEN - 1]), None);
    }

    fn several(specs: &[(u64, u64)]) -> Limits {
        let mut out = Limits::default();
        for (id, capacity) in specs {
            out.push(*id, Limit::new(*capacity, 1.0).unwrap());
        }
        out
    }

    #[test]
    fn a_record_of_several_limits_roundtrips_and_rejects_garbage() {
        let r = Record { owner: 7, limits: several(&[(11, 5), (22, 60), (33, 3600)]), t_full: [1, 2, 3, 0] };
        let bytes = r.encode();
        assert_eq!(bytes.as_bytes().len(), 18 + 3 * LIMIT_LEN);
        assert_eq!(bytes.as_bytes()[0], LIMITS_VERSION);
        assert_eq!(Record::decode(bytes.as_bytes()), Some(r));
        let full = Record { owner: 7, limits: several(&[(1, 1), (2, 2), (3, 3), (4, 4)]), t_full: [9; MAX_LIMITS] };
        assert_eq!(full.encode().as_bytes().len(), MAX_RECORD_LEN);
        assert_eq!(Record::decode(full.encode().as_bytes()), Some(full));
        // Truncated, a count that does not match the length, too many limits, a zero capacity.
        let b = bytes.as_bytes();
        assert_eq!(Record::decode(&b[..b.len() - 1]), None);
        let mut wrong = b.to_vec();
        wrong[17] = 2;
        assert_eq!(Record::decode(&wrong), None);
        wrong[17] = 5;
        assert_eq!(Record::decode(&wrong), None);
        let mut zero = b.to_vec();
        zero[18 + 8..18 + 16].fill(0);
        assert_eq!(Record::decode(&zero), None);
        assert_eq!(Grant::decode(b), None);
    }

    #[test]
    fn stored_states_follow_their_limit_by_id() {
        const SEC: u64 = 1_000_000_000;
        let now = 1_700_000_000 * SEC;
        let t = crate::bucket::now_ticks(now);
        let interval = Limit::new(1, 1.0).unwrap().interval;
        // burst (id 1) owes 2 tokens, hourly (id 2) owes 7.
        let old = Record {
            owner: 1,
            limits: several(&[(1, 10), (2, 100)]),
            t_full: [t + 2 * interval, t + 7 * interval, 0, 0],
        };
        // Reordered, one removed (1), one added (3): 2 keeps its debt, 3 starts full.
        let new = several(&[(3, 50), (2, 100)]);
        assert_eq!(old.carried(&new, now), [0, t + 7 * interval, 0, 0]);
        // Shrunk below the debt: clamped to the new capacity, as `rescale`.
        assert_eq!(old.carried(&several(&[(2, 5)]), now)[0], t + 5 * interval);
        // A one-limit record (the old layout) carries into the first limit, whatever its id.
        let v1 = Record::decode(
            Record {
                owner: 1,
                limits: Limits::one(0, Limit::new(10, 1.0).unwrap()),
                t_full: [t + 4 * interval, 0, 0, 0],
            }
            .encode()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(v1.carried(&several(&[(8, 10), (9, 1000)]), now), [t + 4 * interval, 0, 0, 0]);
        assert!(!old.is_full(now));
        assert!(old.is_full(now + 10 * SEC));
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
    fn reserved_keys_are_namespaced_and_stable() {
        let ns = Namespace::new("my-root");
        let k = ns.reserved_key(u128::MAX);
        assert_eq!(k.as_str(), format!("{}r{}", ns.named_key("").as_str(), "f".repeat(32)));
        assert!(ns.reserved_key(0x1234).as_str().ends_with("/r00000000000000000000000000001234"));
    }
}
