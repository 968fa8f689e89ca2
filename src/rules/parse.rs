//! Rule lists from JSON: [`RuleSet::parse`] for one list (the top-level `rules`, a tenant's
//! `rules`, later a plan's), [`sections`] for all of a config's. Errors name the field, e.g.
//! `tenants.acme.rules[0].headers[1].name`.

use super::{HeaderMatch, HeaderTest, HostMatch, PathMatch, Rule, RuleSet};
use crate::bucket::MAX_CAPACITY;
use crate::config::{err, flag, int_in, kind, rule_policy, string, ConfigError, Fields, Policy};
use crate::json::Value;
use crate::tenant::is_valid_tenant_id;

const MAX_RULES: usize = 256;
const MAX_HEADERS: usize = 16;
const MAX_TEXT: usize = 1024;

/// The matcher fields, then config.rs's `RULE_POLICY_FIELDS` (a rule's own limit), which
/// [`rule_policy`] reads: one list, so the unknown-field check is one call.
const RULE_FIELDS: &[&str] = &[
    "name",
    "methods",
    "path_prefix",
    "path",
    "path_separated_prefix",
    "host",
    "headers",
    "route",
    "cost",
    "capacity",
    "refill_rate",
    "limits",
    "mode",
    "enforce_percent",
];

impl RuleSet {
    /// One rule list at `field` (e.g. `rules`); its rules get ids from `first_id` on. Whoever
    /// parses lists checks that rule names are unique across all of them ([`sections`] does).
    pub fn parse(field: &str, v: &Value, first_id: usize) -> Result<RuleSet, ConfigError> {
        let Some(items) = v.as_array().filter(|items| items.len() <= MAX_RULES) else {
            return err(field, format!("must be an array of at most {MAX_RULES} rules"));
        };
        let mut rules: Vec<Rule> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            rules.push(rule(&format!("{field}[{i}]"), item, first_id + i)?);
        }
        Ok(RuleSet { rules, first_id })
    }

    fn next_id(&self) -> usize {
        self.first_id + self.rules.len()
    }
}

/// Where rule lists live in the config: the top-level `rules`, then every listed tenant's,
/// then every plan's.
pub(crate) struct Sections {
    pub top: RuleSet,
    /// By index in `tenants`; empty when no tenant has rules.
    pub tenants: Vec<RuleSet>,
    /// By index in `plans`; empty when no plan has rules.
    pub plans: Vec<RuleSet>,
}

/// The top-level `rules`, every listed tenant's `rules` (by index in `listed`, the parsed
/// `tenants`) and every plan's (by index in `plan_list`, the parsed `plans`). Ids run through
/// all of them in that order. Rule names are unique across the config: a name is a rule's
/// stats scope and, with the tenant, its bucket.
pub(crate) fn sections(
    rules: Option<&Value>,
    tenants: Option<&Value>,
    listed: &[Policy],
    plans: Option<&Value>,
    plan_list: &[Policy],
) -> Result<Sections, ConfigError> {
    let top = match rules {
        Some(v) => RuleSet::parse("rules", v, 0)?,
        None => RuleSet::default(),
    };
    // One kind of entry list (`tenants` or `plans`): each entry's own rule list, or none at
    // all when no entry has one.
    let lists = |kind: &str, entries: Option<&Value>, parsed: &[Policy], first_id: usize| {
        let own_rules = |name: &str| entries.and_then(|m| m.get(name)).and_then(|e| e.get("rules"));
        let mut out: Vec<RuleSet> = Vec::new();
        if !parsed.iter().any(|p| own_rules(&p.name).is_some()) {
            return Ok(out);
        }
        for entry in parsed {
            let first_id = out.last().map_or(first_id, RuleSet::next_id);
            out.push(match own_rules(&entry.name) {
                Some(v) => RuleSet::parse(&format!("{kind}.{}.rules", entry.name), v, first_id)?,
                None => RuleSet { rules: Vec::new(), first_id },
            });
        }
        Ok(out)
    };
    let own = lists("tenants", tenants, listed, top.next_id())?;
    let after_tenants = own.last().unwrap_or(&top).next_id();
    let by_plan = lists("plans", plans, plan_list, after_tenants)?;
    // List k: 0 is the top level, then the tenants' lists, then the plans'.
    let field = |k: usize| {
        let tenant = k.checked_sub(1).filter(|t| *t < own.len()).and_then(|t| listed.get(t));
        let plan = k.checked_sub(1 + own.len()).and_then(|p| plan_list.get(p));
        match (tenant, plan) {
            (Some(t), _) => format!("tenants.{}.rules", t.name),
            (None, Some(p)) => format!("plans.{}.rules", p.name),
            (None, None) => "rules".to_string(),
        }
    };
    unique_names(std::iter::once(&top).chain(&own).chain(&by_plan), field)?;
    Ok(Sections { top, tenants: own, plans: by_plan })
}

