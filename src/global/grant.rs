//! Service grants (`lease_tokens`): tokens the rate-limit service granted this proxy, kept in
//! shared data and spent by every worker until the service's window ends. A listed tenant's
//! grant has a key of its own (as its buckets do), so no flood of unknown tenant ids can push
//! it out; other tenants' grants live in the slot table next to the buckets. The record is
//! [`Grant`]; each change is one read-decide-write through [`retry`].

use crate::store::record::{hash128, Grant, Key};
use crate::store::{retry, swap, Attempt, GetError, Location, SharedStore, SlotTable, CREATE_CAS};
use crate::tenant::TenantId;

const GRANT_SEPARATOR: &[u8] = b"\0lease";

/// The owner id of a tenant's grant (never equal to a bucket's owner id).
pub fn owner(tenant: &TenantId) -> u128 {
    hash128(&[tenant.as_bytes(), GRANT_SEPARATOR])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// `cost` tokens were taken from an unexpired grant.
    Taken {
        left: u64,
    },
    /// No grant, an expired one, or too few tokens: ask the service.
    Empty,
    StoreError,
}

/// Where `owner`'s grant is kept: the key, the grant stored there (if it is this owner's)
/// and the cas to write with. `None`: every candidate slot holds someone else's live state.
fn place(
    store: &mut impl SharedStore,
    table: SlotTable,
    owner: u128,
    reserved: bool,
    now_ns: u64,
) -> Result<Option<(Key, Option<Grant>, u32)>, GetError> {
    let own = |bytes: &[u8]| Grant::decode(bytes).filter(|g| g.owner == owner);
    if reserved {
        let key = table.ns.reserved_key(owner);
        return Ok(Some(match store.get(key.as_str())? {
            Some((bytes, cas)) => (key, own(&bytes), cas),
            None => (key, None, CREATE_CAS),
        }));
    }
    Ok(match table.locate(store, owner, now_ns)? {
        Location::Own { slot, bytes, cas } => Some((table.ns.slot_key(slot), own(&bytes), cas)),
        Location::Free { slot, cas, .. } => Some((table.ns.slot_key(slot), None, cas.unwrap_or(CREATE_CAS))),
        Location::Full => None,
    })
}

/// Spends `cost` tokens of `owner`'s grant, if it has them (`reserved`: a listed tenant's).
pub fn take(
    store: &mut impl SharedStore,
    table: SlotTable,
    owner: u128,
    reserved: bool,
    cost: u64,
    now_ns: u64,
) -> Take {
    let taken = retry(&mut 0, || {
        let (key, grant, cas) = match place(store, table, owner, reserved, now_ns) {
            Err(GetError) => return Attempt::Failed,
            Ok(Some((key, Some(grant), cas))) => (key, grant, cas),
            Ok(_) => return Attempt::Done(Take::Empty),
        };
        if grant.expires_ns <= now_ns || grant.tokens < cost {
            return Attempt::Done(Take::Empty);
        }
        let left = grant.tokens - cost;
        match swap(store, key.as_str(), &Grant { tokens: left, ..grant }.encode(), cas) {
            Attempt::Done(()) => Attempt::Done(Take::Taken { left }),
            Attempt::Conflict => Attempt::Conflict,
            Attempt::Failed => Attempt::Failed,
        }
    });
    taken.unwrap_or(Take::StoreError)
}

