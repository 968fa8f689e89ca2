//! Which requests are metered, and at what cost. A [`RuleSet`] is an ordered list of rules; the
//! first rule whose every matcher matches decides. A listed tenant's own rules (`tenants.<name>
//! .rules`) are tried before the top-level ones. With no top-level rules every request costs 1;
//! with rules, a request matching none passes unmetered (so rules are also how operators exempt
//! health checks).
//!
//! Matchers follow Envoy's route matching, so a rule means what the same words mean in a route:
//! `path_prefix` is a byte prefix, `path` an exact path, `path_separated_prefix` a prefix that
//! ends at a `/` (all on `:path` without query and fragment, as Envoy's HCM normalized it,
//! case-sensitive); `host` is `:authority` without the port, exact or `*.suffix`,
//! case-insensitive; `headers` are exact/prefix/present/absent tests; `route` is the name of
//! the Envoy route the request matched (`xds.route_name`). No regex form: a linear-time engine
//! (regex-lite 0.1.9) adds 63,624 bytes to a module whose limit leaves about 7 KB.
//!
//! Facts are read from the host lazily, only when a rule needs them, and at most once per
//! request ([`Lookup`]).

pub(crate) mod parse;

use crate::config::{Config, Policy};
use crate::tenant::{self, RequestFacts, TenantId};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Position among all rules of the config: the top-level list first, then each listed
    /// tenant's, in tenant order. `PolicyId::Rule` and the per-rule stats use it.
    pub id: usize,
    pub name: Option<String>,
    /// Upper-case method names; empty matches every method.
    pub methods: Vec<String>,
    /// `None` matches every path (and a request without one).
    pub path: Option<PathMatch>,
    pub host: Option<HostMatch>,
    /// All must match.
    pub headers: Vec<HeaderMatch>,
    /// The Envoy route name.
    pub route: Option<String>,
    pub cost: u64,
    /// A rule with its own limit meters a separate bucket per (tenant, rule).
    pub policy: Option<Policy>,
}

/// Envoy's three path matchers, on the path without `?query` and `#fragment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `path_prefix`: a byte prefix (`/api` matches `/apix`).
    Prefix(String),
    /// `path`: the whole path.
    Exact(String),
    /// `path_separated_prefix`: the path, or the path followed by `/...`.
    Segments(String),
}

/// `host`, stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: at least one character before it.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower-case.
    pub name: String,
    pub test: HeaderTest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderTest {
    Exact(String),
    Prefix(String),
    Present,
    Absent,
}

/// An ordered rule list (the top-level `rules`, a tenant's `rules`): parsed by
/// [`RuleSet::parse`], read as a slice of [`Rule`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// The id of its first rule (of the next rule, when empty).
    first_id: usize,
}

impl std::ops::Deref for RuleSet {
    type Target = [Rule];
    fn deref(&self) -> &[Rule] {
        &self.rules
    }
}

impl<'a> IntoIterator for &'a RuleSet {
    type Item = &'a Rule;
    type IntoIter = std::slice::Iter<'a, Rule>;
    fn into_iter(self) -> Self::IntoIter {
        self.rules.iter()
    }
}

impl RuleSet {
    /// The first rule that matches the request.
    pub fn first_match<'c, F: RequestFacts>(&'c self, req: &mut Lookup<'c, '_, F>) -> Option<&'c Rule> {
        self.rules.iter().find(|rule| rule.matches(req))
    }
}

impl Config {
    /// The rule with this [`Rule::id`].
    pub fn rule(&self, id: usize) -> Option<&Rule> {
        if let Some(rule) = self.rules.get(id) {
            return Some(rule);
        }
        // Tenant lists, then plan lists, hold consecutive ids in order: the last list starting
        // at or before `id` holds it, if any does.
        let in_sets =
            |sets: &'_ [RuleSet]| -> Option<usize> { sets.partition_point(|s| s.first_id <= id).checked_sub(1) };
        let sets = match self.plan_rules.first() {
            Some(first) if first.first_id <= id => &self.plan_rules,
            _ => &self.tenant_rules,
        };
        let set = sets.get(in_sets(sets)?)?;
        set.get(id.checked_sub(set.first_id)?)
    }