/// A rule name used twice in `lists` is an error at the second use; `field(k)` is the k-th
/// list's field. Quadratic in the named rules, which a config has few of: a sort or a set would
/// add kilobytes to the module.
fn unique_names<'a>(
    lists: impl Iterator<Item = &'a RuleSet>,
    field: impl Fn(usize) -> String,
) -> Result<(), ConfigError> {
    let mut seen: Vec<(&str, usize, usize)> = Vec::new();
    for (k, set) in lists.enumerate() {
        for (i, rule) in set.iter().enumerate() {
            let Some(name) = rule.name.as_deref() else { continue };
            if let Some((_, other, j)) = seen.iter().find(|(n, _, _)| *n == name) {
                let reason =
                    format!("rule name \"{name}\" is already used by {}[{j}]: rule names are unique", field(*other));
                return err(&format!("{}[{i}].name", field(k)), reason);
            }
            seen.push((name, k, i));
        }
    }
    Ok(())
}

fn rule(field: &str, v: &Value, id: usize) -> Result<Rule, ConfigError> {
    let obj = Fields::new(field, v, RULE_FIELDS)?;
    let name = match obj.get("name") {
        None => None,
        Some(n) => {
            let s = string(&obj.path("name"), n)?;
            if !is_valid_tenant_id(s.as_bytes()) || s.len() > 64 {
                return err(&obj.path("name"), "must be 1 to 64 visible ASCII characters");
            }
            Some(s.to_string())
        }
    };
    let methods = match obj.get("methods") {
        None => Vec::new(),
        Some(Value::Array(ms)) => {
            let mut out = Vec::with_capacity(ms.len());
            for (j, m) in ms.iter().enumerate() {
                let f = format!("{field}.methods[{j}]");
                let s = string(&f, m)?;
                if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return err(&f, format!("must be an HTTP method such as \"GET\", got \"{s}\""));
                }
                out.push(s.to_ascii_uppercase());
            }
            out
        }
        Some(other) => return err(&obj.path("methods"), format!("must be an array of methods, got {}", kind(other))),
    };
    let mut path = None;
    for (key, make) in [
        ("path_prefix", PathMatch::Prefix as fn(String) -> PathMatch),
        ("path", PathMatch::Exact),
        ("path_separated_prefix", PathMatch::Segments),
    ] {
        let Some(v) = obj.get(key) else { continue };
        let f = obj.path(key);
        let s = string(&f, v)?;
        if let Some(why) = bad_path(key, s, path.is_some()) {
            return err(&f, why);
        }
        path = Some(make(s.to_string()));
    }
    let host = match obj.get("host") {
        None => None,
        Some(h) => Some(host_match(&obj.path("host"), h)?),
    };
    let mut headers = Vec::new();
    if let Some(hs) = obj.get("headers") {
        let Some(hs) = hs.as_array().filter(|hs| hs.len() <= MAX_HEADERS) else {
            return err(&obj.path("headers"), format!("must be an array of at most {MAX_HEADERS} header matchers"));
        };
        for (j, h) in hs.iter().enumerate() {
            headers.push(header_match(&format!("{field}.headers[{j}]"), h)?);
        }
    }
    let route = match obj.get("route") {
        None => None,
        Some(r) => Some(text(&obj.path("route"), r, false)?.to_string()),
    };
    let cost = match obj.get("cost") {
        None => 1,
        Some(c) => int_in(&obj.path("cost"), c, 0, MAX_CAPACITY)?,
    };
    let policy = rule_policy(&obj, name.as_deref())?;
    Ok(Rule { id, name, methods, path, host, headers, route, cost, policy })
}

