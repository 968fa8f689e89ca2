//! `tenant-ratelimit-check FILE...`: validates plugin configs with exactly the filter's
//! parser. A FILE is a JSON plugin config, or YAML holding one or more: an Istio WasmPlugin
//! (`spec.pluginConfig`), an EnvoyFilter or an Envoy bootstrap (each Wasm filter's
//! `configuration` StringValue). Prints the effective limits, or the error the filter would
//! log; exits 1 on any error, 2 on usage errors.

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
            match Config::from_value(json) {
                Ok(config) => {
                    println!("{file}: {place}:");
                    print_limits(&config);
                }
                Err(e) => return Err(format!("{place}: {e}")),
            }
        }
        Ok(configs.len())
    }

    fn find_configs(file: &str, text: &str) -> Result<Vec<(String, Value)>, String> {
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
            let mode = p.mode.unwrap_or(c.mode);
            for (i, (limit, about)) in p.limits.iter().zip(&p.about).enumerate() {
                // One line per limit; a policy with several names each (`name/limit`).
                let name = if p.limits.len() > 1 { format!("{}/{}", p.name, about.name) } else { p.name.clone() };
                let kind = if i == 0 { kind } else { "" };
                println!(
                    "  {kind:<8} {name:<24} capacity {:>10}  rate {:>12}/s {:>12}/min  window {}s  mode {:?}",
                    limit.capacity,
                    fmt(about.rate_per_second),
                    fmt(about.rate_per_second * 60.0),
                    limit.window_seconds(),
                    mode
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
        for t in &c.tenants {
            line("tenant", t);
        }
        for r in &c.rules {
            let what = format!(
                "{} {}* cost {}",
                if r.methods.is_empty() { "ANY".to_string() } else { r.methods.join(",") },
                r.path_prefix,
                r.cost
            );
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

    /// Longer windows than this are not kept by a local bucket across restarts.
    const LONG_WINDOW_SECONDS: u64 = 3600;

    fn kind_name(p: &Policy, c: &Config) -> &'static str {
        if std::ptr::eq(p, &c.default_policy) {
            "the top level"
        } else if c.tenants.iter().any(|t| std::ptr::eq(t, p)) {
            "tenant"
        } else {
            "rule"
        }
    }

    fn fmt(x: f64) -> String {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}
