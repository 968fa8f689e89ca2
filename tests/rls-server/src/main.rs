//! rls-server: Envoy's rate-limit service (`envoy.service.ratelimit.v3.RateLimitService`)
//! over limitador with Redis counters, for the end-to-end tests.
//!
//! ```text
//! rls-server --listen 127.0.0.1:PORT --redis redis://127.0.0.1:PORT --limits FILE.json
//!            [--delay-ms N] [--stats-file FILE] [--no-statuses]
//! ```
//!
//! The limits file is a JSON list of limitador limits:
//! `[{"namespace": "tenants", "max_value": 20, "seconds": 60, "conditions": [], "variables": ["tenant"]}]`
//! (optional `"name"`). A request's `domain` is the namespace; each descriptor's entries become
//! the context variables (`tenant` = the entry with key `tenant`), so `variables: ["tenant"]`
//! keeps one counter per tenant. Conditions are limitador's (`tenant == "acme"`).
//!
//! Each descriptor is checked and counted with `hits_addend` (the descriptor's own, else the
//! request's; 0 or absent means 1). The check-then-increment of limitador's Redis storage is
//! not atomic across concurrent calls, so this server runs its calls one at a time: a single
//! rls-server is exact, which is what the tests assert.
//!
//! `--delay-ms` sleeps before answering (timeout tests). `--stats-file` is rewritten when a
//! call arrives and when it ends: `{"requests": N, "hits": H, "ok": A, "over_limit": B,
//! "errors": E, "cancelled": C}` (cancelled: the client reset the stream before the answer).
//! Each call is also logged to stdout as one `call ...` line. "listening on ADDR" is printed
//! once the socket is bound.
//!
//! `--no-statuses` answers with `overall_code` only, no descriptor statuses (no limit,
//! remaining or `duration_until_reset`), as Limitador's own RLS server does.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::limit::{Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitSpec {
    namespace: String,
    max_value: u64,
    seconds: u64,
    #[serde(default)]
    conditions: Vec<String>,
    #[serde(default)]
    variables: Vec<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    hits: AtomicU64,
    ok: AtomicU64,
    over_limit: AtomicU64,
    errors: AtomicU64,
    /// Calls whose stream the client reset before the answer (e.g. its timeout).
    cancelled: AtomicU64,
}

/// Logs and counts a call dropped before it answered (tonic drops the handler's future when
/// the client resets the stream, e.g. at the filter's `timeout_ms`).
struct InFlight<'a> {
    rls: &'a Rls,
    n: u64,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.rls.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "call {} -> CANCELLED (stream reset before the answer)", self.n);
            let _ = out.flush();
            drop(out);
            self.rls.write_stats();
        }
    }
}

struct Rls {
    limiter: AsyncRateLimiter,
    /// Serialises check-and-update (see the module doc).
    lock: Mutex<()>,
    delay: Duration,
    stats: Stats,
    stats_file: Option<PathBuf>,
    /// Held while the stats file is written: two calls ending at once must not rename their
    /// snapshots in the opposite order (the file would go back to older counts).
    stats_write: std::sync::Mutex<()>,
    /// Answer without descriptor statuses (as Limitador).
    no_statuses: bool,
}

