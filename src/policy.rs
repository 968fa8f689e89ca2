//! Which policy a request meets: tenant (and matching rule) -> [`PolicyId`] -> the policy
//! (its limits, whose names go into `RateLimit` headers), its name (per-name stats, a rule
//! bucket's owner) and where its bucket is stored.

use crate::config::{Config, Mode, Policy, Rule, UnknownTenants};
use crate::store::{hash128, Home};
use crate::tenant::{self, RequestFacts, TenantId};

/// A policy of the config, by position, so a request context holds no borrowed data. Ordered
/// as the config lists them (the default, tenants, rules), which per-limit stats rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PolicyId {
    /// The top-level limit (unlisted tenants); it has no per-name counters.
    #[default]
    Default,
    /// `config.tenants[i]`.
    Tenant(usize),
    /// The rule with id `i` (`config.rule(i)`: top-level or a tenant's), with its own limit.
    Rule(usize),
    /// `config.plans[i]`: an unlisted tenant on a plan.
    Plan(usize),
    /// Listed tenant `t` without a named plan, on plan `p` from `tenant.plan_from`:
    /// `config.tenants[t].on_plans[p]`. Counted, named and stored as the tenant.
    TenantOnPlan(usize, usize),
}

/// Owner ids that no tenant id can produce (tenant ids never contain NUL).
const UNLISTED_OWNER: &[u8] = b"\0unlisted";
pub const OVERFLOW_OWNER: &[u8] = b"\0overflow";
const RULE_SEPARATOR: &[u8] = b"\0rule\0";
const PLAN_SEPARATOR: &[u8] = b"\0plan\0";

impl PolicyId {
    /// The policy of a request of `tenant` on `plan` matching `rule`: the rule's own limit,
    /// else the listed tenant's (over `plan` if it has no named plan), else the plan's, else
    /// the default.
    pub fn of(config: &Config, tenant: &TenantId, plan: Option<usize>, rule: Option<(usize, &Rule)>) -> PolicyId {
        if let Some((index, rule)) = rule {
            if rule.policy.is_some() {
                return PolicyId::Rule(index);
            }
        }
        match (config.tenant_index(tenant.as_bytes()), plan) {
            (Some(t), Some(p)) if config.tenants.get(t).is_some_and(|e| p < e.on_plans.len()) => {
                PolicyId::TenantOnPlan(t, p)
            }
            (Some(t), _) => PolicyId::Tenant(t),
            (None, Some(p)) => PolicyId::Plan(p),
            (None, None) => PolicyId::Default,
        }
    }

    /// The policy (the default if the index is stale, which a config never makes it).
    pub fn policy(self, config: &Config) -> &Policy {
        let found = match self {
            PolicyId::Default => None,
            PolicyId::Tenant(i) => config.tenants.get(i),
            PolicyId::Rule(i) => config.rule(i).and_then(|r| r.policy.as_ref()),
            PolicyId::Plan(i) => config.plans.get(i),
            PolicyId::TenantOnPlan(t, p) => config.tenants.get(t).and_then(|e| e.on_plans.get(p)),
        };
        found.unwrap_or(&config.default_policy)
    }

    /// The policy's name (a one-limit policy's limit is called the same in headers).
    pub fn name(self, config: &Config) -> &str {
        &self.policy(config).name
    }

    /// The bucket of `tenant` under this policy: its owner hash and where it is stored. A
    /// listed tenant's buckets (its own and its per-rule ones) have reserved keys, so a flood
    /// of other tenant ids can never push it into the overflow bucket; everyone else shares
    /// the slot table.
    pub fn bucket(self, config: &Config, tenant: &TenantId) -> (u128, Home) {
        let listed = config.tenant_index(tenant.as_bytes()).is_some();
        let home = if listed { Home::Reserved(config.max_tenants) } else { Home::Slots(config.max_tenants) };
        match self {
            PolicyId::Rule(_) => {
                let name = self.name(config);
                (hash128(&[tenant.as_bytes(), RULE_SEPARATOR, name.as_bytes()]), home)
            }
            PolicyId::Tenant(_) | PolicyId::TenantOnPlan(..) => (hash128(&[tenant.as_bytes()]), home),
            // A tenant keeps its bucket when its plan changes (the limit is clamped as on a
            // reconfiguration); under `shared`, each plan's unlisted tenants share one.
            PolicyId::Plan(_) => {
                let owner = match config.unknown_tenants {
                    UnknownTenants::Separate => hash128(&[tenant.as_bytes()]),
                    UnknownTenants::Shared => hash128(&[UNLISTED_OWNER, PLAN_SEPARATOR, self.name(config).as_bytes()]),
                };
                (owner, Home::Slots(config.max_tenants))
            }
            PolicyId::Default => {
                let owner = match config.unknown_tenants {
                    UnknownTenants::Separate => hash128(&[tenant.as_bytes()]),
                    UnknownTenants::Shared => hash128(&[UNLISTED_OWNER]),
                };
                (owner, Home::Slots(config.max_tenants))
            }
        }
    }
}

