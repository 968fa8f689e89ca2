//! Stat names. Envoy shows proxy-wasm metrics under `wasmcustom.` (see README "Stats").
//! Per-tenant and per-rule counters exist only for names listed in the config, so the
//! number of stats is bounded by the config, never by traffic.

pub const PREFIX: &str = "tenant_ratelimit";

/// Counters every plugin has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Allowed = 0,
    Denied,
    ShadowDenied,
    CasRetries,
    StoreErrors,
    NearLimit,
    Unmetered,
    SlotsReclaimed,
    OverflowUsed,
    OverflowDenied,
    GlobalCalls,
    GlobalErrors,
    GlobalOverLimit,
    LeaseHits,
}

pub const COUNTERS: [(Counter, &str); 14] = [
    (Counter::Allowed, "allowed"),
    (Counter::Denied, "denied"),
    (Counter::ShadowDenied, "shadow_denied"),
    (Counter::CasRetries, "cas_retries"),
    (Counter::StoreErrors, "store_errors"),
    (Counter::NearLimit, "near_limit"),
    (Counter::Unmetered, "unmetered"),
    (Counter::SlotsReclaimed, "slots_reclaimed"),
    (Counter::OverflowUsed, "overflow_used"),
    (Counter::OverflowDenied, "overflow_denied"),
    (Counter::GlobalCalls, "global_calls"),
    (Counter::GlobalErrors, "global_errors"),
    (Counter::GlobalOverLimit, "global_over_limit"),
    (Counter::LeaseHits, "lease_hits"),
];

/// Gauge: shared-data keys this plugin created (there is no delete, so this is the key count).
pub const LIVE_SLOTS: &str = "live_slots";

/// Counters kept per listed tenant and per named rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoped {
    Allowed = 0,
    Denied,
    ShadowDenied,
}

pub const SCOPED: [(Scoped, &str); 3] =
    [(Scoped::Allowed, "allowed"), (Scoped::Denied, "denied"), (Scoped::ShadowDenied, "shadow_denied")];

pub fn global_name(counter: &str) -> String {
    format!("{PREFIX}.{counter}")
}

/// `tenant_ratelimit.tenant.<name>.<counter>`, with characters Envoy's stat names treat
/// specially (`.` splits, `:` tags) replaced by `_`.
pub fn scoped_name(scope: &str, name: &str, counter: &str) -> String {
    let clean: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{PREFIX}.{scope}.{clean}.{counter}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(global_name("allowed"), "tenant_ratelimit.allowed");
        assert_eq!(scoped_name("tenant", "acme.corp:1", "denied"), "tenant_ratelimit.tenant.acme_corp_1.denied");
        for (i, (c, _)) in COUNTERS.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, (c, _)) in SCOPED.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