    /// Every rule of the config, in id order.
    pub fn all_rules(&self) -> impl Iterator<Item = &Rule> {
        (0..).map_while(|id| self.rule(id))
    }
}

/// What a request is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metering<'c> {
    /// Not metered: no rule matched, or the rule's cost is 0.
    Free,
    /// Debit `cost` tokens; `rule` is the matching rule (with its id), if rules are configured.
    Charge { cost: u64, rule: Option<(usize, &'c Rule)> },
}

impl<'c> Metering<'c> {
    fn of(rule: &'c Rule) -> Metering<'c> {
        if rule.cost == 0 {
            Metering::Free
        } else {
            Metering::Charge { cost: rule.cost, rule: Some((rule.id, rule)) }
        }
    }
}

/// Who a request is, when rules needed to know before matching: its tenant and plan.
pub type Resolved = (TenantId, Option<usize>);

/// The rule and cost of a request, and its tenant and plan when those had to be known first (a
/// config with per-tenant or per-plan rules resolves them before matching; otherwise an
/// unmetered request never asks). `flow::on_request` and the checker's `--explain` both decide
/// with this.
pub fn meter<'c, F: RequestFacts>(
    config: &'c Config,
    default_tenant: &TenantId,
    req: &mut Lookup<'c, '_, F>,
) -> (Metering<'c>, Option<Resolved>) {
    let who = match config.tenant_rules.is_empty() && config.plan_rules.is_empty() {
        true => None,
        false => {
            let tenant = tenant::resolve(&config.tenant_sources, default_tenant, req.facts());
            Some((tenant, crate::policy::plan_of(config, &tenant, req.facts())))
        }
    };
    let metering = match first_rule(config, who.as_ref(), req) {
        Some(rule) => Metering::of(rule),
        None if config.rules.is_empty() => Metering::Charge { cost: 1, rule: None },
        None => Metering::Free,
    };
    (metering, who)
}

/// The rule a request matches: a listed tenant's own rules first, then its plan's, then the
/// top-level ones.
pub fn first_rule<'c, F: RequestFacts>(
    config: &'c Config,
    who: Option<&Resolved>,
    req: &mut Lookup<'c, '_, F>,
) -> Option<&'c Rule> {
    let own = who.and_then(|(t, _)| config.tenant_index(t.as_bytes())).and_then(|i| config.tenant_rules.get(i));
    let plan = who.and_then(|(_, p)| *p).and_then(|p| config.plan_rules.get(p));
    own.and_then(|set| set.first_match(req))
        .or_else(|| plan.and_then(|set| set.first_match(req)))
        .or_else(|| config.rules.first_match(req))
}

/// For other modules' unit tests: the first-match rule of `rules` for a request that has only
/// a method and a path.
#[cfg(test)]
pub fn classify<'c>(rules: &'c [Rule], method: &[u8], path: &[u8]) -> Metering<'c> {
    struct MethodPath<'a>(&'a [u8], &'a [u8]);
    impl RequestFacts for MethodPath<'_> {
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            (name == ":method").then(|| self.0.to_vec())
        }
        fn path(&mut self) -> Option<&[u8]> {
            Some(self.1)
        }
        fn property(&mut self, _: &[&str]) -> Option<Vec<u8>> {
            None
        }
    }
    if rules.is_empty() {
        return Metering::Charge { cost: 1, rule: None };
    }
    let mut facts = MethodPath(method, path);
    let mut req = Lookup::new(&mut facts);
    rules.iter().find(|r| r.matches(&mut req)).map_or(Metering::Free, Metering::of)
}

