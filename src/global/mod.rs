//! The global limit: what to ask the rate-limit service, and what to do with its answer.
//! Pure (the host is the [`SharedStore`] passed in); `filter/` makes the gRPC call.
//!
//! With `lease_tokens: N` a request first tries to spend a service grant in shared data
//! ([`grant`]); only when the grant is empty does it ask the service, for N tokens at once
//! (`hits_addend = N`). The service counts all N as used, so the proxy never admits more than
//! it was granted; tokens left unspent when the service's window ends are dropped, which
//! under-admits by at most N - 1 per proxy per window.
//!
//! A grant lives until the service's window resets (`duration_until_reset` of the first
//! descriptor status), and never longer than [`MAX_GRANT_NS`]. A service that sends no status
//! (Limitador sends none) gives no reset time, so no grant can be proven to stay inside one
//! window: the spare tokens of that answer are dropped, and this worker stops asking for
//! grants (asks for each request's own cost) for [`NO_RESET_BACKOFF_NS`] before trying again.
//!
//! Counting: a request's outcome (`allowed`, `denied` or `shadow_denied`) is counted here
//! exactly once, when it is final, combined with what the local bucket said before in mode
//! `both` ([`Pending`]).

use crate::config::{Config, FailurePolicy, Global, Mode};
use crate::metrics::{Counter, Events, Final, Pending};
use crate::response::Quota;
use crate::rls::Answer;
use crate::store::record::Grant;
use crate::store::{Namespace, SharedStore, SlotTable};
use crate::tenant::TenantId;

pub mod grant;

const SEC: u64 = 1_000_000_000;

/// The longest a grant lives, even when the service's window is longer (a daily or monthly
/// limit): granted tokens unspent after this are dropped (under-admission, never over).
pub const MAX_GRANT_NS: u64 = 60 * SEC;

/// After an answer that granted spare tokens but carried no reset time, how long this worker asks
/// for single requests' costs only. Each retry can strand at most N - 1 tokens.
pub const NO_RESET_BACKOFF_NS: u64 = 60 * SEC;

/// What to do before asking the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Admitted from a service grant; no call.
    Admit,
    /// Ask the service for `hits` tokens.
    Ask { hits: u32 },
}

/// A request the service decides.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub tenant: TenantId,
    pub cost: u64,
    /// Tokens asked for: the cost, or a new grant's worth.
    pub hits: u32,
    /// The local bucket's verdict in mode `both` (`shadow_denied: false` otherwise).
    pub pending: Pending,
    /// When the call was planned: a grant's lifetime counts from here, not from the answer,
    /// so the round trip cannot stretch it past the service's window.
    pub asked_ns: u64,
    /// The tenant is listed in the config: its grant has a key of its own.
    pub listed: bool,
}

/// The rate-limit service as one plugin uses it.
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    pub global: &'a Global,
    /// The plugin's `mode` (shadow: an OVER_LIMIT answer is a shadow denial).
    pub mode: Mode,
    /// Where grants are kept.
    pub table: SlotTable<'a>,
}

