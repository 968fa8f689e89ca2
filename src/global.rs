//! The global limit: what to ask the rate-limit service, and what to do with its answer.
//! Pure (the host is the [`SharedStore`] passed in); `filter.rs` makes the gRPC call.
//!
//! With `lease_tokens: N` a request first tries to spend a lease in shared data; only when
//! the lease is empty does it ask the service, for N tokens at once (`hits_addend = N`).
//! The service counts all N as used, so the proxy never admits more than it was granted;
//! tokens left unspent when the service's window ends are dropped, which under-admits by at
//! most N - 1 per proxy per window.

use crate::config::{Config, Global, Mode, StoreErrorPolicy};
use crate::decision::Events;
use crate::metrics::Counter;
use crate::response::Quota;
use crate::rls::Answer;
use crate::store::{hash128, lease_add, lease_take, LeaseTake, Namespace, SharedStore};
use crate::tenant::TenantId;

const LEASE_SEPARATOR: &[u8] = b"\0lease";

/// The owner id of a tenant's lease (never equal to a bucket's owner id).
pub fn lease_owner(tenant: &TenantId) -> u128 {
    hash128(&[tenant.as_bytes(), LEASE_SEPARATOR])
}

/// What to do before asking the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Admitted from the lease; no call.
    Admit,
    /// Ask the service for `hits` tokens.
    Ask { hits: u32 },
}

#[allow(clippy::too_many_arguments)]
pub fn plan(
    global: &Global,
    store: &mut impl SharedStore,
    ns: &Namespace,
    config: &Config,
    tenant: &TenantId,
    cost: u64,
    now_ns: u64,
    events: &mut Events,
) -> Plan {
    let cost32 = u32::try_from(cost).unwrap_or(u32::MAX);
    let Some(lease) = global.lease_tokens else {
        return Plan::Ask { hits: cost32 };
    };
    match lease_take(store, ns, lease_owner(tenant), cost, now_ns, config.max_tenants) {
        LeaseTake::Taken { .. } => {
            events.bump(Counter::LeaseHits, 1);
            events.bump(Counter::Allowed, 1);
            Plan::Admit
        }
        // Without a usable lease, ask for a new one (at least this request's cost).
        LeaseTake::Empty | LeaseTake::StoreError => Plan::Ask { hits: lease.max(cost32) },
    }
}

/// The outcome of a service call.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub deny: bool,
    pub retry_after_seconds: u64,
    /// Rate-limit headers from the service's descriptor status, when it sent one.
    pub quota: Option<Quota>,
    /// The service's `response_headers_to_add`.
    pub headers: Vec<(String, String)>,
}