impl Rule {
    /// Cheapest facts first; each is read only if every earlier matcher matched.
    fn matches<'c, F: RequestFacts>(&'c self, req: &mut Lookup<'c, '_, F>) -> bool {
        if !self.methods.is_empty() {
            let Some(method) = req.method() else { return false };
            if !self.methods.iter().any(|m| m.as_bytes() == method) {
                return false;
            }
        }
        if let Some(path) = &self.path {
            if !req.path().is_some_and(|p| path.matches(p)) {
                return false;
            }
        }
        if let Some(host) = &self.host {
            if !req.host().is_some_and(|a| host.matches(host_of(a))) {
                return false;
            }
        }
        if let Some(route) = &self.route {
            if req.route() != Some(route.as_bytes()) {
                return false;
            }
        }
        self.headers.iter().all(|h| h.test.matches(req.header(&h.name)))
    }
}

/// The path part: everything before `?` or `#`.
fn path_only(path: &[u8]) -> &[u8] {
    match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => path.get(..end).unwrap_or(path),
        None => path,
    }
}

impl PathMatch {
    /// Envoy's `prefix`, `path` and `path_separated_prefix` route matchers (case-sensitive):
    /// bytes as they are, so `%2F` is not a `/` (Envoy's HCM decodes it before filters only
    /// when `path_with_escaped_slashes_action` says so).
    pub fn matches(&self, path: &[u8]) -> bool {
        let path = path_only(path);
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
            PathMatch::Exact(p) => path == p.as_bytes(),
            PathMatch::Segments(p) => {
                path.strip_prefix(p.as_bytes()).is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
            }
        }
    }
}

/// The host of an `:authority`: without the port (`api.example.com:8443`, `[::1]:8080` ->
/// `[::1]`) and without one trailing dot (`api.example.com.` names the same host, and must not
/// slip past a host rule).
pub fn host_of(authority: &[u8]) -> &[u8] {
    let end = if authority.starts_with(b"[") {
        authority.iter().position(|&b| b == b']').map_or(authority.len(), |i| i + 1)
    } else {
        authority.iter().position(|&b| b == b':').unwrap_or(authority.len())
    };
    let host = authority.get(..end).unwrap_or(authority);
    host.strip_suffix(b".").unwrap_or(host)
}

impl HostMatch {
    /// Case-insensitive; `host` is already without its port ([`host_of`]).
    pub fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.get(host.len() - s.len()..).is_some_and(|end| end.eq_ignore_ascii_case(s.as_bytes()))
            }
        }
    }
}

impl HeaderTest {
    /// `value`: the header's (first) value, `None` when absent.
    pub fn matches(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (HeaderTest::Absent, v) => v.is_none(),
            (_, None) => false,
            (HeaderTest::Present, Some(_)) => true,
            (HeaderTest::Exact(e), Some(v)) => v == e.as_bytes(),
            (HeaderTest::Prefix(p), Some(v)) => v.starts_with(p.as_bytes()),
        }
    }
}

/// Headers kept per request for header matchers; more distinct names are read uncached.
const CACHED_HEADERS: usize = 8;

