//! `tenant-ratelimit-check FILE...`: validates plugin configs with exactly the filter's
//! parser. A FILE is a JSON plugin config, or YAML holding one or more: an Istio WasmPlugin
//! (`spec.pluginConfig`), an EnvoyFilter or an Envoy bootstrap (each Wasm filter's
//! `configuration` StringValue). Prints the effective limits, or the error the filter would
//! log; exits 1 on any error, 2 on usage errors.
//!
//! `tenant-ratelimit-check FILE --explain 'GET /path?q' -H 'name: value' ... [--route NAME]
//! [--peer ADDR]`: what the filter would do with that request under each config in FILE (its
//! tenant and the source that gave it, the rule, the cost, the policy and its limits), decided
//! by the filter's own code (`rules::meter`) over the request given on the command line.

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    native::main();
}

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use serde_json::Value;
    use std::process::exit;
    use tenant_ratelimit::config::{Config, HeaderStyle, Overflow, Policy};

    pub fn main() {
        let files: Vec<String> = std::env::args().skip(1).collect();
        if files.iter().any(|a| a == "--explain") {
            exit(explain::main(&files));
        }
        if files.is_empty() || files.iter().any(|f| f == "-h" || f == "--help") {
            eprintln!(
                "usage: tenant-ratelimit-check FILE...  (JSON plugin config, WasmPlugin, EnvoyFilter or Envoy YAML)"
            );
            exit(2);
        }
        let mut failed = false;
        for file in &files {
            match check_file(file) {
                Ok(n) => println!("{file}: OK ({n} config{})", if n == 1 { "" } else { "s" }),
                Err(message) => {
                    println!("{file}: {message}");
                    failed = true;
                }
            }
        }
        exit(i32::from(failed));
    }

    /// Checks every config in the file; returns how many were found.
    fn check_file(file: &str) -> Result<usize, String> {
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
        let configs = find_configs(file, &text)?;
        if configs.is_empty() {
            return Err("no tenant-ratelimit configuration found (looked for a JSON config, \
                        WasmPlugin spec.pluginConfig, and Wasm filter `configuration` values)"
                .into());
        }
        for (place, json) in &configs {
            match Config::from_value(&tenant_ratelimit::json::Value::from(json)) {
                Ok(config) => {
                    println!("{file}: {place}:");
                    print_limits(&config);
                }
                Err(e) => return Err(format!("{place}: {e}")),
            }
        }
        Ok(configs.len())
    }

    pub(super) fn find_configs(file: &str, text: &str) -> Result<Vec<(String, Value)>, String> {
        if file.ends_with(".json") {
            let v: Value =
                serde_json::from_str(text).map_err(|e| format!("invalid plugin config: not valid JSON: {e}"))?;
            return Ok(vec![("config".into(), v)]);
        }
        let mut out = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let yaml: serde_yaml::Value =
                serde::Deserialize::deserialize(doc).map_err(|e| format!("not valid YAML: {e}"))?;
            let json: Value = serde_json::to_value(&yaml).map_err(|e| format!("document {i}: {e}"))?;
            let kind = json.get("kind").and_then(Value::as_str).unwrap_or("");
            let name = json.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            let label = if kind.is_empty() { format!("document {i}") } else { format!("{kind} {name}") };
            if kind == "WasmPlugin" {
                match json.pointer("/spec/pluginConfig") {
                    Some(c) => out.push((format!("{label} spec.pluginConfig"), c.clone())),
                    None => return Err(format!("{label}: has no spec.pluginConfig")),
                }
                continue;
            }
            collect_wasm_configurations(&json, &label, &mut out)?;
        }
        Ok(out)
    }

    /// Finds `configuration: {"@type": ...StringValue, value: "<json>"}` under any Wasm filter.
    fn collect_wasm_configurations(v: &Value, label: &str, out: &mut Vec<(String, Value)>) -> Result<(), String> {
        match v {
            Value::Object(map) => {
                if let Some(conf) = map.get("configuration") {
                    let is_wasm = map.contains_key("vm_config") || map.contains_key("vmConfig");
                    if is_wasm {
                        let text = conf.get("value").and_then(Value::as_str).ok_or_else(|| {
                            format!(
                                "{label}: Wasm `configuration` must be a google.protobuf.StringValue with a `value`"
                            )
                        })?;
                        let json: Value = serde_json::from_str(text)
                            .map_err(|e| format!("{label}: invalid plugin config: not valid JSON: {e}"))?;
                        let name = map.get("name").and_then(Value::as_str).unwrap_or("wasm");
                        out.push((format!("{label} filter {name}"), json));
                        return Ok(());
                    }
                }
                for child in map.values() {
                    collect_wasm_configurations(child, label, out)?;
                }
            }
            Value::Array(items) => {
                for child in items {
                    collect_wasm_configurations(child, label, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn print_limits(c: &Config) {
        let line = |kind: &str, p: &Policy| {
            let enforced = match tenant_ratelimit::policy::enforced_percent(c, p) {
                0 => "shadow".to_string(),
                100 => "enforce".to_string(),
                n => format!("enforce {n}%"),
            };
            let plan =
                p.plan.and_then(|i| c.plans.get(i)).map(|plan| format!("  plan {}", plan.name)).unwrap_or_default();
            for (i, (limit, about)) in p.limits.iter().zip(&p.about).enumerate() {
                // One line per limit; a policy with several names each (`name/limit`).
                let name = if p.limits.len() > 1 { format!("{}/{}", p.name, about.name) } else { p.name.clone() };
                let kind = if i == 0 { kind } else { "" };
                println!(
                    "  {kind:<8} {name:<24} capacity {:>10}  rate {:>12}/s {:>12}/min  window {}s  {enforced}{plan}",
                    limit.capacity,
                    fmt(about.rate_per_second),
                    fmt(about.rate_per_second * 60.0),
                    limit.window_seconds(),
                );
                // Local buckets live in the proxy's memory: a restart starts them full.
                if c.global.is_none() && limit.window_seconds() > LONG_WINDOW_SECONDS {
                    println!(
                        "  warning: limit \"{}\" of {kind_name} \"{}\" has a window of {}s (capacity / rate, over an hour) \
                         but no `global` section: local buckets start full after an Envoy restart or a new Wasm \
                         module, so put a quota this long in the rate-limit service (`global`; README \
                         \"Several limits on one policy\")",
                        about.name,
                        p.name,
                        limit.window_seconds(),
                        kind_name = kind_name(p, c),
                    );
                }
            }
        };
        line("default", &c.default_policy);
        for p in &c.plans {
            line("plan", p);
        }
        for t in &c.tenants {
            line("tenant", t);
        }
        for r in c.all_rules() {
            let what = match rule_place(c, r.id).0.as_str() {
                "rules" => r.to_string(),
                list => format!("{r} ({list} only)"),
            };
            match &r.policy {
                Some(p) => {
                    line("rule", p);
                    println!("           matches {what}");
                }
                None => println!("  rule     {:<24} {what} (tenant bucket)", r.name.as_deref().unwrap_or("-")),
            }
        }
        let sources: Vec<String> = c.tenant_sources.iter().map(|s| format!("{s:?}")).collect();
        println!("  tenant from [{}], default \"{}\"", sources.join(", "), c.default_tenant);
        if !c.plans.is_empty() {
            let from: Vec<String> = c.plan_sources.iter().map(|s| format!("{s:?}")).collect();
            let default = c.default_plan.and_then(|i| c.plans.get(i)).map_or("none (top level)", |p| p.name.as_str());
            println!("  plan from [{}], default plan {default}", from.join(", "));
        }
        if c.shadow_header.is_some() || c.filter_state {
            println!(
                "  shadow header {} | filter state {}",
                c.shadow_header.as_deref().unwrap_or("off"),
                if c.filter_state { "wasm.tenant_ratelimit" } else { "off" }
            );
        }
        let headers = match c.headers {
            HeaderStyle::Off => "off",
            HeaderStyle::XRateLimit => "x-ratelimit",
            HeaderStyle::Ietf => "ietf",
        };
        let overflow = match c.overflow {
            Overflow::Deny => "deny".to_string(),
            Overflow::Bucket(l) => format!("shared bucket, capacity {}", l.capacity),
        };
        println!(
            "  deny {} (gRPC status {}) | headers {headers} | on_store_error {:?} | max_tenants {} | overflow {overflow} | unknown_tenants {:?}",
            c.deny.status, c.deny.grpc_status, c.on_store_error, c.max_tenants, c.unknown_tenants
        );
    }

    /// Where the rule with this id is written: its list (`rules`, `tenants.<t>.rules` or
    /// `plans.<p>.rules`) and its index in that list.
    pub(super) fn rule_place(c: &Config, id: usize) -> (String, usize) {
        let lists = c.tenants.iter().zip(&c.tenant_rules).map(|(t, set)| ("tenants", t, set));
        let lists = lists.chain(c.plans.iter().zip(&c.plan_rules).map(|(p, set)| ("plans", p, set)));
        for (kind, owner, set) in lists {
            if let Some(i) = set.iter().position(|r| r.id == id) {
                return (format!("{kind}.{}.rules", owner.name), i);
            }
        }
        ("rules".to_string(), id)
    }

    /// Longer windows than this are not kept by a local bucket across restarts.
    const LONG_WINDOW_SECONDS: u64 = 3600;

    fn kind_name(p: &Policy, c: &Config) -> &'static str {
        if std::ptr::eq(p, &c.default_policy) {
            "the top level"
        } else if c.tenants.iter().any(|t| std::ptr::eq(t, p)) {
            "tenant"
        } else if c.plans.iter().any(|t| std::ptr::eq(t, p)) {
            "plan"
        } else {
            "rule"
        }
    }

    pub(super) fn fmt(x: f64) -> String {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }

    /// `--explain`: one request, decided by the filter's own code.
    mod explain {
        use super::{find_configs, fmt, rule_place};
        use tenant_ratelimit::config::{Config, GlobalMode, Policy, UnknownTenants};
        use tenant_ratelimit::policy::{self, PolicyId};
        use tenant_ratelimit::rules::{self, Lookup, Metering};
        use tenant_ratelimit::tenant::{self, Origin, RequestFacts, TenantId, TenantSource};

        const USAGE: &str = "usage: tenant-ratelimit-check FILE --explain 'METHOD /path?query' \
                             [-H 'name: value']... [--route NAME] [--peer IP:PORT]";

        /// The request given on the command line, as the filter would see it.
        #[derive(Debug, Default, Clone, PartialEq)]
        pub struct CliRequest {
            pub method: String,
            pub path: String,
            /// Lower-case names; `host` is `:authority`, as Envoy has it.
            pub headers: Vec<(String, String)>,
            /// `xds.route_name`.
            pub route: Option<String>,
            /// `source.address`.
            pub peer: Option<String>,
        }

        impl RequestFacts for CliRequest {
            fn header(&mut self, name: &str) -> Option<Vec<u8>> {
                match name {
                    ":method" => Some(self.method.clone().into_bytes()),
                    ":path" => Some(self.path.clone().into_bytes()),
                    // proxy-wasm gives a filter the first value of a repeated header.
                    _ => self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone().into_bytes()),
                }
            }
            fn path(&mut self) -> Option<&[u8]> {
                Some(self.path.as_bytes())
            }
            fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
                match path {
                    ["source", "address"] => self.peer.clone().map(String::into_bytes),
                    ["xds", "route_name"] => self.route.clone().map(String::into_bytes),
                    _ => None,
                }
            }
        }

        /// `(file, request)` from the arguments.
        pub fn parse_args(args: &[String]) -> Result<(String, CliRequest), String> {
            let mut file = None;
            let mut request = None;
            let mut req = CliRequest::default();
            let mut args = args.iter();
            while let Some(arg) = args.next() {
                let mut value = || args.next().cloned().ok_or(format!("{arg} needs a value"));
                match arg.as_str() {
                    "--explain" => request = Some(value()?),
                    "-H" | "--header" => {
                        let h = value()?;
                        let (name, v) = h.split_once(':').ok_or(format!("header \"{h}\" is not 'name: value'"))?;
                        let name = name.trim().to_ascii_lowercase();
                        let name = if name == "host" { ":authority".to_string() } else { name };
                        req.headers.push((name, v.trim().to_string()));
                    }
                    "--route" => req.route = Some(value()?),
                    "--peer" => req.peer = Some(value()?),
                    a if a.starts_with('-') => return Err(format!("unknown option {a}")),
                    a if file.is_none() => file = Some(a.to_string()),
                    a => return Err(format!("one FILE with --explain, got also {a}")),
                }
            }
            let request = request.ok_or("--explain needs a request")?;
            let (method, path) =
                request.split_once(' ').ok_or(format!("request \"{request}\" is not 'METHOD /path'"))?;
            (req.method, req.path) = (method.to_string(), path.trim().to_string());
            Ok((file.ok_or("no FILE")?, req))
        }

        pub fn main(args: &[String]) -> i32 {
            let (file, req) = match parse_args(args) {
                Ok(parsed) => parsed,
                Err(e) => {
                    eprintln!("{e}\n{USAGE}");
                    return 2;
                }
            };
            let configs =
                match std::fs::read_to_string(&file).map_err(|e| e.to_string()).and_then(|t| find_configs(&file, &t)) {
                    Ok(c) if !c.is_empty() => c,
                    Ok(_) => {
                        println!("{file}: no tenant-ratelimit configuration found");
                        return 1;
                    }
                    Err(e) => {
                        println!("{file}: {e}");
                        return 1;
                    }
                };
            for (place, json) in &configs {
                match Config::from_value(&tenant_ratelimit::json::Value::from(json)) {
                    Ok(config) => print!("{file}: {place}:\n{}", explain(&config, &req)),
                    Err(e) => {
                        println!("{file}: {place}: {e}");
                        return 1;
                    }
                }
            }
            0
        }

        /// What the filter would do with `req` under `config`, one `label  text` line each.
        pub fn explain(config: &Config, req: &CliRequest) -> String {
            let mut facts = req.clone();
            let mut out = vec![("request", format!("{} {}", req.method, req.path))];
            let Some(default) = TenantId::new(config.default_tenant.as_bytes()) else {
                return String::new();
            };
            let (tenant, origin) = tenant::resolve_from(&config.tenant_sources, &default, &mut facts);
            let from = match origin {
                Origin::Source(i) => format!("tenant.from[{i}]: {}", source(config.tenant_sources.get(i))),
                Origin::Default => "tenant.default: no source gave a valid id".to_string(),
                Origin::Refused(i) => {
                    format!("tenant.default: tenant.from[{i}] source_ip refuses an address Envoy took from a header")
                }
            };
            let listed = config.tenant_index(tenant.as_bytes()).is_some();
            let kind = if listed { "listed" } else { "not listed" };
            out.push(("tenant", format!("{} ({kind}; from {from})", tenant.as_str())));
            let (metering, _) = rules::meter(config, &default, &mut Lookup::new(&mut facts));
            let cost = match metering {
                Metering::Charge { cost, .. } => cost,
                Metering::Free => 0,
            };
            let plan = policy::plan_of(config, &tenant, &mut facts);
            let rule = rules::first_rule(config, Some(&(tenant, plan)), &mut Lookup::new(&mut facts));
            let rule_text = match rule {
                Some(r) => {
                    let (list, i) = rule_place(config, r.id);
                    let name = r.name.as_deref().map(|n| format!(" \"{n}\"")).unwrap_or_default();
                    format!("{list}[{i}]{name}: {r}")
                }
                None if config.rules.is_empty() => "none configured: every request costs 1".to_string(),
                None => "no rule matches: unmetered".to_string(),
            };
            out.push(("rule", rule_text));
            if cost == 0 {
                out.push(("cost", "0: unmetered (no bucket is debited)".to_string()));
                return lines(&out);
            }
            out.push(("cost", cost.to_string()));
            if !config.plans.is_empty() {
                let name =
                    plan.and_then(|p| config.plans.get(p)).map_or("none (the top-level limit)", |p| p.name.as_str());
                out.push(("plan", name.to_string()));
            }
            let id = PolicyId::of(config, &tenant, plan, rule.map(|r| (r.id, r)));
            let policy = id.policy(config);
            let whose = match id {
                PolicyId::Rule(_) => "the rule's own limit: a bucket per tenant and rule",
                PolicyId::Tenant(_) => "the listed tenant's limit",
                PolicyId::TenantOnPlan(..) => "the listed tenant's limit, its unset fields from its plan",
                PolicyId::Plan(_) => match config.unknown_tenants {
                    UnknownTenants::Separate => "the plan's limit: a bucket per tenant",
                    UnknownTenants::Shared => "the plan's limit: one bucket for the plan's unlisted tenants",
                },
                PolicyId::Default => match config.unknown_tenants {
                    UnknownTenants::Separate => "the top-level limit: a bucket per tenant",
                    UnknownTenants::Shared => "the top-level limit: one bucket for all unlisted tenants",
                },
            };
            let enforced = match policy::enforced_percent(config, policy) {
                0 => "shadow".to_string(),
                100 => "enforce".to_string(),
                n => format!("enforce {n}% of denials"),
            };
            out.push(("policy", format!("{} ({whose}), {enforced}", policy.name)));
            out.extend(limit_lines(policy).into_iter().map(|l| ("limit", l)));
            if let Some(g) = &config.global {
                let who = match g.mode {
                    GlobalMode::Global => "the rate-limit service decides (the local limit above is not used)",
                    GlobalMode::Both => "the local limit above first, then the rate-limit service",
                };
                out.push(("service", format!("{who}: cluster {}, domain {}", g.cluster, g.domain)));
            }
            lines(&out)
        }

        /// Every limit of a policy: capacity, rate, window.
        fn limit_lines(p: &Policy) -> Vec<String> {
            p.limits
                .iter()
                .zip(&p.about)
                .map(|(limit, about)| {
                    let named = if p.limits.len() > 1 { format!("\"{}\": ", about.name) } else { String::new() };
                    format!(
                        "{named}capacity {}, rate {}/s ({}/min), refills from empty in {}s",
                        limit.capacity,
                        fmt(about.rate_per_second),
                        fmt(about.rate_per_second * 60.0),
                        limit.window_seconds()
                    )
                })
                .collect()
        }

        fn source(s: Option<&TenantSource>) -> String {
            match s {
                Some(TenantSource::Header(n)) => format!("header {n}"),
                Some(TenantSource::Query(n)) => format!("query parameter {n}"),
                Some(TenantSource::SourceIp { .. }) => "source_ip (Envoy's source.address)".to_string(),
                Some(TenantSource::Xff { trusted_hops }) => format!("xff, {trusted_hops} trusted hops"),
                Some(TenantSource::PeerPrincipal) => "peer_principal".to_string(),
                Some(TenantSource::JwtClaim { claim_path, .. }) => format!("jwt_claim {}", claim_path.join(".")),
                None => String::new(),
            }
        }

        fn lines(out: &[(&str, String)]) -> String {
            out.iter().map(|(label, text)| format!("  {label:<8} {text}\n")).collect()
        }

        #[cfg(test)]
        mod tests {
            #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
            use super::*;

            const CONFIG: &str = r#"{"capacity":60,"refill_rate":"60/min",
                "tenant":{"from":[{"header":"x-tenant-id"},{"source_ip":true}]},
                "tenants":{"acme":{"capacity":120,"refill_rate":"120/min",
                    "rules":[{"name":"acme-export","path_separated_prefix":"/export","capacity":2,"refill_rate":"2/min"}]}},
                "rules":[{"path_separated_prefix":"/healthz","cost":0},
                         {"name":"eu","host":"*.eu.example.com","capacity":30,"refill_rate":"30/min"},
                         {"headers":[{"name":"x-debug","exact":"1"}],"cost":10},
                         {"name":"reviews","route":"reviews-v2","cost":2},
                         {"methods":["GET"]}]}"#;

            fn run(args: &[&str]) -> String {
                let mut all = vec!["f.json".to_string(), "--explain".into()];
                all.extend(args.iter().map(|a| a.to_string()));
                let (_, req) = parse_args(&all).unwrap();
                explain(&Config::from_json_bytes(CONFIG.as_bytes()).unwrap(), &req)
            }

            fn line<'a>(out: &'a str, label: &str) -> &'a str {
                out.lines().find_map(|l| l.trim_start().strip_prefix(label)).map_or("", str::trim)
            }

            #[test]
            fn health_check_exempt_and_lookalike_metered() {
                let out = run(&["GET /healthz/live"]);
                assert_eq!(line(&out, "rule"), "rules[0]: ANY /healthz[/*] cost 0");
                assert_eq!(line(&out, "cost"), "0: unmetered (no bucket is debited)");
                assert_eq!(line(&out, "policy"), "");
                let out = run(&["GET /healthzfoo"]);
                assert_eq!(line(&out, "rule"), "rules[4]: GET /* cost 1");
                assert_eq!(
                    line(&out, "tenant"),
                    "default (not listed; from tenant.default: no source gave a valid id)"
                );
                assert_eq!(line(&out, "policy"), "default (the top-level limit: a bucket per tenant), enforce");
                assert_eq!(line(&out, "limit"), "capacity 60, rate 1/s (60/min), refills from empty in 60s");
                assert_eq!(line(&run(&["POST /x"]), "rule"), "no rule matches: unmetered");
            }

            #[test]
            fn tenant_rule_host_header_and_route() {
                let out = run(&["GET /export/a.csv", "-H", "X-Tenant-Id: acme"]);
                assert_eq!(line(&out, "tenant"), "acme (listed; from tenant.from[0]: header x-tenant-id)");
                assert_eq!(line(&out, "rule"), "tenants.acme.rules[0] \"acme-export\": ANY /export[/*] cost 1");
                assert!(line(&out, "policy").starts_with("acme-export (the rule's own limit"), "{out}");
                assert_eq!(line(&out, "limit"), "capacity 2, rate 0.033333/s (2/min), refills from empty in 60s");
                let out = run(&["GET /x", "-H", "Host: A.eu.example.com:8443", "-H", "x-tenant-id: globex"]);
                assert_eq!(line(&out, "rule"), "rules[1] \"eu\": ANY /* host *.eu.example.com cost 1");
                let out = run(&["GET /x", "-H", "x-debug: 1", "-H", "x-tenant-id: acme"]);
                assert_eq!(
                    (line(&out, "cost"), line(&out, "policy")),
                    ("10", "acme (the listed tenant's limit), enforce")
                );
                let out = run(&["GET /r", "--route", "reviews-v2"]);
                assert_eq!(line(&out, "rule"), "rules[3] \"reviews\": ANY /* route reviews-v2 cost 2");
                assert_eq!(line(&run(&["GET /r", "--route", "other"]), "rule"), "rules[4]: GET /* cost 1");
            }

            #[test]
            fn peer_address_and_refused_header_derived_address() {
                let out = run(&["GET /", "--peer", "10.1.2.3:4000"]);
                assert_eq!(
                    line(&out, "tenant"),
                    "10.1.2.3 (not listed; from tenant.from[1]: source_ip (Envoy's source.address))"
                );
                let out = run(&["GET /", "--peer", "7.7.7.7:0"]);
                assert!(line(&out, "tenant")
                    .starts_with("default (not listed; from tenant.default: tenant.from[1] source_ip refuses"));
            }

            #[test]
            fn bad_arguments() {
                let parse = |args: &[&str]| parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
                assert!(parse(&["f", "--explain"]).is_err());
                assert!(parse(&["f", "--explain", "GET"]).is_err());
                assert!(parse(&["f", "--explain", "GET /", "-H", "novalue"]).is_err());
                assert!(parse(&["f", "--explain", "GET /", "--what"]).is_err());
                assert!(parse(&["f", "g", "--explain", "GET /"]).is_err());
                assert!(parse(&["--explain", "GET /"]).is_err());
                let (file, req) = parse(&["--explain", "GET /a?b", "f", "-H", "Host: h", "--route", "r"]).unwrap();
                assert_eq!((file.as_str(), req.method.as_str(), req.path.as_str()), ("f", "GET", "/a?b"));
                assert_eq!(req.headers, vec![(":authority".to_string(), "h".to_string())]);
                assert_eq!(req.route.as_deref(), Some("r"));
            }
        }
    }
}
