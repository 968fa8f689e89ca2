//! Counters: their stat names, defined once, and [`Events`], the increments one request (or
//! one tick) produces, which `filter/` applies. Envoy shows proxy-wasm metrics under
//! `wasmcustom.` (see README "Stats"). Per-tenant and per-rule counters exist only for names
//! listed in the config, so the number of stats is bounded by the config, never by traffic.

use crate::config::{Config, Policy};
use crate::policy::PolicyId;

pub const PREFIX: &str = "tenant_ratelimit";

/// Counters every plugin has (`tenant_ratelimit.<name>`, the "plugin" counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Allowed,
    Denied,
    ShadowDenied,
    CasRetries,
    StoreErrors,
    NearLimit,
    Unmetered,
    SlotsReclaimed,
    OverflowUsed,
    OverflowDenied,
    /// Calls to the rate-limit service.
    ServiceCalls,
    /// Service calls that failed, timed out, or answered what we cannot read.
    ServiceErrors,
    /// Service answers OVER_LIMIT.
    ServiceOverLimit,
    /// Requests admitted from a service grant (`lease_tokens`) without a call.
    GrantHits,
}

impl Counter {
    /// Every counter, in the order of [`Events::counters`].
    pub const ALL: [Counter; 14] = [
        Counter::Allowed,
        Counter::Denied,
        Counter::ShadowDenied,
        Counter::CasRetries,
        Counter::StoreErrors,
        Counter::NearLimit,
        Counter::Unmetered,
        Counter::SlotsReclaimed,
        Counter::OverflowUsed,
        Counter::OverflowDenied,
        Counter::ServiceCalls,
        Counter::ServiceErrors,
        Counter::ServiceOverLimit,
        Counter::GrantHits,
    ];

    /// The stat name after the prefix. The service counters keep their released names.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Allowed => "allowed",
            Counter::Denied => "denied",
            Counter::ShadowDenied => "shadow_denied",
            Counter::CasRetries => "cas_retries",
            Counter::StoreErrors => "store_errors",
            Counter::NearLimit => "near_limit",
            Counter::Unmetered => "unmetered",
            Counter::SlotsReclaimed => "slots_reclaimed",
            Counter::OverflowUsed => "overflow_used",
            Counter::OverflowDenied => "overflow_denied",
            Counter::ServiceCalls => "global_calls",
            Counter::ServiceErrors => "global_errors",
            Counter::ServiceOverLimit => "global_over_limit",
            Counter::GrantHits => "lease_hits",
        }
    }
}

/// Gauge: shared-data keys this plugin created (there is no delete, so this is the key count).
pub const LIVE_SLOTS: &str = "live_slots";

/// The final outcome of a metered request: exactly one of `allowed`, `denied`,
/// `shadow_denied` is counted per metered request, whatever the path. Also the counters kept
/// per listed tenant and per named rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    Allowed,
    /// The request gets the deny reply.
    Denied,
    /// Would have been denied; passes (shadow mode).
    ShadowDenied,
}

impl Final {
    pub const ALL: [Final; 3] = [Final::Allowed, Final::Denied, Final::ShadowDenied];

    /// The plugin counter of this outcome; its name is the per-name counter's too.
    pub const fn counter(self) -> Counter {
        match self {
            Final::Allowed => Counter::Allowed,
            Final::Denied => Counter::Denied,
            Final::ShadowDenied => Counter::ShadowDenied,
        }
    }

    /// A denial, or in shadow mode a counted pass.
    pub fn refused(shadow: bool) -> Final {
        if shadow {
            Final::ShadowDenied
        } else {
            Final::Denied
        }
    }
}

/// Counter increments to apply after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events {
    pub counters: [u32; Counter::ALL.len()],
    /// The per-name counter to bump: the request's outcome for its policy (`Default` has none).
    pub named: Option<(PolicyId, Final)>,
    /// On a refusal by the policy's own limits (enforced or shadow): the policy, and bit `i`
    /// set for each limit `i` that had too few tokens (the per-limit `denied` counters of a
    /// policy with several limits).
    pub limits_denied: Option<(PolicyId, u8)>,
    pub slots_created: u32,
}

impl Events {
    pub fn bump(&mut self, c: Counter, n: u32) {
        if let Some(slot) = self.counters.get_mut(c as usize) {
            *slot = slot.saturating_add(n);
        }
    }

    pub fn count(&self, c: Counter) -> u32 {
        self.counters.get(c as usize).copied().unwrap_or(0)
    }

    /// Counts a request's final outcome, for the plugin and for its policy.
    pub fn outcome(&mut self, policy: PolicyId, outcome: Final) {
        self.bump(outcome.counter(), 1);
        self.named = Some((policy, outcome));
    }

    /// Adds another request's counters (worker-lease admissions batched until a flush).
    pub fn add(&mut self, other: &Events) {
        for (sum, n) in self.counters.iter_mut().zip(other.counters.iter()) {
            *sum = sum.saturating_add(*n);
        }
        self.slots_created = self.slots_created.saturating_add(other.slots_created);
    }

    /// Takes this request's outcome back out because it is not final: in `global.mode: "both"`
    /// a request the local bucket lets through still asks the service, and the outcome is
    /// counted once, when the service's answer (or a service grant) settles it
    /// ([`Events::settle`]). Every other counter (retries, slots, near-limit) stays.
    pub fn defer(&mut self, policy: PolicyId) -> Pending {
        let shadow_denied = self.count(Counter::ShadowDenied) > 0;
        for c in [Counter::Allowed, Counter::ShadowDenied] {
            if let Some(slot) = self.counters.get_mut(c as usize) {
                *slot = 0;
            }
        }
        self.named = None;
        Pending { shadow_denied, policy }
    }

