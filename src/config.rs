//! The plugin configuration: JSON in, a checked [`Config`] or a [`ConfigError`] naming the
//! field out.
//!
//! We walk a JSON [`Value`] (our small reader, `json.rs`) by hand instead of deriving a
//! deserializer because such messages point at a line and column, not at the field path (`tenants.acme.capacity`), and
//! operators read these errors in an Envoy log without the JSON in front of them.
//! Unknown fields are errors everywhere: a typo must never silently disable a limit.

use crate::bucket::{Limit, Limits, MAX_CAPACITY, MAX_LIMITS, MAX_RATE, MIN_RATE};
use crate::json::{Map, Value};
use crate::rate::parse_rate;
use crate::tenant::{is_valid_tenant_id, TenantSource, MAX_TENANT_LEN};
use std::fmt;

/// The default tenant source list: header `x-tenant-id`, then query parameter `tenant`.
const DEFAULT_TENANT_HEADER: &str = "x-tenant-id";
const DEFAULT_TENANT_QUERY: &str = "tenant";
const DEFAULT_DENY_BODY: &str = "{\"error\":\"Too Many Requests\"}";
const DEFAULT_DENY_CONTENT_TYPE: &str = "application/json";
const DEFAULT_MAX_TENANTS: u32 = 10_000;
const MAX_MAX_TENANTS: u64 = 10_000_000;
const MAX_DENY_BODY: usize = 64 * 1024;
/// RESOURCE_EXHAUSTED: what Envoy's own rate-limit filters answer gRPC clients with
/// (`rate_limited_as_resource_exhausted`); UNAVAILABLE (14) would invite an immediate retry.
const DEFAULT_GRPC_STATUS: u32 = 8;
const DEFAULT_GRPC_MESSAGE: &str = "Too Many Requests";
/// A `grpc-message` travels in a header; keep it well under Envoy's header size limits.
const MAX_GRPC_MESSAGE: usize = 1024;
const MAX_XFF_HOPS: u64 = 64;

/// A config problem: which field, and why. Displayed as one line for Envoy's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid plugin config: {}", self.reason)
        } else {
            write!(f, "invalid plugin config: field `{}`: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err<T>(field: &str, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { field: field.to_string(), reason: reason.into() })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Shadow,
}

/// What a request gets when what decides it fails: shared data (`on_store_error`) or the
/// rate-limit service (`global.failure_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    Off,
    /// `x-ratelimit-limit`, `-remaining`, `-reset` (draft 03, as Envoy's local_ratelimit).
    XRateLimit,
    /// `RateLimit` and `RateLimit-Policy` of draft-ietf-httpapi-ratelimit-headers-10.
    Ietf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTenants {
    /// Each tenant not listed in `tenants` gets its own bucket with the top-level limit.
    Separate,
    /// All unlisted tenants share one bucket with the top-level limit.
    Shared,
}

/// What happens to a new tenant whose candidate slots are all held by live buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Deny,
    /// One bucket shared by every tenant that found no slot.
    Bucket(Limit),
}

/// Which decision the rate-limit service takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalMode {
    /// Every metered request asks the service (or spends a lease it granted).
    Global,
    /// The local bucket sheds first; requests it admits then ask the service.
    Both,
}

/// `global`: a rate-limit service speaking envoy.service.ratelimit.v3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    /// The Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    /// When the service errors or times out.
    pub failure_mode: FailurePolicy,
    pub mode: GlobalMode,
    /// Descriptor entry keys: the tenant always, method and path when set.
    pub tenant_key: String,
    pub method_key: Option<String>,
    pub path_key: Option<String>,
    /// The entry key naming the request's plan (`plans`), sent when set and the request has
    /// a plan: the fleet service gives unlisted tenants that plan's limit.
    pub plan_key: Option<String>,
    /// Ask for this many tokens at once and spend them locally until the window ends.
    pub lease_tokens: Option<u32>,
}

/// A policy: its limits (one, or several in `limits`), what the operator called it (for
/// stats and per-name counters) and whether it may deny.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// The bucket math of every limit, in order: what the request path uses.
    pub limits: Limits,
    /// Per limit, same order: its name and rate as written.
    pub about: Vec<LimitInfo>,
    /// Per-entry mode; `None` follows the top-level `mode`.
    pub mode: Option<Mode>,
    /// Per-entry `enforce_percent` (0 to 100); `None` follows `mode`, else the top level.
    /// An entry sets at most one of the two.
    pub enforce_percent: Option<u8>,
    /// A listed tenant's named plan (`"plan"`), an index into `Config::plans`.
    pub plan: Option<usize>,
    /// A listed tenant without a named plan, when `tenant.plan_from` is set: its entry
    /// resolved over each plan, by plan index, for requests whose plan comes from
    /// `plan_from`. Empty otherwise (the entry itself was resolved over `default_plan`).
    pub on_plans: Vec<Policy>,
}

/// What a limit is called (`RateLimit` headers, per-limit stats; the policy's own name for
/// the `capacity`/`refill_rate` form) and its tokens per second as written (what a tenant
/// without its own `refill_rate` inherits, what the checker prints).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitInfo {
    pub name: String,
    pub rate_per_second: f64,
}

impl Policy {
    /// A policy with no limits yet.
    fn new(name: &str, mode: Option<Mode>) -> Policy {
        Policy {
            name: name.to_string(),
            limits: Limits::default(),
            about: Vec::new(),
            mode,
            enforce_percent: None,
            plan: None,
            on_plans: Vec::new(),
        }
    }

    /// The name of limit `i` (the policy's name if there is no such limit).
    pub fn limit_name(&self, i: usize) -> &str {
        self.about.get(i).map_or(self.name.as_str(), |a| a.name.as_str())
    }
}

/// The id stored with a limit's state in a record of several limits (the hash of its name),
/// so a reconfiguration that reorders, adds or removes limits keeps each one's spent tokens.
fn limit_id(name: &str) -> u64 {
    crate::store::hash128(&[name.as_bytes()]) as u64
}

/// The id of a policy's only limit: a one-limit record stores no id and reads as this one
/// (see `store::Record`), so it must compare equal.
const ONE_LIMIT_ID: u64 = 0;

pub use crate::rules::{Rule, RuleSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Deny {
    /// HTTP status of the reply to a plain HTTP request (gRPC replies are HTTP 200).
    pub status: u32,
    pub body: String,
    pub content_type: String,
    /// The `grpc-status` of the reply to a gRPC request, 1 to 16.
    pub grpc_status: u32,
    /// The `grpc-message`, already percent-encoded as the gRPC wire format requires.
    pub grpc_message: String,
}

impl Default for Deny {
    fn default() -> Deny {
        Deny {
            status: 429,
            body: DEFAULT_DENY_BODY.into(),
            content_type: DEFAULT_DENY_CONTENT_TYPE.into(),
            grpc_status: DEFAULT_GRPC_STATUS,
            grpc_message: DEFAULT_GRPC_MESSAGE.into(),
        }
    }
}

/// Percent-encodes a `grpc-message` the way the gRPC HTTP/2 protocol spells it: bytes
/// outside visible ASCII and space, and `%` itself, become `%XX`.
fn grpc_percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            for nibble in [b >> 4, b & 0x0f] {
                out.push(char::from(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0')));
            }
        }
    }
    out
}

