//! The service config file: `{"domains": {"<domain>": <limits>}, ...}`. Each domain's limits
//! are a filter plugin config, parsed by the filter's own code (`tenant_ratelimit::config`),
//! so one definition of a tenant's limits serves the sidecar and the fleet. Errors name the
//! field (`domains.acme.tenants.x.capacity`), as in the filter.

use crate::plan::limit_key;
use crate::units::{limit_units, BucketLimit};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use tenant_ratelimit::config::{Config, ConfigError, Policy, UnknownTenants};

const TOP_FIELDS: &[&str] = &["domains", "tenant_key", "rule_key", "plan_key", "unmatched", "max_descriptors"];
const MAX_NAME: usize = 256;
const DEFAULT_MAX_DESCRIPTORS: u64 = 64;

/// What to answer for a descriptor the config does not describe (no tenant entry, an unknown
/// rule name) and for an unknown domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// `OK` with no limit, as Envoy's reference service does for descriptors without a rule.
    Ok,
    /// A gRPC `INVALID_ARGUMENT` error: the proxy's `failure_mode` decides.
    Error,
}

/// One limit of a policy in the service's Lua units, with its name (`Policy::limit_name`): a
/// policy with several limits keeps one Redis key per limit, named after it (plan.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedLimit {
    pub name: String,
    pub limit: BucketLimit,
}

/// One domain: the filter config, plus each policy's limits (one to four, in the config's
/// order) in the service's Lua units.
#[derive(Debug, Clone)]
pub struct Domain {
    pub config: Config,
    pub default_limits: Vec<NamedLimit>,
    /// Same order as `config.tenants`.
    pub tenant_limits: Vec<Vec<NamedLimit>>,
    /// Same order as `config.plans`.
    pub plan_limits: Vec<Vec<NamedLimit>>,
    /// A listed tenant without a named plan, over each plan (`Policy::on_plans`), by tenant
    /// then plan; empty when the domain has no `plan_from`.
    pub tenant_plan_limits: Vec<Vec<Vec<NamedLimit>>>,
    /// Named rules with their own limit, from every rule list (top level, tenants', plans';
    /// names are unique across the config): (name, limits).
    pub rules: Vec<(String, Vec<NamedLimit>)>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub domains: BTreeMap<String, Domain>,
    pub tenant_key: String,
    pub rule_key: String,
    /// The descriptor entry naming the request's plan (`plans`), e.g. the filter's
    /// `global.plan_key`.
    pub plan_key: String,
    pub unmatched: Unmatched,
    pub max_descriptors: usize,
}

/// A config error, displayed as one line naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(pub ConfigError);

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.field.is_empty() {
            write!(f, "invalid service config: {}", self.0.reason)
        } else {
            write!(f, "invalid service config: field `{}`: {}", self.0.field, self.0.reason)
        }
    }
}

fn err<T>(field: &str, reason: impl Into<String>) -> Result<T, SettingsError> {
    Err(SettingsError(ConfigError { field: field.to_string(), reason: reason.into() }))
}

fn name(field: &str, v: &Value) -> Result<String, SettingsError> {
    match v.as_str() {
        Some(s) if !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_graphic()) => Ok(s.to_string()),
        _ => err(field, format!("must be 1 to {MAX_NAME} visible ASCII characters")),
    }
}