/// One request's facts as rules see them: each read from the host only when a rule asks, and
/// at most once (header values are kept for up to [`CACHED_HEADERS`] names).
pub struct Lookup<'c, 'f, F> {
    facts: &'f mut F,
    method: Option<Option<Vec<u8>>>,
    host: Option<Option<Vec<u8>>>,
    route: Option<Option<Vec<u8>>>,
    /// `(name, value)`; the first `cached` entries are in use. Names come from the config.
    headers: [(&'c str, Option<Vec<u8>>); CACHED_HEADERS],
    cached: usize,
    /// The last uncached header value, when all entries are in use.
    spill: Option<Vec<u8>>,
}

impl<'c, 'f, F: RequestFacts> Lookup<'c, 'f, F> {
    pub fn new(facts: &'f mut F) -> Self {
        Lookup { facts, method: None, host: None, route: None, headers: Default::default(), cached: 0, spill: None }
    }

    pub fn method(&mut self) -> Option<&[u8]> {
        let facts = &mut *self.facts;
        self.method.get_or_insert_with(|| facts.header(":method")).as_deref()
    }

    pub fn path(&mut self) -> Option<&[u8]> {
        self.facts.path()
    }

    /// The facts themselves, for tenant resolution (which reads its own sources).
    pub fn facts(&mut self) -> &mut F {
        self.facts
    }

    pub fn host(&mut self) -> Option<&[u8]> {
        let facts = &mut *self.facts;
        self.host.get_or_insert_with(|| facts.header(":authority")).as_deref()
    }

    pub fn route(&mut self) -> Option<&[u8]> {
        let facts = &mut *self.facts;
        self.route.get_or_insert_with(|| facts.route_name()).as_deref()
    }

    pub fn header(&mut self, name: &'c str) -> Option<&[u8]> {
        let used = self.cached.min(CACHED_HEADERS);
        let at = match self.headers.iter().take(used).position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                let value = self.facts.header(name);
                let Some(entry) = self.headers.get_mut(used) else {
                    self.spill = value;
                    return self.spill.as_deref();
                };
                *entry = (name, value);
                self.cached = used + 1;
                used
            }
        };
        self.headers.get(at).and_then(|(_, v)| v.as_deref())
    }

    /// The method and the path, each only if wanted, borrowed together (a service
    /// descriptor's entries).
    pub fn method_and_path(&mut self, method: bool, path: bool) -> (Option<&[u8]>, Option<&[u8]>) {
        if method {
            self.method();
        }
        let m = self.method.as_ref().and_then(|m| m.as_deref()).filter(|_| method);
        let p = if path { self.facts.path() } else { None };
        (m, p)
    }
}