/// The checked configuration the filter runs with. Built once per `on_configure`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The top-level limit, for the default tenant and tenants not listed.
    pub default_policy: Policy,
    pub tenant_sources: Vec<TenantSource>,
    pub default_tenant: String,
    /// Named policies (tiers), sorted by name; see [`Config::plan_index`].
    pub plans: Vec<Policy>,
    /// `tenant.plan_from`: where a request's plan name comes from (first present wins).
    pub plan_sources: Vec<TenantSource>,
    /// `tenant.default_plan`: the plan of requests with no plan or an unknown plan name.
    pub default_plan: Option<usize>,
    /// Listed tenants, sorted by name for binary search (no hashing, no randomness).
    pub tenants: Vec<Policy>,
    /// Empty means: every request is metered at cost 1.
    pub rules: RuleSet,
    /// The listed tenants' own rules, by index in `tenants`; empty when no tenant has any.
    pub tenant_rules: Vec<RuleSet>,
    /// Each plan's own rules, by index in `plans`; empty when no plan has rules.
    pub plan_rules: Vec<RuleSet>,
    pub deny: Deny,
    pub headers: HeaderStyle,
    pub mode: Mode,
    pub on_store_error: FailurePolicy,
    pub max_tenants: u32,
    pub overflow: Overflow,
    pub unknown_tenants: UnknownTenants,
    /// `near_limit` counts admissions leaving less than this share of capacity, in 1/1000s.
    pub near_limit_permille: u32,
    /// `None` when `global` is absent or its mode is `local`.
    pub global: Option<Global>,
    /// Tokens a worker may lease from a rich bucket (0 = off); see worker_lease.rs.
    pub worker_lease: u64,
    /// The share of local denials enforced (0 to 100; the rest pass as shadow denials).
    pub enforce_percent: u8,
    /// `shadow_header`: a request header telling the upstream which policy would have denied
    /// a request that passed as a shadow denial.
    pub shadow_header: Option<String>,
    /// `filter_state`: publish each decision as filter state `wasm.tenant_ratelimit` (for
    /// access logs).
    pub filter_state: bool,
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Config, ConfigError> {
        let value: Value = crate::json::parse(bytes)
            .map_err(|e| ConfigError { field: String::new(), reason: format!("not valid JSON: {e}") })?;
        Config::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        let obj = Fields::new("", value, TOP_FIELDS)?;
        let mut default_policy = Policy::new("default", None);
        policy_limits(&obj, None, &mut default_policy)?;
        // The overflow bucket has one limit: by default the top level's (its first).
        let default_limit = default_policy.limits.first();

        let plans = match obj.get("plans") {
            Some(v) => plans_section(v, &default_policy)?,
            None => Vec::new(),
        };
        let TenantSection { sources: tenant_sources, default: default_tenant, plan_sources, default_plan } =
            match obj.get("tenant") {
                Some(v) => tenant_section(v, &plans)?,
                None => TenantSection {
                    sources: default_sources(),
                    default: "default".to_string(),
                    plan_sources: Vec::new(),
                    default_plan: None,
                },
            };
        let tenants = match obj.get("tenants") {
            Some(v) => {
                let plans = Plans { list: &plans, default: default_plan, dynamic: !plan_sources.is_empty() };
                tenants_section(v, &default_policy, &plans)?
            }
            None => Vec::new(),
        };
        let crate::rules::parse::Sections { top: rules, tenants: tenant_rules, plans: plan_rules } =
            crate::rules::parse::sections(obj.get("rules"), obj.get("tenants"), &tenants, obj.get("plans"), &plans)?;
        let deny = match obj.get("deny") {
            Some(v) => deny_section(v)?,
            None => Deny::default(),
        };
        let headers = match obj.get("rate_limit_headers") {
            None => HeaderStyle::XRateLimit,
            Some(Value::Bool(true)) => HeaderStyle::XRateLimit,
            Some(Value::Bool(false)) => HeaderStyle::Off,
            Some(v) => match one_of(&obj.path("rate_limit_headers"), v, &["x-ratelimit", "ietf", "off"])? {
                "ietf" => HeaderStyle::Ietf,
                "off" => HeaderStyle::Off,
                _ => HeaderStyle::XRateLimit,
            },
        };
        let mode = match obj.get("mode") {
            None => Mode::Enforce,
            Some(v) => mode(&obj.path("mode"), v)?,
        };
        let on_store_error = match obj.get("on_store_error") {
            None => FailurePolicy::Allow,
            Some(v) => failure_policy(&obj.path("on_store_error"), v)?,
        };
        let max_tenants = match obj.get("max_tenants") {
            None => DEFAULT_MAX_TENANTS,
            Some(v) => int_in(&obj.path("max_tenants"), v, 1, MAX_MAX_TENANTS)? as u32,
        };
        let overflow = match obj.get("overflow") {
            None => Overflow::Bucket(default_limit),
            Some(v) => overflow_section(v)?,
        };
        let unknown_tenants = match obj.get("unknown_tenants") {
            None => UnknownTenants::Separate,
            Some(v) => match one_of(&obj.path("unknown_tenants"), v, &["separate", "shared"])? {
                "shared" => UnknownTenants::Shared,
                _ => UnknownTenants::Separate,
            },
        };
        let near_limit_permille = match obj.get("near_limit_fraction") {
            None => 200,
            Some(v) => {
                let f = v.as_f64().filter(|f| (0.0..=1.0).contains(f));
                match f {
                    Some(f) => (f * 1000.0).round() as u32,
                    None => return err("near_limit_fraction", "must be a number from 0 to 1, e.g. 0.2"),
                }
            }
        };
        let global = match obj.get("global") {
            None => None,
            Some(v) => global_section(v)?,
        };
        let worker_lease = match obj.get("worker_lease") {
            None => 0,
            Some(v) => int_in("worker_lease", v, 0, 1_000_000)?,
        };
        let enforce_percent = match obj.get("enforce_percent") {
            None => 100,
            Some(_) if obj.get("mode").is_some() => {
                return err("enforce_percent", "set either `mode` or `enforce_percent`, not both")
            }
            Some(v) => percent("enforce_percent", v)?,
        };
        let shadow_header = match obj.get("shadow_header") {
            None => None,
            Some(v) => {
                let name = string("shadow_header", v)?;
                if !is_header_name(name) || name.bytes().any(|b| b.is_ascii_uppercase()) {
                    return err("shadow_header", "must be a lower-case header name, e.g. \"x-ratelimit-would-deny\"");
                }
                Some(name.to_string())
            }
        };
        let filter_state = match obj.get("filter_state") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return err("filter_state", format!("must be true or false, got {}", shown(v))),
        };
        Ok(Config {
            worker_lease,
            enforce_percent,
            shadow_header,
            filter_state,
            global,
            default_policy,
            tenant_sources,
            default_tenant,
            plans,
            plan_sources,
            default_plan,
            tenants,
            rules,
            tenant_rules,
            plan_rules,
            deny,
            headers,
            mode,
            on_store_error,
            max_tenants,
            overflow,
            unknown_tenants,
            near_limit_permille,
        })
    }

    /// Parses a config nested inside a larger document (the rate-limit service's
    /// `domains.<name>`): the same checks as [`Config::from_value`], with every error's field
    /// path prefixed, e.g. `domains.acme.tenants.x.capacity`.
    pub fn from_value_at(prefix: &str, value: &Value) -> Result<Config, ConfigError> {
        Config::from_value(value).map_err(|e| {
            let field = if e.field.is_empty() { prefix.to_string() } else { join(prefix, &e.field) };
            ConfigError { field, ..e }
        })
    }

    /// The index in `tenants` of a listed tenant.
    pub fn tenant_index(&self, tenant: &[u8]) -> Option<usize> {
        self.tenants.binary_search_by(|p| p.name.as_bytes().cmp(tenant)).ok()
    }

    /// The index in `plans` of a plan name.
    pub fn plan_index(&self, name: &[u8]) -> Option<usize> {
        plan_index(&self.plans, name)
    }
}

fn plan_index(plans: &[Policy], name: &[u8]) -> Option<usize> {
    plans.binary_search_by(|p| p.name.as_bytes().cmp(name)).ok()
}

const TOP_FIELDS: &[&str] = &[
    "capacity",
    "refill_rate",
    "limits",
    "tenant",
    "tenants",
    "plans",
    "rules",
    "deny",
    "rate_limit_headers",
    "mode",
    "on_store_error",
    "max_tenants",
    "overflow",
    "unknown_tenants",
    "near_limit_fraction",
    "global",
    "worker_lease",
    "enforce_percent",
    "shadow_header",
    "filter_state",
];