impl Settings {
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Settings, SettingsError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| SettingsError(ConfigError { field: String::new(), reason: format!("not valid JSON: {e}") }))?;
        Settings::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Settings, SettingsError> {
        let Some(top) = value.as_object() else {
            return err("", "the config must be a JSON object {\"domains\": {...}}");
        };
        for key in top.keys() {
            if !TOP_FIELDS.contains(&key.as_str()) {
                return err(key, format!("unknown field; expected one of: {}", TOP_FIELDS.join(", ")));
            }
        }
        let Some(domains_value) = top.get("domains") else {
            return err("domains", "required field is missing");
        };
        let Some(domain_map) = domains_value.as_object() else {
            return err("domains", "must be an object of domain name -> limits");
        };
        if domain_map.is_empty() {
            return err("domains", "needs at least one domain");
        }
        let mut domains = BTreeMap::new();
        for (domain, limits) in domain_map {
            let field = format!("domains.{domain}");
            name(&field, &Value::String(domain.clone()))?;
            let limits = tenant_ratelimit::json::Value::from(limits);
            let config = Config::from_value_at(&field, &limits).map_err(SettingsError)?;
            domains.insert(domain.clone(), Domain::new(&field, config)?);
        }
        let tenant_key = match top.get("tenant_key") {
            Some(v) => name("tenant_key", v)?,
            None => "tenant".to_string(),
        };
        let rule_key = match top.get("rule_key") {
            Some(v) => name("rule_key", v)?,
            None => "rule".to_string(),
        };
        if rule_key == tenant_key {
            return err("rule_key", "must differ from tenant_key");
        }
        let plan_key = match top.get("plan_key") {
            Some(v) => name("plan_key", v)?,
            None => "plan".to_string(),
        };
        if plan_key == tenant_key || plan_key == rule_key {
            return err("plan_key", "must differ from tenant_key and rule_key");
        }
        let unmatched = match top.get("unmatched").map(|v| v.as_str()) {
            None | Some(Some("ok")) => Unmatched::Ok,
            Some(Some("error")) => Unmatched::Error,
            Some(_) => return err("unmatched", "must be \"ok\" or \"error\""),
        };
        let max_descriptors = match top.get("max_descriptors") {
            None => DEFAULT_MAX_DESCRIPTORS,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=1024).contains(&n) => n,
                _ => return err("max_descriptors", "must be an integer from 1 to 1024"),
            },
        } as usize;
        Ok(Settings { domains, tenant_key, rule_key, plan_key, unmatched, max_descriptors })
    }
}

impl Domain {
    fn new(field: &str, config: Config) -> Result<Domain, SettingsError> {
        // Errors name the policy (its one limit) or `<policy>.limits[i]` (one of several).
        let check = |path: String, p: &Policy| -> Result<Vec<NamedLimit>, SettingsError> {
            // The filter's config gives every policy at least one limit; a policy with none
            // would debit nothing, so it is an error rather than an unlimited tenant.
            if p.limits.is_empty() {
                return err(&path, "has no limit");
            }
            let several = p.limits.len() > 1;
            p.limits
                .iter()
                .enumerate()
                .map(|(i, l)| match limit_units(l) {
                    Ok(limit) => Ok(NamedLimit { name: p.limit_name(i).to_string(), limit }),
                    Err(reason) => {
                        let field = if several { format!("{path}.limits[{i}]") } else { path.clone() };
                        Err(SettingsError(ConfigError { field, reason }))
                    }
                })
                .collect()
        };
        let default_limits = check(field.to_string(), &config.default_policy)?;
        let tenant_limits = config
            .tenants
            .iter()
            .map(|p| check(format!("{field}.tenants.{}", p.name), p))
            .collect::<Result<Vec<_>, _>>()?;
        let plan_limits = config
            .plans
            .iter()
            .map(|p| check(format!("{field}.plans.{}", p.name), p))
            .collect::<Result<Vec<_>, _>>()?;
        let tenant_plan_limits = config
            .tenants
            .iter()
            .map(|t| t.on_plans.iter().map(|p| check(format!("{field}.tenants.{}", t.name), p)).collect())
            .collect::<Result<Vec<_>, _>>()?;
        let mut rules: Vec<(String, Vec<NamedLimit>)> = Vec::new();
        for rule in config.all_rules() {
            if let Some(p) = &rule.policy {
                rules.push((p.name.clone(), check(format!("{field}: rule {}", p.name), p)?));
            }
        }
        // A rule's keys end `:r:<rule>` or, with several limits, `:r:<rule>:l:<limit>`. Rule
        // names may contain `:`, so a rule named `up:l:day` would share a key with rule `up`'s
        // limit `day`: refused, naming the rule, rather than two policies debiting one bucket.
        let mut suffixes = std::collections::BTreeSet::new();
        for (name, limits) in &rules {
            for l in limits {
                if !suffixes.insert(limit_key(&format!("r:{name}"), limits, l)) {
                    return err(
                        &format!("{field}: rule {name}"),
                        "its Redis key is also another rule's (a rule name ending `:l:<limit>` of a rule with \
                         several limits): rename the rule",
                    );
                }
            }
        }
        Ok(Domain { config, default_limits, tenant_limits, plan_limits, tenant_plan_limits, rules })
    }