    /// Counts a request's final outcome: the service's (or a grant's) verdict combined with
    /// what the local bucket said before (`shadow_denied: false` when no bucket was asked). A
    /// local shadow denial stays a shadow denial unless the service enforces a denial.
    pub fn settle(&mut self, pending: Pending, service: Final) -> Final {
        let outcome = match service {
            Final::Allowed if pending.shadow_denied => Final::ShadowDenied,
            other => other,
        };
        self.outcome(pending.policy, outcome);
        outcome
    }
}

/// A request whose outcome the rate-limit service decides next (modes `global` and `both`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// The local bucket would have denied it (shadow mode let it through).
    pub shadow_denied: bool,
    /// The policy whose per-name counters the final outcome also goes to.
    pub policy: PolicyId,
}

pub fn plugin_name(counter: &str) -> String {
    format!("{PREFIX}.{counter}")
}

/// `tenant_ratelimit.tenant.<name>.<counter>`, with characters Envoy's stat names treat
/// specially (`.` splits, `:` tags) replaced by `_`.
pub fn scoped_name(scope: &str, name: &str, counter: &str) -> String {
    let clean: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{PREFIX}.{scope}.{clean}.{counter}")
}

/// The per-limit `denied` stats of a config: for each policy with several limits, one
/// (policy, stat name) per limit, in the limits' order, sorted by policy (the filter looks a
/// policy's up by binary search):
/// `tenant_ratelimit.<tenant|rule>.<policy>.limit.<limit>.denied`
/// (`tenant_ratelimit.top.default.limit.<limit>.denied` for the top level). Bounded by the
/// config.
pub fn limit_denied_names(config: &Config) -> Vec<(PolicyId, String)> {
    let mut out = Vec::new();
    let mut add = |id: PolicyId, scope: &str, policy: &Policy| {
        for a in policy.about.iter().filter(|_| policy.limits.len() > 1) {
            out.push((id, scoped_name(scope, &policy.name, &format!("limit.{}.denied", a.name))));
        }
    };
    add(PolicyId::Default, "top", &config.default_policy);
    for (i, p) in config.tenants.iter().enumerate() {
        add(PolicyId::Tenant(i), "tenant", p);
    }
    for (i, r) in config.rules.iter().enumerate() {
        if let Some(p) = &r.policy {
            add(PolicyId::Rule(i), "rule", p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(plugin_name("allowed"), "tenant_ratelimit.allowed");
        assert_eq!(scoped_name("tenant", "acme.corp:1", "denied"), "tenant_ratelimit.tenant.acme_corp_1.denied");
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "ALL is in declaration order");
            assert!(!Counter::ALL[..i].iter().any(|o| o.name() == c.name()), "{}", c.name());
        }
        assert_eq!(Final::ALL.map(|f| f.counter().name()), ["allowed", "denied", "shadow_denied"]);
    }

    #[test]
    fn per_limit_stats_exist_for_policies_with_several_limits_only() {
        let two =
            r#"[{"name":"burst","capacity":5,"refill_rate":5},{"name":"day","capacity":9,"refill_rate":"9/day"}]"#;
        let c = Config::from_json_bytes(
            format!(
                r#"{{"limits":{two},"tenants":{{"acme.corp":{{"limits":{two}}},"one":{{"capacity":1,"refill_rate":1}}}},
                "rules":[{{"name":"login","path_prefix":"/l","limits":{two}}},{{"name":"x","path_prefix":"/"}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let names = limit_denied_names(&c);
        let want = [
            (PolicyId::Default, "tenant_ratelimit.top.default.limit.burst.denied"),
            (PolicyId::Default, "tenant_ratelimit.top.default.limit.day.denied"),
            (PolicyId::Tenant(0), "tenant_ratelimit.tenant.acme_corp.limit.burst.denied"),
            (PolicyId::Tenant(0), "tenant_ratelimit.tenant.acme_corp.limit.day.denied"),
            (PolicyId::Rule(0), "tenant_ratelimit.rule.login.limit.burst.denied"),
            (PolicyId::Rule(0), "tenant_ratelimit.rule.login.limit.day.denied"),
        ];
        assert_eq!(names, want.map(|(p, n)| (p, n.to_string())));
        assert!(names.windows(2).all(|w| w[0].0 <= w[1].0), "sorted by policy");
    }

    #[test]
    fn a_deferred_outcome_is_settled_once() {
        let mut e = Events::default();
        e.outcome(PolicyId::Tenant(0), Final::ShadowDenied);
        e.bump(Counter::CasRetries, 2);
        let pending = e.defer(PolicyId::Tenant(0));
        assert_eq!(pending, Pending { shadow_denied: true, policy: PolicyId::Tenant(0) });
        assert_eq!((e.count(Counter::ShadowDenied), e.count(Counter::CasRetries), e.named), (0, 2, None));
        assert_eq!(e.settle(pending, Final::Allowed), Final::ShadowDenied);
        assert_eq!(e.settle(pending, Final::Denied), Final::Denied);
        assert_eq!((e.count(Counter::ShadowDenied), e.count(Counter::Denied)), (1, 1));
        assert_eq!(e.named, Some((PolicyId::Tenant(0), Final::Denied)));
    }
}