/// An object whose keys were checked against the allowed list, with its path for messages.
pub(crate) struct Fields<'a> {
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(prefix: &str, value: &'a Value, allowed: &[&str]) -> Result<Fields<'a>, ConfigError> {
        let Some(map) = value.as_object() else {
            let what = if prefix.is_empty() { "the config" } else { "this field" };
            return err(prefix, format!("{what} must be a JSON object, got {}", kind(value)));
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                // An empty key would otherwise produce an error naming no field.
                let field = join(prefix, if key.is_empty() { "\"\"" } else { key });
                return err(&field, format!("unknown field; expected one of: {}", allowed.join(", ")));
            }
        }
        Ok(Fields { prefix: prefix.to_string(), map })
    }

    pub(crate) fn path(&self, key: &str) -> String {
        join(&self.prefix, key)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    pub(crate) fn required(&self, key: &str) -> Result<&'a Value, ConfigError> {
        match self.map.get(key) {
            Some(v) => Ok(v),
            None => err(&self.path(key), "required field is missing"),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Bounds as text: formatting an f64 would pull ~20 KB of float printing into the module.
const MIN_RATE_TEXT: &str = "0.000001";
const MAX_RATE_TEXT: &str = "1000000000000";

/// A JSON value for an error message, without float formatting (see above) and truncated.
fn shown(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(i)) => i.to_string(),
            _ => "a fractional number".to_string(),
        },
        Value::String(s) => {
            let cut: String = s.chars().take(40).collect();
            format!("\"{cut}\"")
        }
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_string(),
    }
}

pub(crate) fn string<'v>(field: &str, v: &'v Value) -> Result<&'v str, ConfigError> {
    match v.as_str() {
        Some(s) => Ok(s),
        None => err(field, format!("must be a string, got {}", kind(v))),
    }
}

/// `"allow"` or `"deny"`: `on_store_error` and `global.failure_mode`.
fn failure_policy(field: &str, v: &Value) -> Result<FailurePolicy, ConfigError> {
    Ok(match one_of(field, v, &["allow", "deny"])? {
        "deny" => FailurePolicy::Deny,
        _ => FailurePolicy::Allow,
    })
}

fn one_of<'v>(field: &str, v: &'v Value, allowed: &[&str]) -> Result<&'v str, ConfigError> {
    let s = string(field, v).map_err(|_| ConfigError {
        field: field.to_string(),
        reason: format!("must be one of {}, got {}", quoted(allowed), kind(v)),
    })?;
    if allowed.contains(&s) {
        Ok(s)
    } else {
        err(field, format!("must be one of {}, got \"{s}\"", quoted(allowed)))
    }
}

fn quoted(list: &[&str]) -> String {
    list.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

pub(crate) fn int_in(field: &str, v: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => err(field, format!("must be a whole number from {min} to {max}, got {}", shown(v))),
    }
}

fn capacity(field: &str, v: &Value) -> Result<u64, ConfigError> {
    int_in(field, v, 1, MAX_CAPACITY)
}

fn rate(field: &str, v: &Value) -> Result<f64, ConfigError> {
    let per_second = match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => parse_rate(s).map_err(|reason| ConfigError { field: field.into(), reason })?,
        other => {
            return err(field, format!("must be tokens per second (a number) or \"<n>/<unit>\", got {}", kind(other)))
        }
    };
    if per_second.is_finite() && (MIN_RATE..=MAX_RATE).contains(&per_second) {
        Ok(per_second)
    } else {
        err(field, format!("must be from {MIN_RATE_TEXT} to {MAX_RATE_TEXT} tokens per second, got {}", shown(v)))
    }
}

fn limit(field: &str, capacity: u64, rate: f64) -> Result<Limit, ConfigError> {
    match Limit::new(capacity, rate) {
        Some(l) => Ok(l),
        None => err(field, "capacity and refill_rate give a bucket that is out of range"),
    }
}

fn mode(field: &str, v: &Value) -> Result<Mode, ConfigError> {
    Ok(match one_of(field, v, &["enforce", "shadow"])? {
        "shadow" => Mode::Shadow,
        _ => Mode::Enforce,
    })
}

fn percent(field: &str, v: &Value) -> Result<u8, ConfigError> {
    Ok(int_in(field, v, 0, 100)? as u8)
}

fn default_sources() -> Vec<TenantSource> {
    vec![TenantSource::Header(DEFAULT_TENANT_HEADER.into()), TenantSource::Query(DEFAULT_TENANT_QUERY.into())]
}

/// The `tenant` section: where tenant ids and plan names come from.
struct TenantSection {
    sources: Vec<TenantSource>,
    default: String,
    plan_sources: Vec<TenantSource>,
    default_plan: Option<usize>,
}

fn sources_list(field: &str, v: &Value) -> Result<Vec<TenantSource>, ConfigError> {
    let Value::Array(items) = v else {
        return err(field, format!("must be an array of sources, got {}", kind(v)));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(tenant_source(&format!("{field}[{i}]"), item)?);
    }
    Ok(out)
}

fn tenant_section(v: &Value, plans: &[Policy]) -> Result<TenantSection, ConfigError> {
    let obj = Fields::new("tenant", v, &["from", "default", "plan_from", "default_plan"])?;
    let sources = match obj.get("from") {
        None => default_sources(),
        Some(v) => sources_list("tenant.from", v)?,
    };
    let default = match obj.get("default") {
        None => "default".to_string(),
        Some(v) => {
            let s = string("tenant.default", v)?;
            if !is_valid_tenant_id(s.as_bytes()) {
                return err(
                    "tenant.default",
                    format!("must be 1 to {MAX_TENANT_LEN} visible ASCII characters (no spaces or control characters)"),
                );
            }
            s.to_string()
        }
    };
    let plan_sources = match obj.get("plan_from") {
        None => Vec::new(),
        Some(_) if plans.is_empty() => return err("tenant.plan_from", "needs a `plans` section to choose from"),
        Some(v) => sources_list("tenant.plan_from", v)?,
    };
    let default_plan = match obj.get("default_plan") {
        None => None,
        Some(v) => Some(named_plan("tenant.default_plan", v, plans)?),
    };
    Ok(TenantSection { sources, default, plan_sources, default_plan })
}

/// A plan name in the config (`tenant.default_plan`, a tenant's `plan`): it must exist.
fn named_plan(field: &str, v: &Value, plans: &[Policy]) -> Result<usize, ConfigError> {
    let name = string(field, v)?;
    plan_index(plans, name.as_bytes()).ok_or_else(|| {
        let known: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        let known = if known.is_empty() { "none: add a `plans` section".to_string() } else { quoted(&known) };
        ConfigError { field: field.into(), reason: format!("unknown plan \"{name}\"; the plans are {known}") }
    })
}

const SOURCE_KINDS: &[&str] = &["header", "query", "source_ip", "xff", "peer_principal", "jwt_claim"];

fn tenant_source(field: &str, v: &Value) -> Result<TenantSource, ConfigError> {
    let obj = Fields::new(field, v, SOURCE_KINDS)?;
    if obj.map.len() != 1 {
        return err(field, format!("must have exactly one of: {}", SOURCE_KINDS.join(", ")));
    }
    let Some((key, value)) = obj.map.iter().next() else {
        return err(field, "empty source");
    };
    let path = obj.path(key);
    match key.as_str() {
        "header" => {
            let name = string(&path, value)?;
            if !is_header_name(name) {
                return err(&path, "must be an HTTP header name (letters, digits and -_.)");
            }
            Ok(TenantSource::Header(name.to_ascii_lowercase()))
        }
        "query" => {
            let name = string(&path, value)?;
            if name.is_empty() || name.len() > 128 || name.bytes().any(|b| !b.is_ascii_graphic()) {
                return err(&path, "must be a query parameter name of 1 to 128 visible characters");
            }
            Ok(TenantSource::Query(name.to_string()))
        }
        "source_ip" => source_ip(&path, value),
        "peer_principal" => flag(&path, value).map(|_| TenantSource::PeerPrincipal),
        "xff" => {
            let o = Fields::new(&path, value, &["trusted_hops"])?;
            let hops = match o.get("trusted_hops") {
                None => 0,
                Some(h) => int_in(&o.path("trusted_hops"), h, 0, MAX_XFF_HOPS)?,
            };
            Ok(TenantSource::Xff { trusted_hops: hops as u32 })
        }
        "jwt_claim" => {
            let o = Fields::new(&path, value, &["claim", "metadata_key"])?;
            let claim = string(&o.path("claim"), o.required("claim")?)?;
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                return err(&o.path("claim"), "must be a claim name or a dotted path such as \"org.id\"");
            }
            let key = match o.get("metadata_key") {
                None => None,
                Some(k) => {
                    let k = string(&o.path("metadata_key"), k)?;
                    if k.is_empty() {
                        return err(&o.path("metadata_key"), "must be the jwt_authn provider's payload_in_metadata");
                    }
                    Some(k.to_string())
                }
            };
            Ok(TenantSource::JwtClaim { metadata_key: key, claim_path: claim.split('.').map(str::to_string).collect() })
        }
        _ => err(field, format!("unknown source; expected one of: {}", SOURCE_KINDS.join(", "))),
    }
}