    /// The plan of a request: a listed tenant's named plan, else the descriptor's `plan`
    /// entry if it names a plan, else `default_plan` (as `tenant.plan_from` in the filter).
    fn plan_of(&self, tenant: Option<usize>, plan: Option<&str>) -> Option<usize> {
        let named = tenant.and_then(|i| self.config.tenants.get(i)).and_then(|t| t.plan);
        named.or_else(|| plan.and_then(|p| self.config.plan_index(p.as_bytes()))).or(self.config.default_plan)
    }

    /// The bucket id and limits of a tenant on a plan (the descriptor's plan entry, if any):
    /// listed tenants have their own bucket, with their limits (over the plan, for one without
    /// a named plan); unlisted ones get the plan's limits (else the top level's), each its own
    /// bucket or, under `unknown_tenants: shared`, one bucket per plan.
    pub fn tenant(&self, tenant: &str, plan: Option<&str>) -> (Option<String>, &[NamedLimit]) {
        let listed = self.config.tenant_index(tenant.as_bytes());
        let plan = self.plan_of(listed, plan);
        if let Some(i) = listed {
            let over_plan = plan.and_then(|p| self.tenant_plan_limits.get(i)?.get(p));
            let own = self.tenant_limits.get(i).unwrap_or(&self.default_limits);
            return (Some(tenant.to_string()), over_plan.unwrap_or(own));
        }
        let limits = plan.and_then(|p| self.plan_limits.get(p)).unwrap_or(&self.default_limits);
        match (self.config.unknown_tenants, plan.and_then(|p| self.config.plans.get(p))) {
            (UnknownTenants::Separate, _) => (Some(tenant.to_string()), limits),
            (UnknownTenants::Shared, None) => (None, limits),
            // Tenant ids never contain NUL: no tenant can name a plan's shared bucket.
            (UnknownTenants::Shared, Some(p)) => (Some(format!("\0plan\0{}", p.name)), limits),
        }
    }

