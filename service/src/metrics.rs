//! Prometheus text metrics, kept with atomics (decisions per domain behind a short mutex:
//! the domain set is the config's, plus "unknown", so the label set is bounded).

use crate::plan::Miss;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the Redis latency histogram, in microseconds.
const BUCKETS_US: &[u64] = &[100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

#[derive(Default)]
pub struct Metrics {
    pub calls_ok: AtomicU64,
    pub calls_over_limit: AtomicU64,
    /// Refused per config (`unmatched: "error"`, too many descriptors, ...).
    pub calls_refused: AtomicU64,
    pub calls_redis_error: AtomicU64,
    /// Tokens asked for by the descriptors that were decided (the sum of their costs, whether
    /// admitted or not): with `calls`, shows the `hits_addend` the clients send (a lease's size).
    pub hits: AtomicU64,
    pub redis_errors: AtomicU64,
    pub redis_timeouts: AtomicU64,
    /// `--redis-wait-replicas`: fewer replicas acknowledged a write than required.
    pub redis_replicas: AtomicU64,
    /// Descriptors answered OK without a limit, by `plan::Miss`.
    pub unmatched: [AtomicU64; 3],
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
    latency: [AtomicU64; 13],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    /// domain -> descriptors decided [ok, over_limit]. Looked up by `&str` first, so a call
    /// allocates nothing once its domain is known.
    decisions: Mutex<BTreeMap<String, [u64; 2]>>,
}

impl Metrics {
    pub fn redis_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        if let Some(c) = self.latency.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn decisions(&self, domain: &str, ok: u64, over: u64) {
        if let Ok(mut m) = self.decisions.lock() {
            match m.get_mut(domain) {
                Some([o, v]) => {
                    *o += ok;
                    *v += over;
                }
                None => {
                    m.insert(domain.to_string(), [ok, over]);
                }
            }
        }
    }

    pub fn render(&self, redis_commands: u64) -> String {
        let mut s = String::with_capacity(2048);
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP trl_service_calls_total ShouldRateLimit calls by result.");
        let _ = writeln!(s, "# TYPE trl_service_calls_total counter");
        for (result, v) in [
            ("ok", &self.calls_ok),
            ("over_limit", &self.calls_over_limit),
            ("refused", &self.calls_refused),
            ("redis_error", &self.calls_redis_error),
        ] {
            let _ = writeln!(s, "trl_service_calls_total{{result=\"{result}\"}} {}", g(v));
        }
        let _ = writeln!(s, "# HELP trl_service_hits_total Tokens requested by decided descriptors.");
        let _ = writeln!(s, "# TYPE trl_service_hits_total counter");
        let _ = writeln!(s, "trl_service_hits_total {}", g(&self.hits));
        let _ = writeln!(s, "# HELP trl_service_decisions_total Descriptors decided, by domain and code.");
        let _ = writeln!(s, "# TYPE trl_service_decisions_total counter");
        if let Ok(m) = self.decisions.lock() {
            for (domain, [ok, over]) in m.iter() {
                let domain = domain.replace('\\', "\\\\").replace('"', "\\\"");
                for (code, v) in [("ok", ok), ("over_limit", over)] {
                    let _ = writeln!(s, "trl_service_decisions_total{{domain=\"{domain}\",code=\"{code}\"}} {v}");
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP trl_service_unmatched_total Descriptors answered OK with no limit (unmatched: ok), by reason."
        );
        let _ = writeln!(s, "# TYPE trl_service_unmatched_total counter");
        for miss in Miss::ALL {
            let v = self.unmatched.get(miss as usize).map_or(0, g);
            let _ = writeln!(s, "trl_service_unmatched_total{{reason=\"{}\"}} {v}", miss.label());
        }
        let _ = writeln!(
            s,
            "# HELP trl_service_redis_errors_total Redis calls that failed (error, timeout, replicas: WAIT short)."
        );
        let _ = writeln!(s, "# TYPE trl_service_redis_errors_total counter");
        let _ = writeln!(s, "trl_service_redis_errors_total{{kind=\"error\"}} {}", g(&self.redis_errors));
        let _ = writeln!(s, "trl_service_redis_errors_total{{kind=\"timeout\"}} {}", g(&self.redis_timeouts));
        let _ = writeln!(s, "trl_service_redis_errors_total{{kind=\"replicas\"}} {}", g(&self.redis_replicas));
        let _ = writeln!(
            s,
            "# HELP trl_service_redis_commands_total Commands sent to Redis (EVALSHA, EVAL after NOSCRIPT)."
        );
        let _ = writeln!(s, "# TYPE trl_service_redis_commands_total counter");
        let _ = writeln!(s, "trl_service_redis_commands_total {redis_commands}");
        let _ = writeln!(s, "# HELP trl_service_config_reloads_total SIGHUP reloads by result.");
        let _ = writeln!(s, "# TYPE trl_service_config_reloads_total counter");
        let _ = writeln!(s, "trl_service_config_reloads_total{{result=\"ok\"}} {}", g(&self.reloads));
        let _ = writeln!(s, "trl_service_config_reloads_total{{result=\"error\"}} {}", g(&self.reload_errors));
        let _ = writeln!(s, "# HELP trl_service_redis_seconds Time for one request's Redis script calls.");
        let _ = writeln!(s, "# TYPE trl_service_redis_seconds histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cumulative += self.latency.get(i).map_or(0, g);
            let _ = writeln!(s, "trl_service_redis_seconds_bucket{{le=\"{}\"}} {cumulative}", *b as f64 / 1e6);
        }
        cumulative += self.latency.get(BUCKETS_US.len()).map_or(0, g);
        let _ = writeln!(s, "trl_service_redis_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(s, "trl_service_redis_seconds_sum {}", g(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(s, "trl_service_redis_seconds_count {}", g(&self.latency_count));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.calls_ok.fetch_add(2, Ordering::Relaxed);
        m.hits.fetch_add(11, Ordering::Relaxed);
        m.decisions("tenants", 3, 1);
        m.redis_latency(Duration::from_micros(300));
        m.redis_latency(Duration::from_secs(5));
        m.unmatched[Miss::UnknownRule as usize].fetch_add(4, Ordering::Relaxed);
        let text = m.render(7);
        assert!(text.contains("trl_service_calls_total{result=\"ok\"} 2\n"));
        assert!(text.contains("trl_service_decisions_total{domain=\"tenants\",code=\"over_limit\"} 1\n"));
        assert!(text.contains("trl_service_redis_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("trl_service_redis_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("trl_service_redis_commands_total 7\n"));
        assert!(text.contains("trl_service_hits_total 11\n"));
        assert!(text.contains("trl_service_unmatched_total{reason=\"unknown_rule\"} 4\n"));
        assert!(text.contains("trl_service_unmatched_total{reason=\"unknown_domain\"} 0\n"));
    }
}