/// `{"source_ip": true}` (the TCP peer; a header-derived address is refused) or
/// `{"source_ip": {"trusted_client_address": true}}` (Envoy's downstream address as the
/// listener computed it, X-Forwarded-For included: an explicit opt-in, see the README).
fn source_ip(field: &str, v: &Value) -> Result<TenantSource, ConfigError> {
    if let Value::Object(_) = v {
        let o = Fields::new(field, v, &["trusted_client_address"])?;
        let trusted = match o.get("trusted_client_address") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return err(&o.path("trusted_client_address"), format!("must be true or false, got {}", shown(other)))
            }
        };
        return Ok(TenantSource::SourceIp { trusted_client_address: trusted });
    }
    flag(field, v).map(|_| TenantSource::SourceIp { trusted_client_address: false })
}

/// `{"source_ip": true}`: the value must be `true`; `false` would be a confusing no-op.
pub(crate) fn flag(field: &str, v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::Bool(true) => Ok(()),
        _ => err(field, format!("must be true (remove the entry to disable it), got {}", shown(v))),
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What listed tenants resolve their fields over: their named plan, else `default_plan`,
/// else the top level; with `plan_from` (`dynamic`), also each plan.
struct Plans<'p> {
    list: &'p [Policy],
    default: Option<usize>,
    dynamic: bool,
}

/// The policy fields a tenant or plan entry may set; an unset field comes from `base`.
const ENTRY_FIELDS: &[&str] = &["capacity", "refill_rate", "limits", "mode", "enforce_percent"];

/// Resolves one tenant or plan entry over `base` (the precedence in README "Plans").
fn policy_entry(obj: &Fields, name: &str, base: &Policy) -> Result<Policy, ConfigError> {
    let (mode, enforce_percent) = enforcement(obj)?;
    // An entry's own `mode` or `enforce_percent` replaces both inherited ones.
    let (mode, enforce_percent) = if mode.is_none() && enforce_percent.is_none() {
        (base.mode, base.enforce_percent)
    } else {
        (mode, enforce_percent)
    };
    let mut policy = Policy::new(name, mode);
    policy.enforce_percent = enforce_percent;
    policy_limits(obj, Some(base), &mut policy)?;
    Ok(policy)
}

/// An entry's `mode` and `enforce_percent`: at most one of them.
fn enforcement(obj: &Fields) -> Result<(Option<Mode>, Option<u8>), ConfigError> {
    let mode = obj.get("mode").map(|m| mode(&obj.path("mode"), m)).transpose()?;
    let enforce_percent = obj.get("enforce_percent").map(|p| percent(&obj.path("enforce_percent"), p)).transpose()?;
    if mode.is_some() && enforce_percent.is_some() {
        return err(&obj.path("enforce_percent"), "set either `mode` or `enforce_percent`, not both");
    }
    Ok((mode, enforce_percent))
}

fn valid_name(field: &str, name: &str, what: &str) -> Result<(), ConfigError> {
    if is_valid_tenant_id(name.as_bytes()) {
        return Ok(());
    }
    err(
        field,
        format!(
            "{what} names must be 1 to {MAX_TENANT_LEN} visible ASCII characters (no spaces or control characters)"
        ),
    )
}

/// At most this many plans: each has its own counters, and a listed tenant without a named
/// plan is resolved over every plan when `plan_from` is set.
pub const MAX_PLANS: usize = 64;