/// The share of a policy's denials that are enforced, 0 to 100: its own `enforce_percent`
/// or `mode`, else the top level's.
pub fn enforced_percent(config: &Config, policy: &Policy) -> u8 {
    match (policy.enforce_percent, policy.mode.unwrap_or(config.mode)) {
        (Some(percent), _) => percent,
        (None, Mode::Shadow) => 0,
        (None, Mode::Enforce) if policy.mode.is_some() => 100,
        (None, Mode::Enforce) => config.enforce_percent,
    }
}

/// Whether a denial under `policy` is enforced (else it passes as a shadow denial). Between
/// 0 and 100 % the pick is a hash of the tenant and the decision's nanosecond: no state, no
/// randomness source, the same share on every worker, and each tenant sampled alike.
pub fn enforces(config: &Config, policy: &Policy, tenant: &TenantId, now_ns: u64) -> bool {
    match enforced_percent(config, policy) {
        0 => false,
        percent @ 1..=99 => (hash128(&[tenant.as_bytes(), &now_ns.to_le_bytes()]) % 100) < u128::from(percent),
        _ => true,
    }
}

/// The plan a request of `tenant` is on: a listed tenant's named plan; else from
/// `tenant.plan_from` (the first source present decides; an unknown name, or a value the
/// client could forge, means `default_plan`); else `default_plan`. The sources are read only
/// when they can matter.
pub fn plan_of(config: &Config, tenant: &TenantId, facts: &mut impl RequestFacts) -> Option<usize> {
    if let Some(entry) = config.tenant_index(tenant.as_bytes()).and_then(|t| config.tenants.get(t)) {
        if entry.plan.is_some() || entry.on_plans.is_empty() {
            return entry.plan.or(config.default_plan);
        }
    }
    if config.plan_sources.is_empty() {
        return config.default_plan;
    }
    match tenant::first_present(&config.plan_sources, facts) {
        Some(name) => config.plan_index(name.as_bytes()).or(config.default_plan),
        None => config.default_plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TenantId {
        TenantId::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn rule_then_tenant_then_default() {
        let c = Config::from_json_bytes(
            br#"{"capacity":5,"refill_rate":1,"unknown_tenants":"shared","tenants":{"vip":{"capacity":9}},
            "rules":[{"name":"login","path_prefix":"/login","capacity":2,"refill_rate":1},{"path_prefix":"/"}]}"#,
        )
        .unwrap();
        let login = c.rules.first().map(|r| (0, r));
        let other = c.rules.get(1).map(|r| (1, r));
        assert_eq!(PolicyId::of(&c, &id("vip"), None, login), PolicyId::Rule(0));
        assert_eq!(PolicyId::of(&c, &id("vip"), None, other), PolicyId::Tenant(0));
        assert_eq!(PolicyId::of(&c, &id("x"), None, None), PolicyId::Default);
        assert_eq!(PolicyId::Rule(0).name(&c), "login");
        assert_eq!(PolicyId::Tenant(0).policy(&c).limits.first().capacity, 9);
        assert_eq!(PolicyId::Tenant(7).name(&c), "default");
        // Listed tenants have reserved keys, also for their rule buckets; unlisted ones share.
        assert!(matches!(PolicyId::Rule(0).bucket(&c, &id("vip")).1, Home::Reserved(_)));
        assert!(matches!(PolicyId::Rule(0).bucket(&c, &id("x")).1, Home::Slots(_)));
        assert_ne!(PolicyId::Rule(0).bucket(&c, &id("vip")).0, PolicyId::Tenant(0).bucket(&c, &id("vip")).0);
        assert_eq!(PolicyId::Default.bucket(&c, &id("a")), PolicyId::Default.bucket(&c, &id("b")));
    }

    struct Headers(Vec<(&'static str, &'static str)>);

    impl RequestFacts for Headers {
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_bytes().to_vec())
        }
        fn path(&mut self) -> Option<&[u8]> {
            None
        }
        fn property(&mut self, _: &[&str]) -> Option<Vec<u8>> {
            None
        }
    }

    const PLANS: &[u8] = br#"{"capacity":1000,"refill_rate":"1000/min",
        "plans":{"free":{"capacity":60,"refill_rate":"60/min"},"pro":{"capacity":120,"refill_rate":"120/min","mode":"shadow"}},
        "tenant":{"plan_from":[{"header":"x-plan"}],"default_plan":"free"},
        "tenants":{"acme":{"plan":"pro"},"globex":{"capacity":300,"refill_rate":"300/min"},"initech":{"capacity":7}}}"#;

    fn policy_for(c: &Config, tenant: &str, plan_header: Option<&'static str>) -> PolicyId {
        let mut facts = Headers(plan_header.map(|p| vec![("x-plan", p)]).unwrap_or_default());
        let plan = plan_of(c, &id(tenant), &mut facts);
        PolicyId::of(c, &id(tenant), plan, None)
    }

    #[test]
    fn plans_precedence_own_fields_then_named_plan_then_plan_from_then_default_plan() {
        let c = Config::from_json_bytes(PLANS).unwrap();
        let cap = |p: PolicyId| p.policy(&c).limits.first().capacity;
        // Unlisted: the plan from `plan_from`; unknown or absent: `default_plan`.
        assert_eq!(cap(policy_for(&c, "new-customer", Some("pro"))), 120);
        assert_eq!(cap(policy_for(&c, "new-customer", Some("platinum"))), 60);
        assert_eq!(cap(policy_for(&c, "new-customer", None)), 60);
        assert_eq!(policy_for(&c, "new-customer", Some("pro")).name(&c), "pro");
        // A named plan wins over `plan_from`, whatever the request says.
        assert_eq!(policy_for(&c, "acme", Some("free")), PolicyId::Tenant(0));
        assert_eq!(cap(PolicyId::Tenant(0)), 120);
        assert_eq!(PolicyId::Tenant(0).policy(&c).mode, Some(crate::config::Mode::Shadow));
        assert_eq!(PolicyId::Tenant(0).name(&c), "acme");
        // Own fields win over every plan; unset ones come from the request's plan.
        let globex = policy_for(&c, "globex", Some("pro"));
        assert_eq!((cap(globex), globex.policy(&c).mode), (300, Some(crate::config::Mode::Shadow)));
        let initech = c.tenant_index(b"initech").unwrap();
        let on_pro = policy_for(&c, "initech", Some("pro"));
        assert!(matches!(on_pro, PolicyId::TenantOnPlan(t, _) if t == initech));
        assert_eq!((cap(on_pro), on_pro.policy(&c).about[0].rate_per_second), (7, 2.0));
        // No plan in the request: the entry as resolved over `default_plan`.
        let on_default = policy_for(&c, "initech", None);
        assert_eq!((cap(on_default), on_default.policy(&c).about[0].rate_per_second), (7, 1.0));
        // A tenant keeps its bucket across plans.
        assert_eq!(on_pro.bucket(&c, &id("initech")), on_default.bucket(&c, &id("initech")));
    }

    #[test]
    fn without_plan_from_unlisted_tenants_are_on_the_default_plan_or_the_top_level() {
        let c = Config::from_json_bytes(
            br#"{"capacity":5,"refill_rate":1,"plans":{"free":{"capacity":2}},"tenant":{"default_plan":"free"}}"#,
        )
        .unwrap();
        assert_eq!(policy_for(&c, "x", Some("free")).policy(&c).limits.first().capacity, 2);
        let c = Config::from_json_bytes(br#"{"capacity":5,"refill_rate":1,"plans":{"free":{"capacity":2}}}"#).unwrap();
        assert_eq!(policy_for(&c, "x", None), PolicyId::Default);
    }

    #[test]
    fn shared_unlisted_tenants_share_one_bucket_per_plan() {
        let c = Config::from_json_bytes(
            br#"{"capacity":5,"refill_rate":1,"unknown_tenants":"shared","plans":{"a":{},"b":{}},
            "tenant":{"plan_from":[{"header":"x-plan"}]}}"#,
        )
        .unwrap();
        let (a1, a2, b) =
            (policy_for(&c, "t1", Some("a")), policy_for(&c, "t2", Some("a")), policy_for(&c, "t1", Some("b")));
        assert_eq!(a1.bucket(&c, &id("t1")), a2.bucket(&c, &id("t2")));
        assert_ne!(a1.bucket(&c, &id("t1")), b.bucket(&c, &id("t1")));
        assert_ne!(a1.bucket(&c, &id("t1")), PolicyId::Default.bucket(&c, &id("t1")));
    }

    #[test]
    fn enforce_percent_enforces_that_share_of_denials() {
        let c = Config::from_json_bytes(
            br#"{"capacity":5,"refill_rate":1,"enforce_percent":30,
            "plans":{"trial":{"enforce_percent":0},"paid":{"mode":"enforce"}},
            "tenants":{"a":{"enforce_percent":100},"b":{"mode":"shadow"},"c":{"plan":"trial"},"d":{"plan":"trial","mode":"enforce"}}}"#,
        )
        .unwrap();
        let pct = |p: PolicyId| enforced_percent(&c, p.policy(&c));
        let t = |name: &str| PolicyId::Tenant(c.tenant_index(name.as_bytes()).unwrap());
        assert_eq!((pct(PolicyId::Default), pct(t("a")), pct(t("b")), pct(t("c")), pct(t("d"))), (30, 100, 0, 0, 100));
        assert_eq!(pct(PolicyId::Plan(c.plan_index(b"paid").unwrap())), 100);
        let policy = PolicyId::Default.policy(&c);
        let enforced = (0..10_000u64).filter(|ns| enforces(&c, policy, &id("x"), ns * 1_000_003)).count();
        assert!((2_700..=3_300).contains(&enforced), "{enforced} of 10000 at 30 %");
        assert!((0..100u64).all(|ns| enforces(&c, PolicyId::Tenant(0).policy(&c), &id("a"), ns)));
        assert!((0..100u64).all(|ns| !enforces(&c, t("b").policy(&c), &id("b"), ns)));
    }
}