impl<'a> Service<'a> {
    /// The service of a plugin with a `global` section.
    pub fn of(config: &'a Config, ns: &'a Namespace) -> Option<Service<'a>> {
        let global = config.global.as_ref()?;
        Some(Service { global, mode: config.mode, table: SlotTable { ns, slots: config.max_tenants } })
    }

    /// Spends a grant or says what to ask the service for. `grants_off_until`: this worker's
    /// back-off after an answer without a reset time (0: none). A grant admission is final
    /// and counted here.
    pub fn plan(
        &self,
        store: &mut impl SharedStore,
        call: &Call,
        grants_off_until: u64,
        now_ns: u64,
        events: &mut Events,
    ) -> Plan {
        let cost32 = u32::try_from(call.cost).unwrap_or(u32::MAX);
        let Some(grant_tokens) = self.global.lease_tokens else {
            return Plan::Ask { hits: cost32 };
        };
        // The service sent no reset time lately, so no grant was stored (none could be bounded
        // to its window): skip the shared-data read and ask for this request's cost only.
        if now_ns < grants_off_until {
            return Plan::Ask { hits: cost32 };
        }
        match grant::take(store, self.table, grant::owner(&call.tenant), call.listed, call.cost, now_ns) {
            grant::Take::Taken { .. } => {
                events.bump(Counter::GrantHits, 1);
                events.settle(call.pending, Final::Allowed);
                Plan::Admit
            }
            // Without a usable grant, ask for a new one (at least this request's cost).
            grant::Take::Empty | grant::Take::StoreError => Plan::Ask { hits: grant_tokens.max(cost32) },
        }
    }

    /// Applies the service's answer to `call` (`None`: error, timeout or an answer we cannot
    /// read).
    pub fn conclude(
        &self,
        store: &mut impl SharedStore,
        call: &Call,
        answer: Option<Answer>,
        now_ns: u64,
        events: &mut Events,
    ) -> Conclusion {
        let Some(answer) = answer else {
            events.bump(Counter::ServiceErrors, 1);
            let service = match self.global.failure_mode {
                FailurePolicy::Deny => Final::Denied,
                FailurePolicy::Allow => Final::Allowed,
            };
            let deny = events.settle(call.pending, service) == Final::Denied;
            return Conclusion {
                deny,
                retry_after_seconds: 1,
                quota: None,
                headers: Vec::new(),
                grants_off_until: None,
            };
        };
        let quota = match (answer.limit, answer.remaining) {
            (Some(limit), Some(remaining)) => Some(Quota {
                capacity: limit,
                remaining,
                reset_seconds: answer.reset_seconds.unwrap_or(0),
                // The service's window gives its quota back at the reset, not token by token.
                next_seconds: answer.reset_seconds.unwrap_or(0),
                window_seconds: answer.window_seconds.unwrap_or(0),
                limit: 0,
            }),
            _ => None,
        };
        if answer.over_limit {
            events.bump(Counter::ServiceOverLimit, 1);
            let deny = events.settle(call.pending, Final::refused(self.mode == Mode::Shadow)) == Final::Denied;
            let retry = answer.reset_seconds.unwrap_or(1).max(1);
            return Conclusion {
                deny,
                retry_after_seconds: retry,
                quota,
                headers: answer.headers,
                grants_off_until: None,
            };
        }
        events.settle(call.pending, Final::Allowed);
        let spare = u64::from(call.hits).saturating_sub(call.cost);
        let mut grants_off_until = None;
        if spare > 0 {
            match answer.reset_ns {
                // The grant lives until the service's window resets, capped: its tokens are
                // never spent in a later window (no over-admission).
                Some(reset) => {
                    let expires = call.asked_ns.saturating_add(reset.min(MAX_GRANT_NS));
                    // A window that may already have ended (a whole-second reset of 1 s, a
                    // slow answer) leaves nothing to keep: the spare tokens are dropped.
                    if expires > now_ns {
                        let new = Grant { owner: grant::owner(&call.tenant), tokens: spare, expires_ns: expires };
                        grant::add(store, self.table, call.listed, new, now_ns);
                    }
                }
                // No reset time (e.g. Limitador, which sends no statuses): no lifetime can be
                // proven safe, so the spare tokens are dropped and grants pause on this worker.
                None => grants_off_until = Some(now_ns.saturating_add(NO_RESET_BACKOFF_NS)),
            }
        }
        Conclusion { deny: false, retry_after_seconds: 0, quota, headers: answer.headers, grants_off_until }
    }
}

/// The outcome of a service call.
#[derive(Debug, Clone, PartialEq)]
pub struct Conclusion {
    pub deny: bool,
    pub retry_after_seconds: u64,
    /// Rate-limit headers from the service's descriptor status, when it sent one.
    pub quota: Option<Quota>,
    /// The service's `response_headers_to_add`.
    pub headers: Vec<(String, String)>,
    /// Set when the answer granted spare tokens without a reset time: ask for no grant until then.
    pub grants_off_until: Option<u64>,
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

    fn svc<'a>(c: &'a Config, ns: &'a Namespace) -> Service<'a> {
        Service::of(c, ns).unwrap()
    }

    fn call(tenant: &TenantId, cost: u64, hits: u32, pending: Pending) -> Call {
        Call { tenant: *tenant, cost, hits, pending, asked_ns: T0, listed: false }
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
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        assert_eq!(
            svc(&c, &Namespace::new("r")).plan(&mut s, &call(&t, 3, 0, Pending::default()), 0, T0, &mut e),
            Plan::Ask { hits: 3 }
        );
    }