fn plans_section(v: &Value, default: &Policy) -> Result<Vec<Policy>, ConfigError> {
    let Some(map) = v.as_object() else {
        return err("plans", format!("must be an object of plan name -> limits, got {}", kind(v)));
    };
    if map.len() > MAX_PLANS {
        return err("plans", format!("at most {MAX_PLANS} plans, got {}", map.len()));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, entry) in map {
        let field = format!("plans.{name}");
        valid_name(&field, name, "plan")?;
        let fields: Vec<&str> = ENTRY_FIELDS.iter().copied().chain(["rules"]).collect();
        let obj = Fields::new(&field, entry, &fields)?;
        out.push(policy_entry(&obj, name, default)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn tenants_section(v: &Value, default: &Policy, plans: &Plans) -> Result<Vec<Policy>, ConfigError> {
    let Some(map) = v.as_object() else {
        return err("tenants", format!("must be an object of tenant name -> limits, got {}", kind(v)));
    };
    let fields: Vec<&str> = ENTRY_FIELDS.iter().copied().chain(["plan", "rules"]).collect();
    let mut out = Vec::with_capacity(map.len());
    for (name, entry) in map {
        let field = format!("tenants.{name}");
        valid_name(&field, name, "tenant")?;
        let obj = Fields::new(&field, entry, &fields)?;
        let named = obj.get("plan").map(|p| named_plan(&obj.path("plan"), p, plans.list)).transpose()?;
        let base = named.or(plans.default).and_then(|i| plans.list.get(i)).unwrap_or(default);
        let mut policy = policy_entry(&obj, name, base)?;
        policy.plan = named;
        if named.is_none() && plans.dynamic {
            policy.on_plans = plans.list.iter().map(|plan| policy_entry(&obj, name, plan)).collect::<Result<_, _>>()?;
        }
        out.push(policy);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A rule's own limit (`capacity`/`refill_rate`, optional `mode` or `enforce_percent`; listed in rules/parse.rs's
/// `RULE_FIELDS`), if it has one: it then needs
/// a `name` (its bucket, stats and headers are named after it).
pub(crate) fn rule_policy(obj: &Fields, name: Option<&str>) -> Result<Option<Policy>, ConfigError> {
    let (mode_override, enforce_percent) = enforcement(obj)?;
    match (obj.get("capacity"), obj.get("refill_rate"), obj.get("limits")) {
        (None, None, None) => {
            if mode_override.is_some() {
                return err(
                    &obj.path("mode"),
                    "only a rule with its own limit (capacity and refill_rate, or limits) can have a mode",
                );
            }
            if enforce_percent.is_some() {
                return err(
                    &obj.path("enforce_percent"),
                    "only a rule with its own limit (capacity and refill_rate, or limits) can have an enforce_percent",
                );
            }
            Ok(None)
        }
        _ => {
            let Some(name) = name else {
                return err(
                    &obj.path("name"),
                    "a rule with its own limit (capacity/refill_rate or limits) needs a name (for its bucket, stats and headers)",
                );
            };
            let mut policy = Policy::new(name, mode_override);
            policy.enforce_percent = enforce_percent;
            policy_limits(obj, None, &mut policy)?;
            Ok(Some(policy))
        }
    }
}

/// The limits of one policy entry (top level, tenant, rule): `limits`, or the one-limit form
/// `capacity`/`refill_rate`, never both forms.
///
/// Inheritance (`inherit`: the top level, for a listed tenant): an entry with `limits` defines
/// all its limits; one with neither form inherits the top level's limits, all of them; one
/// with only `capacity` or only `refill_rate` takes the other from the top level, which must
/// then have a single limit. Without `inherit` (the top level, a rule) the entry defines its
/// limits itself.
fn policy_limits(obj: &Fields, inherit: Option<&Policy>, policy: &mut Policy) -> Result<(), ConfigError> {
    match (obj.get("capacity"), obj.get("refill_rate"), obj.get("limits"), inherit) {
        // All the top level's limits; a single one is named after this policy, as its own.
        (None, None, None, Some(p)) if p.limits.len() > 1 => {
            policy.limits = p.limits;
            policy.about = p.about.clone();
            Ok(())
        }
        (None, None, Some(list), _) => limits_list(&obj.path("limits"), list, policy),
        (_, _, Some(_), _) => err(&obj.path("limits"), "give either `limits` or capacity/refill_rate, not both"),
        _ => {
            let name = policy.name.clone();
            one_limit(obj, inherit.filter(|p| p.limits.len() == 1), ONE_LIMIT_ID, name, policy)
        }
    }
}

/// Adds one limit, `name` with id `id`, from `capacity` and `refill_rate`; either may be left
/// out when `base` (the top level, with a single limit) has it.
fn one_limit(
    obj: &Fields,
    base: Option<&Policy>,
    id: u64,
    name: String,
    policy: &mut Policy,
) -> Result<(), ConfigError> {
    const NEEDED: &str = "required: a limit has capacity and refill_rate (a listed tenant may leave one out \
                          when the top level has a single limit), or give `limits`";
    let capacity = match (obj.get("capacity"), base) {
        (Some(c), _) => capacity(&obj.path("capacity"), c)?,
        (None, Some(p)) => p.limits.first().capacity,
        (None, None) => return err(&obj.path("capacity"), NEEDED),
    };
    let rate_per_second = match (obj.get("refill_rate"), base.and_then(|p| p.about.first())) {
        (Some(r), _) => rate(&obj.path("refill_rate"), r)?,
        (None, Some(a)) => a.rate_per_second,
        (None, None) => return err(&obj.path("refill_rate"), NEEDED),
    };
    let field = if obj.prefix.is_empty() { obj.path("refill_rate") } else { obj.prefix.clone() };
    policy.limits.push(id, limit(&field, capacity, rate_per_second)?);
    policy.about.push(LimitInfo { name, rate_per_second });
    Ok(())
}

/// `limits`: 1 to [`MAX_LIMITS`] entries `{"name", "capacity", "refill_rate"}`, names unique
/// within the policy. Bounded because all of a bucket's limits share one shared-data record
/// (48 bytes a limit) decided by one compare-and-swap.
fn limits_list(field: &str, v: &Value, policy: &mut Policy) -> Result<(), ConfigError> {
    let items = match v.as_array() {
        Some(items) if (1..=MAX_LIMITS).contains(&items.len()) => items,
        _ => {
            return err(field, "must be an array of 1 to 4 limits {\"name\", \"capacity\", \"refill_rate\"} (they share one record and one compare-and-swap)")
        }
    };
    for (i, item) in items.iter().enumerate() {
        let obj = Fields::new(&format!("{field}[{i}]"), item, &["name", "capacity", "refill_rate"])?;
        let name = string(&obj.path("name"), obj.required("name")?)?;
        if !is_limit_name(name) || policy.about.iter().any(|a| a.name == name) {
            return err(&obj.path("name"), "must be 1 to 32 letters, digits, '-' or '_', unique in the policy");
        }
        // A lone limit is the one-limit form, which stores no id.
        let id = if items.len() == 1 { ONE_LIMIT_ID } else { limit_id(name) };
        one_limit(&obj, None, id, name.to_string(), policy)?;
    }
    Ok(())
}

/// Limit names go into `RateLimit` headers (as sf-strings) and stat names: kept to
/// characters that need no escaping in either.
fn is_limit_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn deny_section(v: &Value) -> Result<Deny, ConfigError> {
    let obj = Fields::new("deny", v, &["status", "body", "content_type", "grpc_status", "grpc_message"])?;
    let status = match obj.get("status") {
        None => 429,
        Some(s) => int_in("deny.status", s, 400, 599)? as u32,
    };
    let body = match obj.get("body") {
        None => DEFAULT_DENY_BODY.to_string(),
        Some(b) => {
            let s = string("deny.body", b)?;
            if s.len() > MAX_DENY_BODY {
                return err("deny.body", format!("at most {MAX_DENY_BODY} bytes, got {}", s.len()));
            }
            s.to_string()
        }
    };
    let content_type = match obj.get("content_type") {
        None => DEFAULT_DENY_CONTENT_TYPE.to_string(),
        Some(c) => {
            let s = string("deny.content_type", c)?;
            if s.is_empty() || s.len() > 256 || s.bytes().any(|b| b.is_ascii_control()) {
                return err("deny.content_type", "must be a media type such as \"application/json\"");
            }
            s.to_string()
        }
    };
    let grpc_status = match obj.get("grpc_status") {
        None => DEFAULT_GRPC_STATUS,
        // 0 (OK) would tell a denied client its call succeeded; 17+ are not gRPC codes.
        Some(g) => int_in("deny.grpc_status", g, 1, 16)? as u32,
    };
    let grpc_message = match obj.get("grpc_message") {
        None => DEFAULT_GRPC_MESSAGE.to_string(),
        Some(m) => {
            let s = string("deny.grpc_message", m)?;
            if s.len() > MAX_GRPC_MESSAGE {
                return err("deny.grpc_message", format!("at most {MAX_GRPC_MESSAGE} bytes, got {}", s.len()));
            }
            grpc_percent_encode(s)
        }
    };
    Ok(Deny { status, body, content_type, grpc_status, grpc_message })
}

const GLOBAL_FIELDS: &[&str] = &[
    "cluster",
    "domain",
    "timeout_ms",
    "failure_mode",
    "mode",
    "tenant_key",
    "method_key",
    "path_key",
    "plan_key",
    "lease_tokens",
];
const MAX_LEASE: u64 = 1_000_000;

fn global_section(v: &Value) -> Result<Option<Global>, ConfigError> {
    let obj = Fields::new("global", v, GLOBAL_FIELDS)?;
    let name = |key: &str, required: bool| -> Result<Option<String>, ConfigError> {
        let field = obj.path(key);
        match obj.get(key) {
            None if required => err(&field, "required field is missing"),
            None => Ok(None),
            Some(v) => {
                let s = string(&field, v)?;
                if s.is_empty() || s.len() > 256 || s.bytes().any(|b| !b.is_ascii_graphic()) {
                    return err(&field, "must be 1 to 256 visible ASCII characters");
                }
                Ok(Some(s.to_string()))
            }
        }
    };
    let cluster = name("cluster", true)?.unwrap_or_default();
    let domain = name("domain", true)?.unwrap_or_default();
    let timeout_ms = match obj.get("timeout_ms") {
        None => 20,
        Some(t) => int_in("global.timeout_ms", t, 1, 60_000)?,
    };
    let failure_mode = match obj.get("failure_mode") {
        None => FailurePolicy::Allow,
        Some(f) => failure_policy("global.failure_mode", f)?,
    };
    let mode = match obj.get("mode") {
        None => Some(GlobalMode::Global),
        Some(m) => match one_of("global.mode", m, &["local", "global", "both"])? {
            "local" => None,
            "both" => Some(GlobalMode::Both),
            _ => Some(GlobalMode::Global),
        },
    };
    let tenant_key = name("tenant_key", false)?.unwrap_or_else(|| "tenant".to_string());
    let method_key = name("method_key", false)?;
    let path_key = name("path_key", false)?;
    let plan_key = name("plan_key", false)?;
    let lease_tokens = match obj.get("lease_tokens") {
        None => None,
        Some(l) => Some(int_in("global.lease_tokens", l, 1, MAX_LEASE)? as u32),
    };
    Ok(mode.map(|mode| Global {
        cluster,
        domain,
        timeout_ms,
        failure_mode,
        mode,
        tenant_key,
        method_key,
        path_key,
        plan_key,
        lease_tokens,
    }))
}

fn overflow_section(v: &Value) -> Result<Overflow, ConfigError> {
    if let Value::String(_) = v {
        one_of("overflow", v, &["deny"])?;
        return Ok(Overflow::Deny);
    }
    let obj = Fields::new("overflow", v, &["capacity", "refill_rate"])?;
    let cap = capacity("overflow.capacity", obj.required("capacity")?)?;
    let per_second = rate("overflow.refill_rate", obj.required("refill_rate")?)?;
    Ok(Overflow::Bucket(limit("overflow", cap, per_second)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listed tenant's policy.
    fn tenant<'c>(c: &'c Config, name: &[u8]) -> Option<&'c Policy> {
        c.tenant_index(name).and_then(|i| c.tenants.get(i))
    }

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_json_bytes(s.as_bytes())
    }

    #[test]
    fn nested_config_errors_carry_the_prefix() {
        let v = crate::json::parse(br#"{"capacity":5,"refill_rate":1,"tenants":{"x":{"capacity":0}}}"#).unwrap();
        let e = Config::from_value_at("domains.acme", &v).unwrap_err();
        assert_eq!(e.field, "domains.acme.tenants.x.capacity");
        let v = crate::json::parse(br#"{"refill_rate":1}"#).unwrap();
        assert_eq!(Config::from_value_at("domains.d", &v).unwrap_err().field, "domains.d.capacity");
        let v = crate::json::parse(br#"{"capacity":5,"refill_rate":1}"#).unwrap();
        assert_eq!(Config::from_value_at("domains.d", &v), Config::from_value(&v));
    }

    fn field_of(s: &str) -> String {
        match parse(s) {
            Ok(_) => panic!("config accepted: {s}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn seed_form_parses_with_defaults() {
        let c = parse(r#"{"capacity":1000,"refill_rate":100}"#).unwrap();
        assert_eq!(c.default_policy.limits.first().capacity, 1000);
        assert_eq!(c.default_tenant, "default");
        assert_eq!(
            c.tenant_sources,
            vec![TenantSource::Header("x-tenant-id".into()), TenantSource::Query("tenant".into())]
        );
        assert_eq!(c.deny.status, 429);
        assert_eq!(c.headers, HeaderStyle::XRateLimit);
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.on_store_error, FailurePolicy::Allow);
        assert_eq!(c.max_tenants, 10_000);
        assert!(c.rules.is_empty());
    }

    #[test]
    fn design_example_parses() {
        let c = parse(
            r#"{
            "capacity": 1000, "refill_rate": 100,
            "tenant": {"from": [{"header": "X-Tenant-Id"}, {"query": "tenant"}, {"source_ip": true}], "default": "default"},
            "tenants": {"acme": {"capacity": 120, "refill_rate": 2}, "globex": {"capacity": 300, "refill_rate": "300/min"}},
            "rules": [{"methods": ["get", "HEAD"], "path_prefix": "/", "cost": 1}],
            "deny": {"status": 429, "body": "{\"error\":\"Too Many Requests\"}", "content_type": "application/json"},
            "rate_limit_headers": true, "mode": "enforce", "on_store_error": "allow", "max_tenants": 10000
        }"#,
        )
        .unwrap();
        assert_eq!(c.tenant_sources[0], TenantSource::Header("x-tenant-id".into()));
        assert_eq!(tenant(&c, b"globex").unwrap().about[0].rate_per_second, 5.0);
        assert_eq!(tenant(&c, b"acme").unwrap().limits.first().capacity, 120);
        assert!(tenant(&c, b"nobody").is_none());
        assert_eq!(c.rules[0].methods, vec!["GET", "HEAD"]);
    }

    #[test]
    fn source_ip_and_jwt_claim_forms() {
        let sources = |from: &str| parse(&format!(r#"{{"capacity":1,"refill_rate":1,"tenant":{{"from":[{from}]}}}}"#));
        let peer = TenantSource::SourceIp { trusted_client_address: false };
        let trusted = TenantSource::SourceIp { trusted_client_address: true };
        assert_eq!(sources(r#"{"source_ip":true}"#).unwrap().tenant_sources, vec![peer.clone()]);
        assert_eq!(sources(r#"{"source_ip":{}}"#).unwrap().tenant_sources, vec![peer.clone()]);
        assert_eq!(sources(r#"{"source_ip":{"trusted_client_address":false}}"#).unwrap().tenant_sources, vec![peer]);
        assert_eq!(sources(r#"{"source_ip":{"trusted_client_address":true}}"#).unwrap().tenant_sources, vec![trusted]);
        let e = sources(r#"{"source_ip":{"trusted_client_address":1}}"#).unwrap_err();
        assert_eq!(e.field, "tenant.from[0].source_ip.trusted_client_address");
        let e = sources(r#"{"source_ip":{"trusted_hops":1}}"#).unwrap_err();
        assert!(e.field.starts_with("tenant.from[0].source_ip"), "{e}");
        assert_eq!(sources(r#"{"source_ip":false}"#).unwrap_err().field, "tenant.from[0].source_ip");
        // jwt_claim: no metadata_key = the defaults (Istio's "payload", then "jwt_payload")
        let jwt = |key: Option<&str>| TenantSource::JwtClaim {
            metadata_key: key.map(str::to_string),
            claim_path: vec!["org".into(), "id".into()],
        };
        assert_eq!(sources(r#"{"jwt_claim":{"claim":"org.id"}}"#).unwrap().tenant_sources, vec![jwt(None)]);
        let c = sources(r#"{"jwt_claim":{"claim":"org.id","metadata_key":"k"}}"#).unwrap();
        assert_eq!(c.tenant_sources, vec![jwt(Some("k"))]);
        let e = sources(r#"{"jwt_claim":{"claim":"org.id","metadata_key":""}}"#).unwrap_err();
        assert_eq!(e.field, "tenant.from[0].jwt_claim.metadata_key");
    }

    #[test]
    fn deny_grpc_fields() {
        let d = parse(r#"{"capacity":1,"refill_rate":1}"#).unwrap().deny;
        assert_eq!((d.grpc_status, d.grpc_message.as_str()), (8, "Too Many Requests"));
        let d = parse(r#"{"capacity":1,"refill_rate":1,"deny":{"grpc_status":14,"grpc_message":"50% off: ça"}}"#)
            .unwrap()
            .deny;
        assert_eq!(d.grpc_status, 14);
        assert_eq!(d.grpc_message, "50%25 off: %C3%A7a");
        assert_eq!((d.status, d.body.as_str()), (429, DEFAULT_DENY_BODY));
        for bad in [r#"{"grpc_status":0}"#, r#"{"grpc_status":17}"#, r#"{"grpc_status":"8"}"#] {
            let json = format!(r#"{{"capacity":1,"refill_rate":1,"deny":{bad}}}"#);
            assert_eq!(field_of(&json), "deny.grpc_status", "{bad}");
        }
        let long = format!(r#"{{"capacity":1,"refill_rate":1,"deny":{{"grpc_message":"{}"}}}}"#, "x".repeat(1025));
        assert_eq!(field_of(&long), "deny.grpc_message");
        assert_eq!(field_of(r#"{"capacity":1,"refill_rate":1,"deny":{"grpc_message":7}}"#), "deny.grpc_message");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"refill_rate":1}"#), "capacity");
        assert_eq!(field_of(r#"{"capacity":1}"#), "refill_rate");
        assert_eq!(field_of(r#"{"capacity":0,"refill_rate":1}"#), "capacity");
        assert_eq!(field_of(r#"{"capacity":1.5,"refill_rate":1}"#), "capacity");
        assert_eq!(field_of(r#"{"capacity":"10","refill_rate":1}"#), "capacity");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":-1}"#), "refill_rate");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":"5/fortnight"}"#), "refill_rate");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"capacty":5}"#), "capacty");
        assert_eq!(
            field_of(r#"{"capacity":10,"refill_rate":1,"tenants":{"a":{"capacity":-1}}}"#),
            "tenants.a.capacity"
        );
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"tenants":{"a":{"rate":1}}}"#), "tenants.a.rate");
        assert_eq!(
            field_of(r#"{"capacity":10,"refill_rate":1,"tenant":{"from":[{"cookie":"x"}]}}"#),
            "tenant.from[0].cookie"
        );
        assert_eq!(
            field_of(r#"{"capacity":10,"refill_rate":1,"tenant":{"from":[{"header":"a b"}]}}"#),
            "tenant.from[0].header"
        );
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"rules":[{"cost":-1}]}"#), "rules[0].cost");
        assert_eq!(
            field_of(r#"{"capacity":10,"refill_rate":1,"rules":[{"path_prefix":"api"}]}"#),
            "rules[0].path_prefix"
        );
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"deny":{"status":200}}"#), "deny.status");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"mode":"audit"}"#), "mode");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"on_store_error":true}"#), "on_store_error");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"max_tenants":0}"#), "max_tenants");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"rate_limit_headers":"draft"}"#), "rate_limit_headers");
        assert_eq!(field_of(r#"{"capacity":10,"refill_rate":1,"tenant":{"default":"a b"}}"#), "tenant.default");
        assert_eq!(field_of(r#"[1,2]"#), "");
        assert_eq!(field_of(r#"not json"#), "");
    }

    #[test]
    fn error_message_is_one_actionable_line() {
        let e = parse(r#"{"capacity":10,"refill_rate":1,"tenants":{"acme":{"capacity":0}}}"#).unwrap_err();
        let line = e.to_string();
        assert!(line.contains("`tenants.acme.capacity`"), "{line}");
        assert!(line.contains("whole number from 1"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn rate_limit_headers_aliases() {
        let h =
            |v: &str| parse(&format!(r#"{{"capacity":1,"refill_rate":1,"rate_limit_headers":{v}}}"#)).unwrap().headers;
        assert_eq!(h("true"), HeaderStyle::XRateLimit);
        assert_eq!(h("\"x-ratelimit\""), HeaderStyle::XRateLimit);
        assert_eq!(h("false"), HeaderStyle::Off);
        assert_eq!(h("\"off\""), HeaderStyle::Off);
        assert_eq!(h("\"ietf\""), HeaderStyle::Ietf);
    }

    #[test]
    fn tenant_overrides_inherit_missing_fields() {
        let c = parse(r#"{"capacity":50,"refill_rate":"60/min","tenants":{"a":{"capacity":5},"b":{"refill_rate":10,"mode":"shadow"}}}"#).unwrap();
        let a = tenant(&c, b"a").unwrap();
        assert_eq!((a.limits.first().capacity, a.about[0].rate_per_second), (5, 1.0));
        let b = tenant(&c, b"b").unwrap();
        assert_eq!((b.limits.first().capacity, b.about[0].rate_per_second, b.mode), (50, 10.0, Some(Mode::Shadow)));
    }

    const SEVERAL: &str = r#"[{"name":"burst","capacity":20,"refill_rate":"20/s"},
        {"name":"hourly","capacity":1000,"refill_rate":"1000/h"},{"name":"daily","capacity":10000,"refill_rate":"10000/day"}]"#;

    #[test]
    fn several_limits_on_any_policy() {
        let c = parse(&format!(
            r#"{{"limits":{SEVERAL},"tenants":{{"acme":{{"limits":[{{"name":"minute","capacity":120,"refill_rate":"120/min"}},
            {{"name":"day","capacity":10000,"refill_rate":"10000/day"}}]}}}},
            "rules":[{{"name":"login","path_prefix":"/login","limits":{SEVERAL}}}]}}"#
        ))
        .unwrap();
        let d = &c.default_policy;
        assert_eq!(d.limits.len(), 3);
        assert_eq!((d.limit_name(0), d.limit_name(2)), ("burst", "daily"));
        assert_eq!(d.limits.iter().map(|l| l.window_seconds()).collect::<Vec<_>>(), [1, 3600, 86400]);
        assert_eq!(d.about[2].rate_per_second, 10000.0 / 86400.0);
        let acme = tenant(&c, b"acme").unwrap();
        assert_eq!((acme.limits.len(), acme.limit_name(1), acme.limits.first().capacity), (2, "day", 120));
        let login = c.rules[0].policy.as_ref().unwrap();
        assert_eq!((login.name.as_str(), login.limits.len()), ("login", 3));
        // Ids are the names' hashes, so state follows a limit when the list is reordered.
        assert_eq!(d.limits.ids()[0], limit_id("burst"));
        // A lone entry in `limits` is the one-limit form (same id, same stored layout).
        let one = parse(r#"{"limits":[{"name":"only","capacity":3,"refill_rate":1}]}"#).unwrap();
        assert_eq!(one.default_policy.limits, Limits::one(ONE_LIMIT_ID, Limit::new(3, 1.0).unwrap()));
        assert_eq!(one.default_policy.limit_name(0), "only");
        // The overflow bucket defaults to the top level's first limit.
        assert!(matches!(c.overflow, Overflow::Bucket(l) if l.capacity == 20));
    }

    #[test]
    fn limits_inheritance() {
        // Top level with several limits: a tenant with neither form takes all of them (their
        // names too); `limits` or both fields define its own; one field alone is an error.
        let c = parse(&format!(
            r#"{{"limits":{SEVERAL},"tenants":{{"a":{{"mode":"shadow"}},"b":{{"capacity":5,"refill_rate":1}}}}}}"#
        ))
        .unwrap();
        let a = tenant(&c, b"a").unwrap();
        assert_eq!(
            (a.name.as_str(), a.limits, a.limit_name(1), a.mode),
            ("a", c.default_policy.limits, "hourly", Some(Mode::Shadow))
        );
        let b = tenant(&c, b"b").unwrap();
        assert_eq!((b.limits.len(), b.limit_name(0), b.limits.first().capacity), (1, "b", 5));
        let e = parse(&format!(r#"{{"limits":{SEVERAL},"tenants":{{"x":{{"capacity":5}}}}}}"#)).unwrap_err();
        assert_eq!(e.field, "tenants.x.refill_rate");
        assert!(e.reason.contains("single limit"), "{e}");
        // Top level with one limit: a tenant with `limits` defines all of its own; one
        // without inherits per field, named after the tenant, as before.
        let c =
            parse(&format!(r#"{{"capacity":7,"refill_rate":2,"tenants":{{"a":{{"limits":{SEVERAL}}},"b":{{}}}}}}"#))
                .unwrap();
        assert_eq!(tenant(&c, b"a").unwrap().limits.len(), 3);
        let b = tenant(&c, b"b").unwrap();
        assert_eq!((b.limit_name(0), b.limits.first().capacity, b.about[0].rate_per_second), ("b", 7, 2.0));
    }

    #[test]
    fn limits_errors_name_the_field() {
        let f = |limits: &str| field_of(&format!(r#"{{"limits":{limits}}}"#));
        assert_eq!(f("[]"), "limits");
        assert_eq!(f("{}"), "limits");
        let five = format!(
            "[{}]",
            (0..5).map(|i| format!(r#"{{"name":"l{i}","capacity":1,"refill_rate":1}}"#)).collect::<Vec<_>>().join(",")
        );
        let e = parse(&format!(r#"{{"limits":{five}}}"#)).unwrap_err();
        assert!(e.field == "limits" && e.reason.contains("1 to 4"), "{e}");
        assert_eq!(
            f(r#"[{"name":"a","capacity":1,"refill_rate":1},{"name":"a","capacity":2,"refill_rate":1}]"#),
            "limits[1].name"
        );
        assert_eq!(f(r#"[{"name":"a b","capacity":1,"refill_rate":1}]"#), "limits[0].name");
        assert_eq!(f(r#"[{"name":"a;q=1","capacity":1,"refill_rate":1}]"#), "limits[0].name");
        assert_eq!(f(&format!(r#"[{{"name":"{}","capacity":1,"refill_rate":1}}]"#, "x".repeat(33))), "limits[0].name");
        assert_eq!(f(r#"[{"capacity":1,"refill_rate":1}]"#), "limits[0].name");
        assert_eq!(f(r#"[{"name":"a","refill_rate":1}]"#), "limits[0].capacity");
        assert_eq!(f(r#"[{"name":"a","capacity":1}]"#), "limits[0].refill_rate");
        assert_eq!(f(r#"[{"name":"a","capacity":1,"refill_rate":"1/week"}]"#), "limits[0].refill_rate");
        assert_eq!(f(r#"[{"name":"a","capacity":1,"refill_rate":1,"burst":2}]"#), "limits[0].burst");
        // Both forms in one entry, anywhere.
        assert_eq!(field_of(r#"{"capacity":1,"limits":[{"name":"a","capacity":1,"refill_rate":1}]}"#), "limits");
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"tenants":{"t":{"refill_rate":1,"limits":[]}}}"#),
            "tenants.t.limits"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"rules":[{"name":"r","capacity":1,"limits":[]}]}"#),
            "rules[0].limits"
        );
        // A rule with `limits` needs a name, like any rule with its own limit.
        assert_eq!(
            field_of(&format!(r#"{{"capacity":1,"refill_rate":1,"rules":[{{"limits":{SEVERAL}}}]}}"#)),
            "rules[0].name"
        );
        // Neither form at the top level.
        assert_eq!(field_of(r#"{"mode":"shadow"}"#), "capacity");
    }

    #[test]
    fn rule_with_own_limit_needs_name_and_both_fields() {
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"rules":[{"capacity":5,"refill_rate":1}]}"#),
            "rules[0].name"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"rules":[{"name":"x","capacity":5}]}"#),
            "rules[0].refill_rate"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"rules":[{"name":"x","cost":1},{"name":"x"}]}"#),
            "rules[1].name"
        );
        let c = parse(r#"{"capacity":1,"refill_rate":1,"rules":[{"name":"login","methods":["POST"],"path_prefix":"/login","capacity":5,"refill_rate":"5/min"}]}"#).unwrap();
        let p = c.rules[0].policy.as_ref().unwrap();
        assert_eq!((p.name.as_str(), p.limits.first().capacity), ("login", 5));
    }

    #[test]
    fn overflow_forms() {
        let c = parse(r#"{"capacity":1,"refill_rate":1,"overflow":"deny"}"#).unwrap();
        assert_eq!(c.overflow, Overflow::Deny);
        let c = parse(r#"{"capacity":1,"refill_rate":1,"overflow":{"capacity":9,"refill_rate":3}}"#).unwrap();
        assert!(matches!(c.overflow, Overflow::Bucket(l) if l.capacity == 9));
        assert_eq!(field_of(r#"{"capacity":1,"refill_rate":1,"overflow":"allow"}"#), "overflow");
        assert_eq!(field_of(r#"{"capacity":1,"refill_rate":1,"overflow":{"capacity":9}}"#), "overflow.refill_rate");
    }

    #[test]
    fn global_section() {
        let c = parse(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"rls","domain":"d"}}"#).unwrap();
        let g = c.global.unwrap();
        assert_eq!((g.timeout_ms, g.mode, g.failure_mode), (20, GlobalMode::Global, FailurePolicy::Allow));
        assert_eq!((g.tenant_key.as_str(), g.lease_tokens), ("tenant", None));
        let c =
            parse(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"rls","domain":"d","mode":"local"}}"#).unwrap();
        assert!(c.global.is_none());
        let c = parse(
            r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"rls","domain":"d","mode":"both","lease_tokens":10,
            "failure_mode":"deny","method_key":"method","path_key":"path","timeout_ms":50}}"#,
        )
        .unwrap();
        let g = c.global.unwrap();
        assert_eq!((g.mode, g.lease_tokens, g.failure_mode), (GlobalMode::Both, Some(10), FailurePolicy::Deny));
        assert_eq!(field_of(r#"{"capacity":1,"refill_rate":1,"global":{"domain":"d"}}"#), "global.cluster");
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"c","domain":"d","timeout_ms":0}}"#),
            "global.timeout_ms"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"c","domain":"d","mode":"remote"}}"#),
            "global.mode"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"c","domain":"d","lease_tokens":0}}"#),
            "global.lease_tokens"
        );
        assert_eq!(
            field_of(r#"{"capacity":1,"refill_rate":1,"global":{"cluster":"c","domain":"d","cluser":"x"}}"#),
            "global.cluser"
        );
    }

    #[test]
    fn extreme_but_valid_limits_are_accepted() {
        parse(r#"{"capacity":4294967296,"refill_rate":1000000000}"#).unwrap();
        parse(r#"{"capacity":1,"refill_rate":0.001}"#).unwrap();
        parse(r#"{"capacity":1099511627776,"refill_rate":0.000001}"#).unwrap();
    }

    mod fuzz {
        use super::super::Config;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<u64>().prop_map(|n| json!(n)),
                (-1e15f64..1e15).prop_map(|f| json!(f)),
                ".{0,12}".prop_map(Value::String),
                prop::sample::select(vec![
                    "120/min", "0/s", "1/x", "-1/s", "1e9/s", "enforce", "shadow", "ietf", "deny"
                ])
                .prop_map(|s| Value::String(s.into())),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((field_name(), inner), 0..5)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        /// Mostly real field names, so the fuzzer gets past the unknown-field check.
        fn field_name() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec![
                    "capacity", "refill_rate", "tenant", "from", "default", "tenants", "acme", "rules",
                    "methods", "path_prefix", "cost", "name", "deny", "status", "body", "content_type",
                    "grpc_status", "grpc_message",
                    "rate_limit_headers", "mode", "on_store_error", "max_tenants", "overflow",
                    "unknown_tenants", "near_limit_fraction", "header", "query", "source_ip", "xff",
                    "trusted_hops", "peer_principal", "jwt_claim", "claim", "metadata_key",
                    "trusted_client_address", "path", "path_separated_prefix", "host", "headers", "route",
                    "exact", "prefix", "present", "absent", "limits",
                ]).prop_map(String::from),
                1 => ".{0,8}",
            ]
        }

        const VALID: &str = r#"{"capacity":10,"refill_rate":"60/min",
            "tenant":{"from":[{"header":"x-t"},{"query":"t"},{"xff":{"trusted_hops":1}}],"default":"d"},
            "tenants":{"acme":{"capacity":3,"mode":"shadow"},
                "globex":{"limits":[{"name":"m","capacity":300,"refill_rate":"300/min"},{"name":"d","capacity":9,"refill_rate":"9/day"}]}},
            "rules":[{"name":"r","methods":["GET"],"path_prefix":"/a","cost":2,"capacity":5,"refill_rate":1}],
            "deny":{"status":429},"rate_limit_headers":"ietf","max_tenants":100,"overflow":"deny"}"#;

        fn check(v: &Value) -> Result<(), TestCaseError> {
            if let Err(e) = Config::from_value(&crate::json::Value::from(v)) {
                let line = e.to_string();
                prop_assert!(!line.contains('\n'));
                if v.is_object() {
                    prop_assert!(!e.field.is_empty(), "error without a field: {}", line);
                }
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn random_json_never_panics(v in any_json()) {
                check(&v)?;
            }

            #[test]
            fn mutated_valid_config_never_panics(path in prop::collection::vec(0usize..16, 1..4), new in any_json()) {
                let mut v: Value = serde_json::from_str(VALID).unwrap();
                // Walk a random path of existing children (as a JSON pointer) and replace it.
                let mut pointer = String::new();
                let mut at = &v;
                for step in path {
                    let next = match at {
                        Value::Object(m) if !m.is_empty() => m.iter().nth(step % m.len()).map(|(k, c)| (k.clone(), c)),
                        Value::Array(a) if !a.is_empty() => a.get(step % a.len()).map(|c| ((step % a.len()).to_string(), c)),
                        _ => None,
                    };
                    let Some((key, child)) = next else { break };
                    pointer.push('/');
                    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                    at = child;
                }
                *v.pointer_mut(&pointer).unwrap() = new;
                check(&v)?;
            }

            #[test]
            fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = Config::from_json_bytes(&bytes);
            }
        }

        #[test]
        fn valid_fixture_parses() {
            Config::from_json_bytes(VALID.as_bytes()).unwrap();
        }
    }

    #[test]
    fn plan_errors_name_the_field() {
        let e = |json: &str| Config::from_json_bytes(json.as_bytes()).unwrap_err().to_string();
        let base = r#""capacity":5,"refill_rate":1"#;
        assert!(e(&format!(r#"{{{base},"tenant":{{"default_plan":"gold"}}}}"#)).contains("tenant.default_plan"));
        let msg = e(&format!(r#"{{{base},"plans":{{"free":{{}}}},"tenants":{{"acme":{{"plan":"pro"}}}}}}"#));
        assert!(
            msg.contains("tenants.acme.plan") && msg.contains("unknown plan \"pro\"") && msg.contains("\"free\""),
            "{msg}"
        );
        assert!(
            e(&format!(r#"{{{base},"tenant":{{"plan_from":[{{"header":"x-plan"}}]}}}}"#)).contains("tenant.plan_from")
        );
        assert!(e(&format!(r#"{{{base},"plans":{{"free":{{"capacity":0}}}}}}"#)).contains("plans.free.capacity"));
        assert!(e(&format!(r#"{{{base},"plans":{{"free":{{"plan":"x"}}}}}}"#)).contains("plans.free"));
        assert!(e(&format!(r#"{{{base},"plans":{{"a b":{{}}}}}}"#)).contains("plans.a b"));
        assert!(e(&format!(r#"{{{base},"plans":[]}}"#)).contains("plans"));
        let many: Vec<String> = (0..=MAX_PLANS).map(|i| format!(r#""p{i}":{{}}"#)).collect();
        assert!(e(&format!(r#"{{{base},"plans":{{{}}}}}"#, many.join(","))).contains("at most 64 plans"));
    }

    #[test]
    fn a_plan_resolves_its_unset_fields_over_the_top_level() {
        let c = Config::from_json_bytes(br#"{"capacity":5,"refill_rate":"60/min","plans":{"pro":{"capacity":50}}}"#)
            .unwrap();
        let pro = &c.plans[0];
        assert_eq!((pro.name.as_str(), pro.limits.first().capacity, pro.about[0].rate_per_second), ("pro", 50, 1.0));
        assert_eq!(c.plan_index(b"pro"), Some(0));
        assert_eq!(c.plan_index(b"free"), None);
    }
}