fn unit_for(seconds: u64) -> Option<Unit> {
    match seconds {
        1 => Some(Unit::Second),
        60 => Some(Unit::Minute),
        3600 => Some(Unit::Hour),
        86400 => Some(Unit::Day),
        604800 => Some(Unit::Week),
        _ => None,
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

impl Rls {
    fn write_stats(&self) {
        let Some(path) = &self.stats_file else { return };
        let _serial = self.stats_write.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.stats;
        let text = format!(
            "{{\"requests\": {}, \"hits\": {}, \"ok\": {}, \"over_limit\": {}, \"errors\": {}, \"cancelled\": {}}}\n",
            s.requests.load(Ordering::SeqCst),
            s.hits.load(Ordering::SeqCst),
            s.ok.load(Ordering::SeqCst),
            s.over_limit.load(Ordering::SeqCst),
            s.errors.load(Ordering::SeqCst),
            s.cancelled.load(Ordering::SeqCst),
        );
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    async fn decide(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let mut response = self.decide_with_statuses(req).await?;
        if self.no_statuses {
            response.statuses.clear();
        }
        Ok(response)
    }

    async fn decide_with_statuses(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        if req.domain.is_empty() {
            return Err(Status::invalid_argument("rate limit domain must not be empty"));
        }
        if req.descriptors.is_empty() {
            return Err(Status::invalid_argument("rate limit descriptor list must not be empty"));
        }
        let namespace = Namespace::from(req.domain.as_str());
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        let mut over = false;
        let _guard = self.lock.lock().await;
        for d in &req.descriptors {
            // The descriptor's hits_addend overrides the request's; 0 or absent means 1.
            let delta = match d.hits_addend.as_ref().map(|v| v.value) {
                Some(v) if v > 0 => v,
                _ if req.hits_addend > 0 => u64::from(req.hits_addend),
                _ => 1,
            };
            self.stats.hits.fetch_add(delta, Ordering::SeqCst);
            let vars: HashMap<String, String> =
                d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
            let delta = i64::try_from(delta).unwrap_or(i64::MAX);
            let result = self
                .limiter
                .check_rate_limited_and_update(&namespace, &vars, delta, true)
                .await
                .map_err(|e| Status::unavailable(format!("limitador: {e}")))?;
            over |= result.limited;
            // limitador 0.6 reports `max - (value + delta)` per counter: the true remaining
            // after an admitted update, and `delta` too little when nothing was counted.
            let remaining = |c: &limitador::counter::Counter| {
                let r = c.remaining().unwrap_or(c.max_value());
                if result.limited { r.saturating_add(delta) } else { r }.max(0)
            };
            // The most restrictive counter describes the descriptor.
            let counter = result.counters.iter().min_by_key(|c| remaining(c));
            let mut status = DescriptorStatus {
                code: if result.limited { Code::OverLimit } else { Code::Ok } as i32,
                ..Default::default()
            };
            if let Some(c) = counter {
                status.limit_remaining = u32::try_from(remaining(c)).unwrap_or(u32::MAX);
                status.current_limit = unit_for(c.limit().seconds()).map(|unit| RateLimit {
                    name: c.limit().name().unwrap_or_default().to_string(),
                    requests_per_unit: u32::try_from(c.max_value().max(0)).unwrap_or(u32::MAX),
                    unit: unit as i32,
                });
                let window = Duration::from_secs(c.seconds());
                status.duration_until_reset = Some(pb_duration(c.expires_in().unwrap_or(window)));
            }
            statuses.push(status);
        }
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        let n = self.stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
        self.write_stats();
        let mut in_flight = InFlight { rls: self, n, done: false };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let result = self.decide(&req).await;
        let entries: Vec<String> = req
            .descriptors
            .iter()
            .map(|d| {
                let kv: Vec<String> = d.entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect();
                let hits = d.hits_addend.as_ref().map(|v| v.value).unwrap_or(0);
                format!("[{}]{}", kv.join(","), if hits > 0 { format!("+{hits}") } else { String::new() })
            })
            .collect();
        let outcome = match &result {
            Ok(resp) => {
                if resp.overall_code == Code::OverLimit as i32 {
                    self.stats.over_limit.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.stats.ok.fetch_add(1, Ordering::SeqCst);
                }
                let st: Vec<String> = resp
                    .statuses
                    .iter()
                    .map(|s| {
                        let code = Code::try_from(s.code).map(|c| c.as_str_name()).unwrap_or("?");
                        let reset = s.duration_until_reset.as_ref().map(|d| d.seconds).unwrap_or(-1);
                        format!("{code}/remaining={}/reset={reset}s", s.limit_remaining)
                    })
                    .collect();
                st.join(" ")
            }
            Err(status) => {
                self.stats.errors.fetch_add(1, Ordering::SeqCst);
                format!("ERROR {}: {}", status.code(), status.message())
            }
        };
        in_flight.done = true;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "call {n} domain={} hits_addend={} descriptors={} -> {outcome}",
            req.domain,
            req.hits_addend,
            entries.join(" ")
        );
        let _ = out.flush();
        drop(out);
        self.write_stats();
        result.map(Response::new)
    }
}

struct Args {
    listen: SocketAddr,
    redis: String,
    limits: PathBuf,
    delay_ms: u64,
    stats_file: Option<PathBuf>,
    no_statuses: bool,
}

const USAGE: &str = "usage: rls-server --listen HOST:PORT --redis redis://HOST:PORT --limits FILE.json [--delay-ms N] [--stats-file FILE] [--no-statuses]";

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut redis = None;
    let mut limits = None;
    let mut delay_ms = 0;
    let mut stats_file = None;
    let mut no_statuses = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        if flag == "--no-statuses" {
            no_statuses = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen {value}: {e}"))?),
            "--redis" => redis = Some(value),
            "--limits" => limits = Some(PathBuf::from(value)),
            "--delay-ms" => delay_ms = value.parse().map_err(|e| format!("--delay-ms {value}: {e}"))?,
            "--stats-file" => stats_file = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        redis: redis.ok_or_else(|| format!("--redis is required\n{USAGE}"))?,
        limits: limits.ok_or_else(|| format!("--limits is required\n{USAGE}"))?,
        delay_ms,
        stats_file,
        no_statuses,
    })
}

fn load_limits(path: &PathBuf) -> Result<Vec<Limit>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let specs: Vec<LimitSpec> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut limits = Vec::with_capacity(specs.len());
    for (i, s) in specs.into_iter().enumerate() {
        if s.seconds == 0 {
            return Err(format!("limit {i}: seconds must be > 0"));
        }
        let max_value = i64::try_from(s.max_value).map_err(|_| format!("limit {i}: max_value too large"))?;
        let mut conditions = Vec::with_capacity(s.conditions.len());
        for c in &s.conditions {
            let parsed = limitador::limit::Condition::try_from(c.as_str())
                .map_err(|e| format!("limit {i}: condition {c:?}: {e:?}"))?;
            conditions.push(parsed);
        }
        let mut limit = Limit::new(s.namespace.as_str(), max_value, s.seconds, conditions, s.variables);
        if let Some(name) = s.name {
            limit.set_name(name);
        }
        limits.push(limit);
    }
    Ok(limits)
}

async fn run(args: Args) -> Result<(), String> {
    let limits = load_limits(&args.limits)?;
    let storage = tokio::time::timeout(Duration::from_secs(10), AsyncRedisStorage::new(&args.redis))
        .await
        .map_err(|_| format!("redis {}: no connection within 10 s", args.redis))?
        .map_err(|e| format!("redis {}: {e}", args.redis))?;
    let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
    let count = limits.len();
    for limit in limits {
        limiter.add_limit(limit);
    }
    let rls = Rls {
        limiter,
        lock: Mutex::new(()),
        delay: Duration::from_millis(args.delay_ms),
        stats: Stats::default(),
        stats_file: args.stats_file,
        stats_write: std::sync::Mutex::new(()),
        no_statuses: args.no_statuses,
    };
    rls.write_stats();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    println!("listening on {addr} ({count} limits, redis {}, delay {} ms)", args.redis, args.delay_ms);
    let _ = std::io::stdout().flush();

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(rls))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("server: {e}"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("rls-server: {e}");
        std::process::exit(1);
    }
}