/// Why `s` is no path matcher `key`, if it is not. Every path starts with `/`; `path` and
/// `path_separated_prefix` are matched without the query, so `?` or `#` could never match;
/// Envoy also rejects a `path_separated_prefix` ending in `/` (its proto: `^[^?#]+[^?#/]$`).
fn bad_path(key: &str, s: &str, second: bool) -> Option<&'static str> {
    if second {
        Some("a rule has at most one of path_prefix, path, path_separated_prefix")
    } else if !s.starts_with('/') {
        Some("must start with \"/\"")
    } else if key != "path_prefix" && s.bytes().any(|b| b == b'?' || b == b'#') {
        Some("cannot contain '?' or '#': the query is not part of the path")
    } else if key == "path_separated_prefix" && s.ends_with('/') {
        Some("must not end with \"/\" (the path and everything under it match)")
    } else {
        None
    }
}

/// `api.example.com`, `*.example.com`, `10.0.0.1` or `[::1]`: no port (it is ignored).
fn host_match(field: &str, v: &Value) -> Result<HostMatch, ConfigError> {
    let s = string(field, v)?.to_ascii_lowercase();
    let (wild, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s.as_str()),
    };
    let ip6 = !wild && name.len() > 2 && name.starts_with('[') && name.ends_with(']');
    let ok = name.len() <= 255
        && !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') || (ip6 && matches!(b, b'[' | b']' | b':'))
        });
    if !ok {
        return err(field, "must be a host such as \"api.example.com\" or \"*.example.com\", without a port");
    }
    Ok(match wild {
        true => HostMatch::Suffix(format!(".{name}")),
        false => HostMatch::Exact(name.to_string()),
    })
}

const HEADER_FIELDS: &[&str] = &["name", "exact", "prefix", "present", "absent"];

/// `{"name": N, "exact"|"prefix": V}` or `{"name": N, "present"|"absent": true}`.
fn header_match(field: &str, v: &Value) -> Result<HeaderMatch, ConfigError> {
    let obj = Fields::new(field, v, HEADER_FIELDS)?;
    let name_field = obj.path("name");
    let name = string(&name_field, obj.required("name")?)?;
    // RFC 9110 `token`: what a header name may be (so no pseudo-headers; `host` and the
    // path matchers cover those).
    if name.is_empty()
        || name.len() > 128
        || !name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
    {
        return err(&name_field, "must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)");
    }
    let test = match (obj.get("exact"), obj.get("prefix"), obj.get("present"), obj.get("absent")) {
        (Some(e), None, None, None) => HeaderTest::Exact(text(&obj.path("exact"), e, true)?.to_string()),
        (None, Some(p), None, None) => HeaderTest::Prefix(text(&obj.path("prefix"), p, false)?.to_string()),
        (None, None, Some(p), None) => flag(&obj.path("present"), p).map(|_| HeaderTest::Present)?,
        (None, None, None, Some(a)) => flag(&obj.path("absent"), a).map(|_| HeaderTest::Absent)?,
        _ => return err(field, "needs exactly one of exact, prefix, present, absent"),
    };
    Ok(HeaderMatch { name: name.to_ascii_lowercase(), test })
}