/// Adds tokens the service granted to `owner`'s grant. Tokens still unexpired are kept, and
/// the earlier expiry wins, so tokens of one window are never spent in the next (that would
/// admit more than the service granted). If the grant cannot be stored the tokens are
/// dropped: that can only under-admit.
pub fn add(store: &mut impl SharedStore, table: SlotTable, reserved: bool, new: Grant, now_ns: u64) -> bool {
    let Grant { owner, tokens, expires_ns } = new;
    retry(&mut 0, || {
        let (key, old, cas) = match place(store, table, owner, reserved, now_ns) {
            Err(GetError) | Ok(None) => return Attempt::Failed,
            Ok(Some(found)) => found,
        };
        let grant = match old {
            Some(old) if old.expires_ns > now_ns && old.tokens > 0 => {
                Grant { owner, tokens: old.tokens.saturating_add(tokens), expires_ns: old.expires_ns.min(expires_ns) }
            }
            _ => Grant { owner, tokens, expires_ns },
        };
        swap(store, key.as_str(), &grant.encode(), cas)
    })
    .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{Limit, Limits};
    use crate::store::fake::FakeStore;
    use crate::store::record::Namespace;
    use crate::store::slots::{debit, Home, Outcome, SlotUse, Withdrawal};

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    #[test]
    fn grants_are_spent_until_empty_or_expired() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 1, T0), Take::Empty);
        assert!(add(
            &mut s,
            SlotTable { ns: &ns, slots: 10 },
            false,
            Grant { owner: 9, tokens: 3, expires_ns: T0 + SEC },
            T0
        ));
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 1, T0), Take::Taken { left: 2 });
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 2, T0), Take::Taken { left: 0 });
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 1, T0), Take::Empty);
        // A second grant in the same window adds up; the earlier expiry wins.
        assert!(add(
            &mut s,
            SlotTable { ns: &ns, slots: 10 },
            false,
            Grant { owner: 9, tokens: 2, expires_ns: T0 + 5 * SEC },
            T0
        ));
        assert!(add(
            &mut s,
            SlotTable { ns: &ns, slots: 10 },
            false,
            Grant { owner: 9, tokens: 2, expires_ns: T0 + 9 * SEC },
            T0
        ));
        assert_eq!(Grant::decode(&s.data.values().next().unwrap().0).unwrap().expires_ns, T0 + 5 * SEC);
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 4, T0), Take::Taken { left: 0 });
        // Expired tokens are never spent.
        assert!(add(
            &mut s,
            SlotTable { ns: &ns, slots: 10 },
            false,
            Grant { owner: 9, tokens: 5, expires_ns: T0 + SEC },
            T0
        ));
        assert_eq!(take(&mut s, SlotTable { ns: &ns, slots: 10 }, 9, false, 1, T0 + SEC), Take::Empty);
    }

    #[test]
    fn grants_and_buckets_share_the_slot_table() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let bucket = |limit: Limit, now_ns| Withdrawal {
            owner: 1,
            limits: Limits::one(0, limit),
            cost: 1,
            extra: Default::default(),
            now_ns,
        };
        let allowed = |o: Outcome| matches!(o, Outcome::Decided { verdict, .. } if verdict.allowed);
        // One slot: a live bucket blocks a grant; an expired grant is reclaimed by a bucket.
        let live = Limit::new(5, 0.001).unwrap();
        assert!(allowed(debit(&mut s, &ns, Home::Slots(1), &bucket(live, T0)).outcome));
        assert!(!add(
            &mut s,
            SlotTable { ns: &ns, slots: 1 },
            false,
            Grant { owner: 2, tokens: 3, expires_ns: T0 + SEC },
            T0
        ));
        let mut s = FakeStore::default();
        assert!(add(
            &mut s,
            SlotTable { ns: &ns, slots: 1 },
            false,
            Grant { owner: 2, tokens: 3, expires_ns: T0 + SEC },
            T0
        ));
        let fast = Limit::new(5, 1.0).unwrap();
        assert_eq!(debit(&mut s, &ns, Home::Slots(1), &bucket(fast, T0)).outcome, Outcome::NoSlot);
        let d = debit(&mut s, &ns, Home::Slots(1), &bucket(fast, T0 + 2 * SEC));
        assert!(matches!(d.outcome, Outcome::Decided { slot: SlotUse::Reclaimed, .. }));
    }

    #[test]
    fn a_listed_tenants_grant_has_its_own_key_that_no_flood_takes() {
        let mut s = FakeStore::default();
        let ns = Namespace::new("r");
        let table = SlotTable { ns: &ns, slots: 1 };
        let live = Limit::new(5, 0.001).unwrap();
        let w = Withdrawal { owner: 1, limits: Limits::one(0, live), cost: 1, extra: Default::default(), now_ns: T0 };
        assert!(matches!(debit(&mut s, &ns, Home::Slots(1), &w).outcome, Outcome::Decided { .. }));
        // The only slot holds a live bucket: an unlisted tenant's grant has nowhere to go ...
        let grant = Grant { owner: 2, tokens: 3, expires_ns: T0 + SEC };
        assert!(!add(&mut s, table, false, grant, T0));
        // ... a listed tenant's grant is kept under its own key and spent to the token.
        assert!(add(&mut s, table, true, grant, T0));
        assert_eq!(take(&mut s, table, 2, true, 2, T0), Take::Taken { left: 1 });
        assert_eq!(take(&mut s, table, 2, false, 1, T0), Take::Empty);
        assert_eq!(take(&mut s, table, 2, true, 2, T0), Take::Empty);
        assert_eq!(take(&mut s, table, 2, true, 1, T0 + SEC), Take::Empty);
    }
}