/// Applies the service's answer (`None`: error, timeout or an answer we cannot read).
#[allow(clippy::too_many_arguments)]
pub fn conclude(
    global: &Global,
    config: &Config,
    store: &mut impl SharedStore,
    ns: &Namespace,
    tenant: &TenantId,
    cost: u64,
    hits: u32,
    answer: Option<Answer>,
    now_ns: u64,
    events: &mut Events,
) -> Verdict {
    let Some(answer) = answer else {
        events.bump(Counter::GlobalErrors, 1);
        let deny = global.failure_mode == StoreErrorPolicy::Deny;
        events.bump(if deny { Counter::Denied } else { Counter::Allowed }, 1);
        return Verdict { deny, retry_after_seconds: 1, quota: None, headers: Vec::new() };
    };
    let quota = match (answer.limit, answer.remaining) {
        (Some(limit), Some(remaining)) => Some(Quota {
            capacity: limit,
            remaining,
            reset_seconds: answer.reset_seconds.unwrap_or(0),
            // The service's window gives its quota back at the reset, not token by token.
            next_seconds: answer.reset_seconds.unwrap_or(0),
            window_seconds: answer.window_seconds.unwrap_or(0),
        }),
        _ => None,
    };
    if answer.over_limit {
        events.bump(Counter::GlobalOverLimit, 1);
        let shadow = config.mode == Mode::Shadow;
        events.bump(if shadow { Counter::ShadowDenied } else { Counter::Denied }, 1);
        let retry = answer.reset_seconds.unwrap_or(1).max(1);
        return Verdict { deny: !shadow, retry_after_seconds: retry, quota, headers: answer.headers };
    }
    events.bump(Counter::Allowed, 1);
    let spare = u64::from(hits).saturating_sub(cost);
    if spare > 0 {
        // The lease lives until the service's window resets; without a reset time it would
        // have no safe lifetime, so the spare tokens are dropped.
        if let Some(reset) = answer.reset_ns {
            lease_add(store, ns, lease_owner(tenant), spare, now_ns.saturating_add(reset), now_ns, config.max_tenants);
        }
    }
    Verdict { deny: false, retry_after_seconds: 0, quota, headers: answer.headers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fake::FakeStore;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn config(extra: &str) -> Config {
        Config::from_json_bytes(
            format!(r#"{{"capacity":5,"refill_rate":1,"global":{{"cluster":"rls","domain":"d"{extra}}}}}"#).as_bytes(),
        )
        .unwrap()
    }

    fn ok(reset_s: u64) -> Answer {
        Answer {
            over_limit: false,
            limit: Some(20),
            remaining: Some(10),
            reset_seconds: Some(reset_s),
            reset_ns: Some(reset_s * SEC),
            window_seconds: Some(60),
            headers: vec![],
        }
    }

    #[test]
    fn without_lease_every_request_asks_for_its_cost() {
        let c = config("");
        let g = c.global.as_ref().unwrap();
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        assert_eq!(plan(g, &mut s, &Namespace::new("r"), &c, &t, 3, T0, &mut e), Plan::Ask { hits: 3 });
    }

    #[test]
    fn lease_is_spent_locally_then_renewed() {
        let c = config(r#","lease_tokens":4"#);
        let g = c.global.as_ref().unwrap();
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        assert_eq!(plan(g, &mut s, &ns, &c, &t, 1, T0, &mut e), Plan::Ask { hits: 4 });
        let v = conclude(g, &c, &mut s, &ns, &t, 1, 4, Some(ok(30)), T0, &mut e);
        assert!(!v.deny);
        for _ in 0..3 {
            assert_eq!(plan(g, &mut s, &ns, &c, &t, 1, T0 + SEC, &mut e), Plan::Admit);
        }
        assert_eq!(plan(g, &mut s, &ns, &c, &t, 1, T0 + SEC, &mut e), Plan::Ask { hits: 4 });
        assert_eq!(e.counters[Counter::LeaseHits as usize], 3);
        // Tokens granted for a window are not spent after it.
        conclude(g, &c, &mut s, &ns, &t, 1, 4, Some(ok(30)), T0, &mut e);
        assert_eq!(plan(g, &mut s, &ns, &c, &t, 1, T0 + 31 * SEC, &mut e), Plan::Ask { hits: 4 });
    }

    #[test]
    fn over_limit_and_failures() {
        let c = config(r#","failure_mode":"deny""#);
        let g = c.global.as_ref().unwrap();
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        let over = Answer { over_limit: true, remaining: Some(0), ..ok(7) };
        let v = conclude(g, &c, &mut s, &ns, &t, 1, 1, Some(over), T0, &mut e);
        assert!(v.deny);
        assert_eq!(v.retry_after_seconds, 7);
        assert_eq!(v.quota.unwrap().remaining, 0);
        let v = conclude(g, &c, &mut s, &ns, &t, 1, 1, None, T0, &mut e);
        assert!(v.deny);
        assert_eq!(e.counters[Counter::GlobalErrors as usize], 1);
        let c = config("");
        let v = conclude(c.global.as_ref().unwrap(), &c, &mut s, &ns, &t, 1, 1, None, T0, &mut e);
        assert!(!v.deny);
    }
}