/// `GET,HEAD /api* host *.example.com header x-debug=1 route r cost 2`, for the checker.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let methods = if self.methods.is_empty() { "ANY".to_string() } else { self.methods.join(",") };
        write!(f, "{methods} ")?;
        match &self.path {
            None | Some(PathMatch::Prefix(_)) => {
                let p = match &self.path {
                    Some(PathMatch::Prefix(p)) => p.as_str(),
                    _ => "/",
                };
                write!(f, "{p}*")?
            }
            Some(PathMatch::Exact(p)) => write!(f, "{p}")?,
            Some(PathMatch::Segments(p)) => write!(f, "{p}[/*]")?,
        }
        match &self.host {
            Some(HostMatch::Exact(h)) => write!(f, " host {h}")?,
            Some(HostMatch::Suffix(s)) => write!(f, " host *{s}")?,
            None => {}
        }
        for h in &self.headers {
            match &h.test {
                HeaderTest::Exact(v) => write!(f, " header {}={v}", h.name)?,
                HeaderTest::Prefix(v) => write!(f, " header {}={v}*", h.name)?,
                HeaderTest::Present => write!(f, " header {} present", h.name)?,
                HeaderTest::Absent => write!(f, " header {} absent", h.name)?,
            }
        }
        if let Some(r) = &self.route {
            write!(f, " route {r}")?;
        }
        write!(f, " cost {}", self.cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(extra: &str) -> Config {
        Config::from_json_bytes(format!(r#"{{"capacity":10,"refill_rate":1,{extra}}}"#).as_bytes()).unwrap()
    }

    fn rules(json: &str) -> RuleSet {
        config(&format!(r#""rules":{json}"#)).rules
    }

    /// A request's facts, counting every read.
    #[derive(Default)]
    struct Req {
        headers: Vec<(&'static str, &'static [u8])>,
        path: Option<&'static [u8]>,
        route: Option<&'static [u8]>,
        reads: Vec<String>,
    }

    impl Req {
        fn new(method: &'static str, path: &'static str) -> Req {
            Req { headers: vec![(":method", method.as_bytes())], path: Some(path.as_bytes()), ..Req::default() }
        }
        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.push((name, value.as_bytes()));
            self
        }
        fn route(mut self, name: &'static str) -> Req {
            self.route = Some(name.as_bytes());
            self
        }
    }

    impl RequestFacts for Req {
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            self.reads.push(name.to_string());
            self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_vec())
        }
        fn path(&mut self) -> Option<&[u8]> {
            self.reads.push(":path".into());
            self.path
        }
        fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
            self.reads.push(path.join("."));
            if path == ["xds", "route_name"] {
                self.route.map(<[u8]>::to_vec)
            } else {
                None
            }
        }
    }

    /// The index (in its list) of the rule `req` matches in `set`, if any.
    fn hit(set: &RuleSet, req: &mut Req) -> Option<usize> {
        let mut lookup = Lookup::new(req);
        set.first_match(&mut lookup).map(|r| r.id - set.first_id)
    }

    fn seg(p: &str) -> PathMatch {
        PathMatch::Segments(p.into())
    }

    #[test]
    fn no_rules_meter_everything_at_one() {
        assert_eq!(classify(&[], b"GET", b"/"), Metering::Charge { cost: 1, rule: None });
    }

    #[test]
    fn first_match_wins_and_unmatched_is_free() {
        let r = rules(
            r#"[{"path_prefix":"/healthz","cost":0},{"methods":["POST"],"path_prefix":"/api","cost":5},{"methods":["GET"]}]"#,
        );
        assert_eq!(classify(&r, b"GET", b"/healthz"), Metering::Free);
        assert!(matches!(classify(&r, b"POST", b"/api/x?y=1"), Metering::Charge { cost: 5, rule: Some((1, _)) }));
        assert!(matches!(classify(&r, b"GET", b"/api"), Metering::Charge { cost: 1, rule: Some((2, _)) }));
        assert_eq!(classify(&r, b"DELETE", b"/other"), Metering::Free);
        assert_eq!(classify(&r, b"POST", b"/ap"), Metering::Free);
    }

    #[test]
    fn query_does_not_extend_the_path() {
        let r = rules(r#"[{"path_prefix":"/a/b"}]"#);
        assert_eq!(classify(&r, b"GET", b"/a?/b"), Metering::Free);
        assert_eq!(classify(&r, b"GET", b"/a#/b"), Metering::Free);
    }

    #[test]
    fn path_prefix_is_a_byte_prefix() {
        let p = PathMatch::Prefix("/api".into());
        for yes in ["/api", "/api/", "/apix", "/api?x", "/api%2Fx"] {
            assert!(p.matches(yes.as_bytes()), "{yes}");
        }
        for no in ["/ap", "/API", "", "/a?pi", "api"] {
            assert!(!p.matches(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn exact_path_strips_query_and_fragment_only() {
        let p = PathMatch::Exact("/login".into());
        for yes in ["/login", "/login?next=/x", "/login#top", "/login?"] {
            assert!(p.matches(yes.as_bytes()), "{yes}");
        }
        for no in ["/login/", "/logins", "/Login", "/log", "", "/login%3F"] {
            assert!(!p.matches(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn separated_prefix_ends_at_a_slash_as_in_envoy() {
        // Envoy's examples (route_components.proto): /api/dev matches /api/dev, /api/dev/,
        // /api/dev/v1 and /api/dev?param=true, not /api/developer.
        let p = seg("/api/dev");
        for yes in ["/api/dev", "/api/dev/", "/api/dev/v1", "/api/dev?param=true", "/api/dev#x"] {
            assert!(p.matches(yes.as_bytes()), "{yes}");
        }
        for no in ["/api/developer", "/api/de", "/api/dev%2Fv1", "/API/dev", "", "/api/dev.json"] {
            assert!(!p.matches(no.as_bytes()), "{no}");
        }
        let h = seg("/healthz");
        assert!(h.matches(b"/healthz") && h.matches(b"/healthz/live") && h.matches(b"/healthz?x"));
        assert!(!h.matches(b"/healthzfoo"));
    }

    #[test]
    fn host_drops_port_and_one_trailing_dot() {
        assert_eq!(host_of(b"api.example.com:8443"), b"api.example.com");
        assert_eq!(host_of(b"api.example.com"), b"api.example.com");
        assert_eq!(host_of(b"api.example.com."), b"api.example.com");
        assert_eq!(host_of(b"api.example.com.:80"), b"api.example.com");
        assert_eq!(host_of(b"[::1]:8080"), b"[::1]");
        assert_eq!(host_of(b"[::1]"), b"[::1]");
        assert_eq!(host_of(b"[::1"), b"[::1");
        assert_eq!(host_of(b""), b"");
        assert_eq!(host_of(b":80"), b"");
    }

    #[test]
    fn host_exact_and_suffix_are_case_insensitive() {
        let exact = HostMatch::Exact("api.example.com".into());
        assert!(exact.matches(host_of(b"API.Example.COM:8443")));
        assert!(!exact.matches(b"api.example.co"));
        assert!(!exact.matches(b"xapi.example.com"));
        let suffix = HostMatch::Suffix(".example.com".into());
        for yes in ["a.example.com", "A.B.EXAMPLE.com", "x.example.com"] {
            assert!(suffix.matches(yes.as_bytes()), "{yes}");
        }
        for no in ["example.com", ".example.com", "aexample.com", "a.example.com.evil", ""] {
            assert!(!suffix.matches(no.as_bytes()), "{no}");
        }
        let v6 = HostMatch::Exact("[::1]".into());
        assert!(v6.matches(host_of(b"[::1]:8080")));
    }

    #[test]
    fn header_tests() {
        use HeaderTest::*;
        assert!(Exact("1".into()).matches(Some(b"1")));
        assert!(!Exact("1".into()).matches(Some(b"10")));
        assert!(!Exact("1".into()).matches(None));
        assert!(Exact(String::new()).matches(Some(b"")));
        assert!(Prefix("Bearer ".into()).matches(Some(b"Bearer x")));
        assert!(!Prefix("Bearer ".into()).matches(Some(b"bearer x")));
        assert!(Present.matches(Some(b"")));
        assert!(!Present.matches(None));
        assert!(Absent.matches(None));
        assert!(!Absent.matches(Some(b"")));
    }

    #[test]
    fn every_matcher_of_a_rule_must_match() {
        let r = rules(
            r#"[{"methods":["POST"],"path":"/v1/jobs","host":"*.example.com","route":"jobs",
                 "headers":[{"name":"x-debug","exact":"1"},{"name":"x-canary","absent":true}]}]"#,
        );
        let base = || {
            Req::new("POST", "/v1/jobs?x=1")
                .header(":authority", "eu.example.com:443")
                .header("x-debug", "1")
                .route("jobs")
        };
        assert_eq!(hit(&r, &mut base()), Some(0));
        assert_eq!(hit(&r, &mut Req { headers: vec![(":method", b"GET")], ..base() }), None);
        assert_eq!(hit(&r, &mut Req { path: Some(b"/v1/jobs/1"), ..base() }), None);
        assert_eq!(hit(&r, &mut base().route("other")), None);
        assert_eq!(hit(&r, &mut Req { route: None, ..base() }), None);
        assert_eq!(hit(&r, &mut base().header("x-canary", "")), None);
        let mut no_debug = base();
        no_debug.headers.retain(|(n, _)| *n != "x-debug");
        assert_eq!(hit(&r, &mut no_debug), None);
        let mut apex = base();
        apex.headers.retain(|(n, _)| *n != ":authority");
        assert_eq!(hit(&r, &mut apex.header(":authority", "example.com")), None);
    }

    #[test]
    fn a_rule_without_a_path_matcher_matches_any_path_even_none() {
        let r = rules(r#"[{"methods":["CONNECT"]}]"#);
        assert_eq!(hit(&r, &mut Req { path: None, ..Req::new("CONNECT", "") }), Some(0));
        let r = rules(r#"[{"path_prefix":"/"}]"#);
        assert_eq!(hit(&r, &mut Req { path: None, ..Req::new("GET", "") }), None);
        assert_eq!(hit(&r, &mut Req::new("GET", "")), None, "an empty :path has no '/' prefix");
    }

    #[test]
    fn facts_are_read_lazily_and_once() {
        let r = rules(
            r#"[{"methods":["PUT"],"headers":[{"name":"x-a","present":true}]},
                {"path":"/x","headers":[{"name":"x-a","present":true}]},
                {"host":"h","headers":[{"name":"x-a","exact":"1"},{"name":"x-b","present":true}]},
                {"route":"r","headers":[{"name":"x-b","present":true}]},
                {"headers":[{"name":"x-a","prefix":"1"}]}]"#,
        );
        let mut req = Req::new("GET", "/").header(":authority", "h").header("x-a", "1");
        assert_eq!(hit(&r, &mut req), Some(4));
        let mut reads = req.reads.clone();
        reads.sort();
        assert_eq!(reads, [":authority", ":method", ":path", "x-a", "x-b", "xds.route_name"]);
        // A rule that fails on its method reads nothing else.
        let mut req = Req::new("GET", "/");
        assert_eq!(hit(&rules(r#"[{"methods":["PUT"],"host":"h","route":"r"}]"#), &mut req), None);
        assert_eq!(req.reads, [":method"]);
    }

    #[test]
    fn more_header_names_than_the_cache_holds_are_still_matched() {
        let names: Vec<String> = (0..12).map(|i| format!(r#"{{"name":"x-{i}","absent":true}}"#)).collect();
        let r = rules(&format!(r#"[{{"headers":[{}]}}]"#, names.join(",")));
        assert_eq!(hit(&r, &mut Req::new("GET", "/")), Some(0));
        assert_eq!(hit(&r, &mut Req::new("GET", "/").header("x-11", "")), None);
        assert_eq!(hit(&r, &mut Req::new("GET", "/").header("x-0", "")), None);
    }

    #[test]
    fn tenant_rules_come_first_then_the_top_level_ones() {
        let c = config(
            r#""tenants":{"acme":{"rules":[{"name":"acme-search","path_separated_prefix":"/search","cost":3},
                                        {"path":"/free","cost":0}]},
                          "zed":{}},
               "rules":[{"path_prefix":"/healthz","cost":0},{"name":"search","path_prefix":"/search","cost":2}]"#,
        );
        let default = TenantId::new(b"default").unwrap();
        let run = |tenant: &'static str, path: &'static str| {
            let mut req = Req::new("GET", path).header("x-tenant-id", tenant);
            let mut lookup = Lookup::new(&mut req);
            let (m, t) = meter(&c, &default, &mut lookup);
            let t = t.unwrap().0.as_str().to_string();
            match m {
                Metering::Free => (t, 0, None),
                Metering::Charge { cost, rule } => (t, cost, rule.and_then(|(_, r)| r.name.clone())),
            }
        };
        assert_eq!(run("acme", "/search/x"), ("acme".into(), 3, Some("acme-search".into())));
        assert_eq!(run("acme", "/free"), ("acme".into(), 0, None));
        assert_eq!(run("acme", "/searchx"), ("acme".into(), 2, Some("search".into())), "falls to the top level");
        assert_eq!(run("acme", "/healthz"), ("acme".into(), 0, None));
        assert_eq!(run("globex", "/search/x"), ("globex".into(), 2, Some("search".into())));
        assert_eq!(run("zed", "/free"), ("zed".into(), 0, None), "no rule: unmetered");
        // Ids: the top-level list first, then acme's; Config::rule finds each by id.
        let ids: Vec<_> = c.all_rules().map(|r| (r.id, r.name.clone())).collect();
        assert_eq!(ids.len(), 4);
        for (id, name) in ids {
            assert_eq!(c.rule(id).map(|r| r.name.clone()), Some(name));
        }
        assert!(c.rule(4).is_none());
    }

    #[test]
    fn without_tenant_rules_an_unmetered_request_never_resolves_its_tenant() {
        let c = config(r#""rules":[{"path_prefix":"/api"}]"#);
        let default = TenantId::new(b"default").unwrap();
        let mut req = Req::new("GET", "/healthz").header("x-tenant-id", "acme");
        let (m, t) = meter(&c, &default, &mut Lookup::new(&mut req));
        assert_eq!((m, t.is_none()), (Metering::Free, true));
        assert_eq!(req.reads, [":path"]);
        // With top-level rules empty and a tenant list that does not match: cost 1, no rule.
        let c = config(r#""tenants":{"acme":{"rules":[{"path":"/x","cost":0}]}}"#);
        let mut req = Req::new("GET", "/y").header("x-tenant-id", "acme");
        assert_eq!(meter(&c, &default, &mut Lookup::new(&mut req)).0, Metering::Charge { cost: 1, rule: None });
    }

    #[test]
    fn rule_ids_survive_sparse_tenant_lists() {
        let c = config(
            r#""tenants":{"a":{"rules":[{"name":"a1"}]},"b":{},"c":{"rules":[{"name":"c1"},{"name":"c2"}]},"d":{}},
               "rules":[{"name":"t1"}]"#,
        );
        let names: Vec<_> = (0..5).map(|id| c.rule(id).and_then(|r| r.name.clone())).collect();
        let want = ["t1", "a1", "c1", "c2"].map(|s| Some(s.to_string()));
        assert_eq!(names[..4], want);
        assert_eq!(names[4], None);
        assert_eq!(c.tenant_rules.len(), c.tenants.len());
    }

    #[test]
    fn display_for_the_checker() {
        let r = rules(
            r#"[{"methods":["GET","HEAD"]},{"path_separated_prefix":"/healthz","cost":0},
                {"path":"/x","host":"*.example.com","headers":[{"name":"x-d","exact":"1"},{"name":"x-e","absent":true}],"route":"r"}]"#,
        );
        let shown: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown[0], "GET,HEAD /* cost 1");
        assert_eq!(shown[1], "ANY /healthz[/*] cost 0");
        assert_eq!(shown[2], "ANY /x host *.example.com header x-d=1 header x-e absent route r cost 1");
    }

    proptest! {
        /// path_separated_prefix p == (path == p) or path starts with p + "/" (query stripped);
        /// it never matches more than path_prefix p does.
        #[test]
        fn separated_prefix_model(p in "/[a-z]{1,3}(/[a-z]{1,3})?", rest in "[a-z/?#%]{0,6}") {
            let path = format!("{p}{rest}");
            let bare = path.split(['?', '#']).next().unwrap_or("");
            let want = bare == p || bare.starts_with(&format!("{p}/"));
            prop_assert_eq!(seg(&p).matches(path.as_bytes()), want);
            if want {
                prop_assert!(PathMatch::Prefix(p.clone()).matches(path.as_bytes()));
            }
        }

        #[test]
        fn any_authority_is_safe_and_port_never_matters(host in "[a-zA-Z0-9.-]{0,12}", port in 0u32..70000) {
            let with_port = format!("{host}:{port}");
            prop_assert_eq!(host_of(with_port.as_bytes()), host_of(host.as_bytes()));
            let suffix = HostMatch::Suffix(".example.com".into());
            let lower = host.to_ascii_lowercase();
            let lower = lower.strip_suffix('.').unwrap_or(&lower);
            let want = lower.len() > 12 && lower.ends_with(".example.com");
            prop_assert_eq!(suffix.matches(host_of(with_port.as_bytes())), want);
        }

        #[test]
        fn any_bytes_never_panic(authority: Vec<u8>, path: Vec<u8>) {
            let _ = host_of(&authority);
            for m in [PathMatch::Prefix("/a".into()), PathMatch::Exact("/a".into()), seg("/a")] {
                let _ = m.matches(&path);
            }
        }
    }
}