/// A string to compare with: at most 1024 bytes, no control characters but tab (Envoy passes
/// none in a header value); empty only where `empty` says (an empty prefix would match any
/// value: that is `present`).
fn text<'v>(field: &str, v: &'v Value, empty: bool) -> Result<&'v str, ConfigError> {
    let s = string(field, v)?;
    if (s.is_empty() && !empty) || s.len() > MAX_TEXT || s.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return err(field, "must be 1 to 1024 bytes without control characters");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::rules::{HeaderTest, HostMatch, PathMatch};

    fn parse(extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_json_bytes(format!(r#"{{"capacity":10,"refill_rate":1,{extra}}}"#).as_bytes())
    }

    fn field_of(extra: &str) -> String {
        match parse(extra) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => e.field,
        }
    }

    fn rule_field(rule: &str) -> String {
        field_of(&format!(r#""rules":[{{"cost":1}},{rule}]"#))
    }

    #[test]
    fn matcher_fields_parse() {
        let c = parse(
            r#""rules":[{"path":"/login"},{"path_separated_prefix":"/healthz","cost":0},
                {"host":"API.Example.com"},{"host":"*.Example.com"},{"host":"[::1]"},
                {"headers":[{"name":"X-Debug","exact":"1"},{"name":"x-a","prefix":"b"},
                            {"name":"x-p","present":true},{"name":"x-q","absent":true}]},
                {"route":"reviews-v2"}]"#,
        )
        .unwrap();
        let r = &c.rules;
        assert_eq!(r[0].path, Some(PathMatch::Exact("/login".into())));
        assert_eq!(r[1].path, Some(PathMatch::Segments("/healthz".into())));
        assert_eq!(r[2].host, Some(HostMatch::Exact("api.example.com".into())));
        assert_eq!(r[3].host, Some(HostMatch::Suffix(".example.com".into())));
        assert_eq!(r[4].host, Some(HostMatch::Exact("[::1]".into())));
        let tests: Vec<_> = r[5].headers.iter().map(|h| (h.name.as_str(), h.test.clone())).collect();
        assert_eq!(
            tests,
            [
                ("x-debug", HeaderTest::Exact("1".into())),
                ("x-a", HeaderTest::Prefix("b".into())),
                ("x-p", HeaderTest::Present),
                ("x-q", HeaderTest::Absent)
            ]
        );
        assert_eq!(r[6].route.as_deref(), Some("reviews-v2"));
        assert_eq!(r.iter().map(|r| r.id).collect::<Vec<_>>(), (0..7).collect::<Vec<_>>());
        assert!(c.tenant_rules.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(rule_field(r#"{"path_prefix":"/a","path":"/b"}"#), "rules[1].path");
        assert_eq!(rule_field(r#"{"path":"/a","path_separated_prefix":"/b"}"#), "rules[1].path_separated_prefix");
        assert_eq!(rule_field(r#"{"path":"a"}"#), "rules[1].path");
        assert_eq!(rule_field(r#"{"path":"/a?b"}"#), "rules[1].path");
        assert_eq!(rule_field(r#"{"path_separated_prefix":"/healthz/"}"#), "rules[1].path_separated_prefix");
        assert_eq!(rule_field(r#"{"path_separated_prefix":"/"}"#), "rules[1].path_separated_prefix");
        assert_eq!(rule_field(r#"{"path_separated_prefix":"/a#b"}"#), "rules[1].path_separated_prefix");
        assert_eq!(rule_field(r#"{"path_regex":"/a.*"}"#), "rules[1].path_regex");
        for host in [r#""example.com:8443""#, r#""*""#, r#""*.""#, r#""a b""#, r#""""#, "7", r#""*.[::1]""#] {
            assert_eq!(rule_field(&format!(r#"{{"host":{host}}}"#)), "rules[1].host", "{host}");
        }
        assert_eq!(rule_field(r#"{"headers":{"name":"x"}}"#), "rules[1].headers");
        assert_eq!(rule_field(r#"{"headers":[{"exact":"1"}]}"#), "rules[1].headers[0].name");
        for name in [r#"":authority""#, r#""a b""#, r#""""#, r#""x(y)""#, "1"] {
            let h = format!(r#"{{"headers":[{{"name":"x-ok","present":true}},{{"name":{name},"present":true}}]}}"#);
            assert_eq!(rule_field(&h), "rules[1].headers[1].name", "{name}");
        }
        assert_eq!(rule_field(r#"{"headers":[{"name":"x"}]}"#), "rules[1].headers[0]");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","exact":"1","present":true}]}"#), "rules[1].headers[0]");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","present":false}]}"#), "rules[1].headers[0].present");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","absent":"yes"}]}"#), "rules[1].headers[0].absent");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","prefix":""}]}"#), "rules[1].headers[0].prefix");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","exact":"a\u0001"}]}"#), "rules[1].headers[0].exact");
        assert_eq!(rule_field(r#"{"headers":[{"name":"x","regex":"a"}]}"#), "rules[1].headers[0].regex");
        assert_eq!(rule_field(r#"{"route":""}"#), "rules[1].route");
        assert_eq!(rule_field(r#"{"route":7}"#), "rules[1].route");
    }

    #[test]
    fn tenant_rule_lists() {
        let c = parse(
            r#""tenants":{"globex":{},"acme":{"capacity":5,"rules":[{"name":"acme-up","path":"/up","capacity":2,"refill_rate":1}]}},
               "rules":[{"name":"up","path":"/up"}]"#,
        )
        .unwrap();
        let acme = c.tenant_index(b"acme").unwrap();
        let set = &c.tenant_rules[acme];
        assert_eq!((set.len(), set[0].id, set[0].policy.as_ref().map(|p| p.limits.first().capacity)), (1, 1, Some(2)));
        assert!(c.tenant_rules[c.tenant_index(b"globex").unwrap()].is_empty());
        assert_eq!(field_of(r#""tenants":{"acme":{"rules":[{"cost":-1}]}}"#), "tenants.acme.rules[0].cost");
        assert_eq!(
            field_of(r#""tenants":{"acme":{"rules":[{"headers":[{"name":"a b","present":true}]}]}}"#),
            "tenants.acme.rules[0].headers[0].name"
        );
        assert_eq!(field_of(r#""tenants":{"acme":{"rules":{}}}"#), "tenants.acme.rules");
        // Names are unique across the config: they name stats and buckets.
        let e = parse(r#""tenants":{"acme":{"rules":[{"name":"up"}]}},"rules":[{"name":"up"}]"#).unwrap_err();
        assert_eq!(e.field, "tenants.acme.rules[0].name");
        assert!(e.reason.contains("rules[0]"), "{e}");
        let e = parse(r#""tenants":{"a":{"rules":[{"name":"x"}]},"b":{"rules":[{"name":"x"}]}}"#).unwrap_err();
        assert_eq!(e.field, "tenants.b.rules[0].name");
        assert_eq!(field_of(r#""tenants":{"a":{"rules":[{"name":"x"},{"name":"x"}]}}"#), "tenants.a.rules[1].name");
    }

    mod fuzz {
        use super::parse;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                prop::sample::select(vec![
                    "/", "/a", "/a/", "a", "/a?b", "*.x.com", "*", "x.com:80", "[::1]", "x-d", ":path", "", "GET"
                ])
                .prop_map(|s| Value::String(s.into())),
                ".{0,6}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::vec((key(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        fn key() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "name",
                "methods",
                "path_prefix",
                "path",
                "path_separated_prefix",
                "host",
                "headers",
                "route",
                "cost",
                "exact",
                "prefix",
                "present",
                "absent",
                "rules",
                "acme",
            ])
            .prop_map(String::from)
        }

        proptest! {
            /// Any rule list, top-level or a tenant's, parses or fails naming a field under it.
            #[test]
            fn any_rules_parse_or_name_the_field(rules in prop::collection::vec(value(), 0..4), own in value()) {
                let extra = format!(r#""rules":{},"tenants":{{"acme":{{"rules":{own}}}}}"#, Value::Array(rules));
                if let Err(e) = parse(&extra) {
                    prop_assert!(e.field.starts_with("rules") || e.field.starts_with("tenants.acme.rules"), "{}", e);
                    prop_assert!(!e.to_string().contains('\n'));
                }
            }
        }
    }

    #[test]
    fn old_rules_keep_their_meaning() {
        let c = parse(r#""rules":[{"methods":["get"],"path_prefix":"/api","cost":2},{"name":"login","path_prefix":"/login","capacity":5,"refill_rate":"5/min"}]"#).unwrap();
        assert_eq!((c.rules[0].methods.as_slice(), c.rules[0].cost), (&["GET".to_string()][..], 2));
        assert_eq!(c.rules[0].path, Some(PathMatch::Prefix("/api".into())));
        assert_eq!(c.rules[1].policy.as_ref().map(|p| p.name.as_str()), Some("login"));
        assert_eq!(field_of(r#""rules":[{"path_prefix":"api"}]"#), "rules[0].path_prefix");
        assert_eq!(field_of(r#""rules":[{"capacity":5,"refill_rate":1}]"#), "rules[0].name");
    }
}