    #[test]
    fn lease_is_spent_locally_then_renewed() {
        let c = config(r#","lease_tokens":4"#);
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, T0, &mut e),
            Plan::Ask { hits: 4 }
        );
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 4, Pending::default()), Some(ok(30)), T0, &mut e);
        assert!(!v.deny);
        for _ in 0..3 {
            assert_eq!(
                svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, T0 + SEC, &mut e),
                Plan::Admit
            );
        }
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, T0 + SEC, &mut e),
            Plan::Ask { hits: 4 }
        );
        assert_eq!(e.counters[Counter::GrantHits as usize], 3);
        // Tokens granted for a window are not spent after it.
        svc(&c, &ns).conclude(&mut s, &call(&t, 1, 4, Pending::default()), Some(ok(30)), T0, &mut e);
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, T0 + 31 * SEC, &mut e),
            Plan::Ask { hits: 4 }
        );
    }

    #[test]
    fn over_limit_and_failures() {
        let c = config(r#","failure_mode":"deny""#);
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        let over = Answer { over_limit: true, remaining: Some(0), ..ok(7) };
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 1, Pending::default()), Some(over), T0, &mut e);
        assert!(v.deny);
        assert_eq!(v.retry_after_seconds, 7);
        assert_eq!(v.quota.unwrap().remaining, 0);
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 1, Pending::default()), None, T0, &mut e);
        assert!(v.deny);
        assert_eq!(e.counters[Counter::ServiceErrors as usize], 1);
        let c = config("");
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 1, Pending::default()), None, T0, &mut e);
        assert!(!v.deny);
    }

    /// Each call ends in exactly one outcome counter, combined with the local verdict.
    #[test]
    fn outcomes_are_counted_once() {
        let c = config("");
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let over = Answer { over_limit: true, ..ok(7) };
        let outcomes =
            |e: &Events| [Counter::Allowed, Counter::Denied, Counter::ShadowDenied].map(|k| e.counters[k as usize]);
        let local_shadow = Pending { shadow_denied: true, ..Pending::default() };
        for (pending, answer, want) in [
            (Pending::default(), Some(ok(7)), [1, 0, 0]),
            (Pending::default(), Some(over.clone()), [0, 1, 0]),
            (Pending::default(), None, [1, 0, 0]),
            (local_shadow, Some(ok(7)), [0, 0, 1]),
            (local_shadow, Some(over.clone()), [0, 1, 0]),
            (local_shadow, None, [0, 0, 1]),
        ] {
            let mut e = Events::default();
            svc(&c, &ns).conclude(&mut s, &call(&t, 1, 1, pending), answer, T0, &mut e);
            assert_eq!(outcomes(&e), want, "{pending:?}");
        }
    }

    /// No reset time (no statuses, as Limitador answers): the spare tokens are dropped, and
    /// the worker asks for single costs until the back-off ends; a lease never outlives
    /// MAX_GRANT_NS even when the window is a day.
    #[test]
    fn answers_without_reset_grant_no_lease() {
        let c = config(r#","lease_tokens":5"#);
        let ns = Namespace::new("r");
        let mut s = FakeStore::default();
        let t = TenantId::new(b"acme").unwrap();
        let mut e = Events::default();
        let bare = Answer { limit: None, remaining: None, reset_seconds: None, reset_ns: None, ..ok(0) };
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 5, Pending::default()), Some(bare), T0, &mut e);
        assert_eq!(v.grants_off_until, Some(T0 + NO_RESET_BACKOFF_NS));
        let off = v.grants_off_until.unwrap();
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), off, T0 + SEC, &mut e),
            Plan::Ask { hits: 1 }
        );
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), off, off, &mut e),
            Plan::Ask { hits: 5 }
        );
        // A day-long window: the lease is there a minute, not a day.
        let v = svc(&c, &ns).conclude(&mut s, &call(&t, 1, 5, Pending::default()), Some(ok(86_400)), T0, &mut e);
        assert_eq!(v.grants_off_until, None);
        assert_eq!(svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, T0 + SEC, &mut e), Plan::Admit);
        let late = T0 + MAX_GRANT_NS;
        assert_eq!(
            svc(&c, &ns).plan(&mut s, &call(&t, 1, 0, Pending::default()), 0, late, &mut e),
            Plan::Ask { hits: 5 }
        );
    }
}