    pub fn rule(&self, name: &str) -> Option<&[NamedLimit]> {
        self.rules.iter().find(|(n, _)| n == name).map(|(_, l)| l.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capacity of a one-limit policy.
    fn cap(limits: &[NamedLimit]) -> u64 {
        assert_eq!(limits.len(), 1);
        limits[0].limit.capacity
    }

    fn field_of(s: &str) -> String {
        match Settings::from_json_bytes(s.as_bytes()) {
            Ok(_) => panic!("accepted: {s}"),
            Err(e) => e.0.field,
        }
    }

    #[test]
    fn parses_domains_with_the_filter_schema() {
        let s = Settings::from_json_bytes(
            br#"{"domains": {"tenants": {"capacity": 3, "refill_rate": "60/min",
                 "tenants": {"acme": {"capacity": 10}},
                 "rules": [{"name": "upload", "path_prefix": "/up", "capacity": 2, "refill_rate": 1}]}},
                 "unmatched": "error"}"#,
        )
        .unwrap();
        let d = &s.domains["tenants"];
        assert_eq!(cap(&d.default_limits), 3);
        assert_eq!(cap(d.tenant("acme", None).1), 10);
        assert_eq!(d.tenant("other", None), (Some("other".to_string()), d.default_limits.as_slice()));
        assert_eq!(cap(d.rule("upload").unwrap()), 2);
        assert!(d.rule("nope").is_none());
        assert_eq!(s.unmatched, Unmatched::Error);
        assert_eq!((s.tenant_key.as_str(), s.rule_key.as_str()), ("tenant", "rule"));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(r#"{"domains": {"d": {"capacity": 1, "refill_rate": 1, "tenants": {"x": {"capacity": 0}}}}}"#),
            "domains.d.tenants.x.capacity"
        );
        assert_eq!(field_of(r#"{"domains": {"d": {"refill_rate": 1}}}"#), "domains.d.capacity");
        assert_eq!(field_of(r#"{"domains": {"d": 5}}"#), "domains.d");
        assert_eq!(field_of(r#"{"domain": {}}"#), "domain");
        assert_eq!(field_of(r#"{"domains": {}}"#), "domains");
        assert_eq!(
            field_of(r#"{"domains": {"d": {"capacity": 1, "refill_rate": 1}}, "unmatched": "deny"}"#),
            "unmatched"
        );
        // Too slow to refill for the Lua representation (see units.rs): named, not truncated.
        assert_eq!(field_of(r#"{"domains": {"d": {"capacity": 1000, "refill_rate": "1/day"}}}"#), "domains.d");
        assert_eq!(
            field_of(
                r#"{"domains": {"d": {"capacity": 1, "refill_rate": 1, "tenants": {"slow": {"capacity": 500, "refill_rate": "1/day"}}}}}"#
            ),
            "domains.d.tenants.slow"
        );
    }

    #[test]
    fn several_limits_are_enforced_one_each_by_name() {
        let two = r#"[{"name": "minute", "capacity": 5, "refill_rate": "5/min"},
                      {"name": "hour", "capacity": 50, "refill_rate": "50/h"}]"#;
        let s = Settings::from_json_bytes(
            format!(
                r#"{{"domains": {{"d": {{"limits": {two}, "tenants": {{"acme": {{"capacity": 9, "refill_rate": 1}}, "inherits": {{}}}},
                     "plans": {{"pro": {{"limits": {two}}}}},
                     "rules": [{{"name": "up", "path_prefix": "/up", "limits": {two}}}]}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let d = &s.domains["d"];
        let names = |l: &[NamedLimit]| l.iter().map(|n| (n.name.clone(), n.limit.capacity)).collect::<Vec<_>>();
        let both = vec![("minute".to_string(), 5), ("hour".to_string(), 50)];
        assert_eq!(names(&d.default_limits), both);
        // A tenant with no limit fields inherits every top-level limit, under its name.
        assert_eq!(names(d.tenant("inherits", None).1), both);
        assert_eq!(names(d.tenant("x", Some("pro")).1), both);
        assert_eq!(cap(d.tenant("acme", None).1), 9);
        assert_eq!(names(d.rule("up").unwrap()), both);
        // 5/min and 50/h refill in 1 min and 1 h: different intervals, one per limit.
        assert_ne!(d.default_limits[0].limit.interval, d.default_limits[1].limit.interval);
        // One entry in `limits` is one limit.
        let one = r#"{"domains": {"d": {"limits": [{"name": "m", "capacity": 5, "refill_rate": 1}]}}}"#;
        assert_eq!(cap(&Settings::from_json_bytes(one.as_bytes()).unwrap().domains["d"].default_limits), 5);
    }

    #[test]
    fn a_limit_too_slow_for_the_service_is_named() {
        // Several limits: `<policy>.limits[i]`; one: the policy, as before.
        let slow = r#"[{"name": "m", "capacity": 5, "refill_rate": 1}, {"name": "y", "capacity": 1000, "refill_rate": "1/day"}]"#;
        assert_eq!(field_of(&format!(r#"{{"domains": {{"d": {{"limits": {slow}}}}}}}"#)), "domains.d.limits[1]");
        assert_eq!(
            field_of(&format!(
                r#"{{"domains": {{"d": {{"capacity": 1, "refill_rate": 1, "tenants": {{"acme": {{"limits": {slow}}}}}}}}}}}"#
            )),
            "domains.d.tenants.acme.limits[1]"
        );
        assert_eq!(
            field_of(&format!(
                r#"{{"domains": {{"d": {{"capacity": 1, "refill_rate": 1, "plans": {{"pro": {{"limits": {slow}}}}}}}}}}}"#
            )),
            "domains.d.plans.pro.limits[1]"
        );
        assert_eq!(
            field_of(&format!(
                r#"{{"domains": {{"d": {{"capacity": 1, "refill_rate": 1, "rules": [{{"name": "up", "limits": {slow}}}]}}}}}}"#
            )),
            "domains.d: rule up.limits[1]"
        );
    }

    #[test]
    fn rule_keys_cannot_collide() {
        // Rule `up` with limits `a` and `day` has keys `...:r:up:l:a` and `...:r:up:l:day`: a
        // rule named `up:l:day` would debit the same key.
        let two =
            r#"[{"name": "a", "capacity": 5, "refill_rate": 1}, {"name": "day", "capacity": 50, "refill_rate": 1}]"#;
        let config = format!(
            r#"{{"domains": {{"d": {{"capacity": 1, "refill_rate": 1,
                 "rules": [{{"name": "up", "path_prefix": "/a", "limits": {two}}},
                           {{"name": "up:l:day", "path_prefix": "/b", "capacity": 1, "refill_rate": 1}}]}}}}}}"#
        );
        assert_eq!(field_of(&config), "domains.d: rule up:l:day");
        // Without the clash, `:` in a rule name is fine.
        let fine = config.replace("up:l:day", "up:l:week");
        assert!(Settings::from_json_bytes(fine.as_bytes()).is_ok());
    }

    #[test]
    fn shared_unknown_tenants_share_one_bucket() {
        let s = Settings::from_json_bytes(
            br#"{"domains": {"d": {"capacity": 3, "refill_rate": 1, "unknown_tenants": "shared", "tenants": {"a": {}}}}}"#,
        )
        .unwrap();
        let d = &s.domains["d"];
        assert_eq!(d.tenant("x", None).0, None);
        assert_eq!(d.tenant("a", None).0.as_deref(), Some("a"));
    }

    #[test]
    fn plans_pick_the_limit_as_in_the_filter() {
        let s = Settings::from_json_bytes(
            br#"{"domains": {"d": {"capacity": 3, "refill_rate": "60/min", "unknown_tenants": "shared",
                 "plans": {"free": {"capacity": 5}, "pro": {"capacity": 50, "refill_rate": "50/day"}},
                 "tenant": {"plan_from": [{"header": "x-plan"}], "default_plan": "free"},
                 "tenants": {"acme": {"plan": "pro"}, "initech": {"capacity": 7}}}}}"#,
        )
        .unwrap();
        assert_eq!(s.plan_key, "plan");
        let d = &s.domains["d"];
        let cap = |t: &str, p: Option<&str>| cap(d.tenant(t, p).1);
        assert_eq!((cap("x", None), cap("x", Some("pro")), cap("x", Some("gold"))), (5, 50, 5));
        assert_eq!((cap("acme", Some("free")), cap("acme", None)), (50, 50));
        assert_eq!(cap("initech", Some("pro")), 7);
        // initech's rate comes from its plan: pro refills 50/day, free (the default) 60/min.
        assert_ne!(d.tenant("initech", Some("pro")).1, d.tenant("initech", None).1);
        // Shared unlisted tenants: one bucket per plan.
        assert_eq!(d.tenant("x", Some("pro")).0, d.tenant("y", Some("pro")).0);
        assert_ne!(d.tenant("x", Some("pro")).0, d.tenant("x", None).0);
        assert_eq!(
            field_of(r#"{"domains": {"d": {"capacity": 1, "refill_rate": 1}}, "plan_key": "tenant"}"#),
            "plan_key"
        );
    }
}
