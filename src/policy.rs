//! Which policy a request meets: tenant (and matching rule) -> [`PolicyId`] -> the policy
//! (its limits, whose names go into `RateLimit` headers), its name (per-name stats, a rule
//! bucket's owner) and where its bucket is stored.

use crate::config::{Config, Policy, Rule, UnknownTenants};
use crate::store::{hash128, Home};
use crate::tenant::TenantId;

/// A policy of the config, by position, so a request context holds no borrowed data. Ordered
/// as the config lists them (the default, tenants, rules), which per-limit stats rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PolicyId {
    /// The top-level limit (unlisted tenants); it has no per-name counters.
    #[default]
    Default,
    /// `config.tenants[i]`.
    Tenant(usize),
    /// `config.rules[i]`, a rule with its own limit.
    Rule(usize),
}

/// Owner ids that no tenant id can produce (tenant ids never contain NUL).
const UNLISTED_OWNER: &[u8] = b"\0unlisted";
pub const OVERFLOW_OWNER: &[u8] = b"\0overflow";
const RULE_SEPARATOR: &[u8] = b"\0rule\0";

impl PolicyId {
    /// The policy of a request of `tenant` matching `rule`: the rule's own limit, else the
    /// listed tenant's, else the default.
    pub fn of(config: &Config, tenant: &TenantId, rule: Option<(usize, &Rule)>) -> PolicyId {
        if let Some((index, rule)) = rule {
            if rule.policy.is_some() {
                return PolicyId::Rule(index);
            }
        }
        config.tenant_index(tenant.as_bytes()).map_or(PolicyId::Default, PolicyId::Tenant)
    }

    /// The policy (the default if the index is stale, which a config never makes it).
    pub fn policy(self, config: &Config) -> &Policy {
        let found = match self {
            PolicyId::Default => None,
            PolicyId::Tenant(i) => config.tenants.get(i),
            PolicyId::Rule(i) => config.rules.get(i).and_then(|r| r.policy.as_ref()),
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
            PolicyId::Tenant(_) => (hash128(&[tenant.as_bytes()]), home),
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
        assert_eq!(PolicyId::of(&c, &id("vip"), login), PolicyId::Rule(0));
        assert_eq!(PolicyId::of(&c, &id("vip"), other), PolicyId::Tenant(0));
        assert_eq!(PolicyId::of(&c, &id("x"), None), PolicyId::Default);
        assert_eq!(PolicyId::Rule(0).name(&c), "login");
        assert_eq!(PolicyId::Tenant(0).policy(&c).limits.first().capacity, 9);
        assert_eq!(PolicyId::Tenant(7).name(&c), "default");
        // Listed tenants have reserved keys, also for their rule buckets; unlisted ones share.
        assert!(matches!(PolicyId::Rule(0).bucket(&c, &id("vip")).1, Home::Reserved(_)));
        assert!(matches!(PolicyId::Rule(0).bucket(&c, &id("x")).1, Home::Slots(_)));
        assert_ne!(PolicyId::Rule(0).bucket(&c, &id("vip")).0, PolicyId::Tenant(0).bucket(&c, &id("vip")).0);
        assert_eq!(PolicyId::Default.bucket(&c, &id("a")), PolicyId::Default.bucket(&c, &id("b")));
    }
}
