//! The service config file: `{"domains": {"<domain>": <limits>}, ...}`. Each domain's limits
//! are a filter plugin config, parsed by the filter's own code (`tenant_ratelimit::config`),
//! so one definition of a tenant's limits serves the sidecar and the fleet. Errors name the
//! field (`domains.acme.tenants.x.capacity`), as in the filter.

use crate::units::{limit_units, BucketLimit};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use tenant_ratelimit::config::{Config, ConfigError, Policy, UnknownTenants};

const TOP_FIELDS: &[&str] = &["domains", "tenant_key", "rule_key", "unmatched", "max_descriptors"];
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

/// One domain: the filter config, plus each policy's limit in the service's Lua units.
#[derive(Debug, Clone)]
pub struct Domain {
    pub config: Config,
    pub default_limit: BucketLimit,
    /// Same order as `config.tenants`.
    pub tenant_limits: Vec<BucketLimit>,
    /// Named rules with their own limit: (name, limit).
    pub rules: Vec<(String, BucketLimit)>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub domains: BTreeMap<String, Domain>,
    pub tenant_key: String,
    pub rule_key: String,
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
            let config = Config::from_value_at(&field, limits).map_err(SettingsError)?;
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
        Ok(Settings { domains, tenant_key, rule_key, unmatched, max_descriptors })
    }
}

impl Domain {
    fn new(field: &str, config: Config) -> Result<Domain, SettingsError> {
        let check = |path: String, p: &Policy| -> Result<BucketLimit, SettingsError> {
            // One Redis key per bucket, one limit each: a policy with several `limits` is
            // refused by name rather than enforced on one of its limits.
            if p.limits.len() > 1 {
                let field = format!("{path}.limits");
                let reason = "the rate-limit service enforces one limit per policy; several `limits` are local only \
                              (give this policy capacity and refill_rate here)"
                    .to_string();
                return Err(SettingsError(ConfigError { field, reason }));
            }
            limit_units(&p.limits.first()).map_err(|reason| SettingsError(ConfigError { field: path, reason }))
        };
        let default_limit = check(field.to_string(), &config.default_policy)?;
        let tenant_limits = config
            .tenants
            .iter()
            .map(|p| check(format!("{field}.tenants.{}", p.name), p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rules = Vec::new();
        for (i, rule) in config.rules.iter().enumerate() {
            if let Some(p) = &rule.policy {
                rules.push((p.name.clone(), check(format!("{field}.rules[{i}]"), p)?));
            }
        }
        Ok(Domain { config, default_limit, tenant_limits, rules })
    }

    /// The bucket id and limit of a tenant: listed tenants have their own; unlisted ones get
    /// the top-level limit, each its own bucket or one shared bucket (`unknown_tenants`).
    pub fn tenant<'a>(&'a self, tenant: &'a str) -> (Option<&'a str>, BucketLimit) {
        match self.config.tenant_index(tenant.as_bytes()) {
            Some(i) => (Some(tenant), self.tenant_limits.get(i).copied().unwrap_or(self.default_limit)),
            None => match self.config.unknown_tenants {
                UnknownTenants::Separate => (Some(tenant), self.default_limit),
                UnknownTenants::Shared => (None, self.default_limit),
            },
        }
    }

    pub fn rule(&self, name: &str) -> Option<BucketLimit> {
        self.rules.iter().find(|(n, _)| n == name).map(|(_, l)| *l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(d.default_limit.capacity, 3);
        assert_eq!(d.tenant("acme").1.capacity, 10);
        assert_eq!(d.tenant("other"), (Some("other"), d.default_limit));
        assert_eq!(d.rule("upload").unwrap().capacity, 2);
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
    fn several_limits_are_refused_by_name() {
        let two =
            r#"[{"name": "m", "capacity": 5, "refill_rate": 1}, {"name": "h", "capacity": 50, "refill_rate": 1}]"#;
        assert_eq!(field_of(&format!(r#"{{"domains": {{"d": {{"limits": {two}}}}}}}"#)), "domains.d.limits");
        assert_eq!(
            field_of(&format!(
                r#"{{"domains": {{"d": {{"capacity": 1, "refill_rate": 1, "tenants": {{"acme": {{"limits": {two}}}}}}}}}}}"#
            )),
            "domains.d.tenants.acme.limits"
        );
        // One entry in `limits` is one limit: accepted.
        let one = r#"{"domains": {"d": {"limits": [{"name": "m", "capacity": 5, "refill_rate": 1}]}}}"#;
        assert_eq!(Settings::from_json_bytes(one.as_bytes()).unwrap().domains["d"].default_limit.capacity, 5);
    }

    #[test]
    fn shared_unknown_tenants_share_one_bucket() {
        let s = Settings::from_json_bytes(
            br#"{"domains": {"d": {"capacity": 3, "refill_rate": 1, "unknown_tenants": "shared", "tenants": {"a": {}}}}}"#,
        )
        .unwrap();
        let d = &s.domains["d"];
        assert_eq!(d.tenant("x").0, None);
        assert_eq!(d.tenant("a").0, Some("a"));
    }
}
