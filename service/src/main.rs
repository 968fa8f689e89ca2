//! tenant-ratelimit-service: Envoy's rate-limit service API over exact GCRA token buckets in
//! Redis or Redis Cluster. See docs/service.md.
//!
//! ```text
//! tenant-ratelimit-service --listen ADDR (--redis URL | --redis-cluster URL,URL,...) --config FILE
//!                          [--metrics ADDR] [--log-level error|warn|info|debug] [--redis-timeout-ms N]
//!                          [--threads N] [--redis-wait-replicas N [--redis-wait-ms M]]
//! tenant-ratelimit-service --check-config FILE
//! ```
//!
//! Prints `listening on ADDR` once serving. SIGTERM (or Ctrl-C) stops accepting, lets the
//! calls in flight finish, and exits 0. SIGHUP reloads `--config`: the bucket state lives in
//! Redis, so every bucket keeps its spent tokens (a changed limit rescales them, as in the
//! filter); a bad file is logged and the running config kept.

mod metrics;
mod plan;
mod redis_edge;
mod settings;
mod units;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use metrics::Metrics;
use redis_edge::{Conn, Edge, EdgeError, Wait};
use settings::Settings;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

const USAGE: &str = "usage: tenant-ratelimit-service --listen ADDR (--redis URL | --redis-cluster URL,URL,...) \
--config FILE [--metrics ADDR] [--log-level error|warn|info|debug] [--redis-timeout-ms N] [--threads N] \
[--redis-wait-replicas N [--redis-wait-ms M]]";

static LOG_LEVEL: AtomicU8 = AtomicU8::new(2);

macro_rules! log {
    ($level:expr, $($arg:tt)*) => {
        if $level <= LOG_LEVEL.load(Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "[{}] {}", ["error", "warn", "info", "debug"].get($level as usize).unwrap_or(&"debug"), format!($($arg)*));
        }
    };
}
/// Redis connections (each multiplexed) when `--redis-wait-replicas` is on; one otherwise.
const WAIT_CONNECTIONS: usize = 8;
const ERROR: u8 = 0;
const WARN: u8 = 1;
const INFO: u8 = 2;
const DEBUG: u8 = 3;

struct Args {
    listen: SocketAddr,
    redis: Option<String>,
    cluster: Vec<String>,
    config: PathBuf,
    metrics: Option<SocketAddr>,
    redis_timeout: Duration,
    threads: usize,
    wait_replicas: u32,
    wait_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut redis = None;
    let mut cluster = Vec::new();
    let mut config = None;
    let mut metrics = None;
    let mut redis_timeout = Duration::from_millis(1000);
    let mut threads = 1;
    let mut wait_replicas = 0;
    let mut wait_ms = 50;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Err(USAGE.to_string());
        }
        // `--flag value` or `--flag=value` (the usual form in Kubernetes `args`).
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), v.to_string()),
            _ => {
                let value = it.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
                (arg, value)
            }
        };
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen {value}: {e}"))?),
            "--redis" => redis = Some(value),
            "--redis-cluster" => cluster = value.split(',').map(|s| s.trim().to_string()).collect(),
            "--config" => config = Some(PathBuf::from(value)),
            "--metrics" => metrics = Some(value.parse().map_err(|e| format!("--metrics {value}: {e}"))?),
            "--redis-timeout-ms" => {
                let ms: u64 = value.parse().map_err(|e| format!("--redis-timeout-ms {value}: {e}"))?;
                if !(1..=60_000).contains(&ms) {
                    return Err("--redis-timeout-ms must be 1 to 60000".into());
                }
                redis_timeout = Duration::from_millis(ms);
            }
            "--threads" => {
                threads = value.parse().map_err(|e| format!("--threads {value}: {e}"))?;
                if !(1..=256).contains(&threads) {
                    return Err("--threads must be 1 to 256".into());
                }
            }
            "--redis-wait-replicas" => {
                wait_replicas = value.parse().map_err(|e| format!("--redis-wait-replicas {value}: {e}"))?;
                if wait_replicas > 16 {
                    return Err("--redis-wait-replicas must be 0 (off) to 16".into());
                }
            }
            "--redis-wait-ms" => {
                wait_ms = value.parse().map_err(|e| format!("--redis-wait-ms {value}: {e}"))?;
                // 0 would make WAIT block until the replicas answer, however long.
                if !(1..=60_000).contains(&wait_ms) {
                    return Err("--redis-wait-ms must be 1 to 60000".into());
                }
            }
            "--log-level" => {
                let level = match value.as_str() {
                    "error" => ERROR,
                    "warn" => WARN,
                    "info" => INFO,
                    "debug" => DEBUG,
                    _ => return Err(format!("--log-level {value}: expected error, warn, info or debug")),
                };
                LOG_LEVEL.store(level, Ordering::Relaxed);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if redis.is_some() != cluster.is_empty() {
        return Err(format!("give exactly one of --redis and --redis-cluster\n{USAGE}"));
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        redis,
        cluster,
        config: config.ok_or_else(|| format!("--config is required\n{USAGE}"))?,
        metrics,
        redis_timeout,
        threads,
        wait_replicas,
        wait_ms,
    })
}

fn load(path: &PathBuf) -> Result<Settings, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    Settings::from_json_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

struct Service {
    settings: RwLock<Arc<Settings>>,
    edge: Edge,
    metrics: Arc<Metrics>,
    redis_timeout: Duration,
}

/// The caller's deadline from the `grpc-timeout` header (e.g. `20m` = 20 ms).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Service {
    fn current(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        // Answer (or fail) before the caller gives up, so its failure_mode applies promptly.
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
            // A tenth of it is left for the answer's trip back.
            .map_or(self.redis_timeout, |d| (d - d / 10).min(self.redis_timeout));
        let req = request.into_inner();
        let settings = self.current();
        let m = &self.metrics;
        let p = match plan::plan(&settings, &req) {
            Ok(p) => p,
            Err(plan::Refusal(why)) => {
                m.calls_refused.fetch_add(1, Ordering::Relaxed);
                log!(DEBUG, "refused: {why}");
                return Err(Status::invalid_argument(why));
            }
        };
        let started = Instant::now();
        let results = match tokio::time::timeout(deadline, self.edge.decide(&p.debits)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let kind = if let EdgeError::Replicas { .. } = e { &m.redis_replicas } else { &m.redis_errors };
                kind.fetch_add(1, Ordering::Relaxed);
                m.calls_redis_error.fetch_add(1, Ordering::Relaxed);
                log!(WARN, "{e}");
                return Err(Status::unavailable(e.to_string()));
            }
            Err(_) => {
                m.redis_timeouts.fetch_add(1, Ordering::Relaxed);
                m.calls_redis_error.fetch_add(1, Ordering::Relaxed);
                log!(WARN, "{} ({} ms)", EdgeError::Timeout, deadline.as_millis());
                return Err(Status::unavailable(EdgeError::Timeout.to_string()));
            }
        };
        if !p.debits.is_empty() {
            m.redis_latency(started.elapsed());
        }
        let answer = plan::answer(&p, &results);
        if !p.debits.is_empty() {
            let (ok, over) = p.decided(&results);
            m.decisions(&req.domain, ok, over);
        }
        for (counter, &n) in m.unmatched.iter().zip(&p.misses) {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        m.hits.fetch_add(p.hits(), Ordering::Relaxed);
        if answer.overall_code == 2 {
            m.calls_over_limit.fetch_add(1, Ordering::Relaxed);
        } else {
            m.calls_ok.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(answer))
    }
}

/// `/metrics` (Prometheus text), `/healthz` (the process runs) and `/ready` (Redis answers a
/// PING within the Redis timeout): a minimal HTTP/1.0 responder, one request per connection.
/// The listener is bound by the caller before `listening on` is printed, so the probes answer
/// from the moment the service says it serves (and a port in use is a startup error).
async fn serve_metrics(listener: tokio::net::TcpListener, svc: Arc<Service>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let svc = svc.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", svc.metrics.render(svc.edge.commands.load(Ordering::Relaxed))),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/ready" => match tokio::time::timeout(svc.redis_timeout, ping(&svc.edge.conn())).await {
                    Ok(Ok(())) => ("200 OK", "ready\n".to_string()),
                    Ok(Err(e)) => ("503 Service Unavailable", format!("redis: {e}\n")),
                    Err(_) => ("503 Service Unavailable", "redis: no answer\n".to_string()),
                },
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let reply = format!(
                "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
        });
    }
}

async fn ping(conn: &Conn) -> Result<(), redis::RedisError> {
    let mut cmd = redis::cmd("PING");
    match conn {
        Conn::Single(c) => cmd.query_async::<_, ()>(&mut c.clone()).await,
        Conn::Cluster(c) => {
            cmd.arg("x");
            cmd.query_async::<_, ()>(&mut c.clone()).await
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let settings = load(&args.config)?;
    // One multiplexed connection carries every call. With `WAIT`, Redis blocks the connection
    // that sent it until the replicas answer, so calls take turns on it: a few connections,
    // used in turn, let that many wait at once.
    let connections = if args.wait_replicas > 0 { WAIT_CONNECTIONS } else { 1 };
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(match &args.redis {
            Some(url) => {
                tokio::time::timeout(Duration::from_secs(10), redis_edge::connect_single(url, args.redis_timeout))
                    .await
                    .map_err(|_| format!("redis {url}: no connection within 10 s"))?
                    .map_err(|e| format!("redis {url}: {e}"))?
            }
            None => tokio::time::timeout(
                Duration::from_secs(10),
                redis_edge::connect_cluster(&args.cluster, args.redis_timeout),
            )
            .await
            .map_err(|_| "redis cluster: no connection within 10 s".to_string())?
            .map_err(|e| format!("redis cluster: {e}"))?,
        });
    }
    let more = conns.split_off(1);
    let Some(conn) = conns.pop() else { return Err("redis: no connection".into()) };
    let domains = settings.domains.len();
    let svc = Arc::new(Service {
        settings: RwLock::new(Arc::new(settings)),
        edge: Edge::new(
            conn,
            more,
            (args.wait_replicas > 0).then_some(Wait { replicas: args.wait_replicas, ms: args.wait_ms }),
        ),
        metrics: Arc::new(Metrics::default()),
        redis_timeout: args.redis_timeout,
    });

    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--metrics {addr}: {e}"))?;
        log!(INFO, "metrics on http://{}/metrics", listener.local_addr().map_err(|e| e.to_string())?);
        tokio::spawn(serve_metrics(listener, svc.clone()));
    }

    // SIGHUP: reload the config; the buckets live in Redis and keep their state.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    let reload_svc = svc.clone();
    let config_path = args.config.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match load(&config_path) {
                Ok(s) => {
                    let n = s.domains.len();
                    if let Ok(mut w) = reload_svc.settings.write() {
                        *w = Arc::new(s);
                    }
                    reload_svc.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                    log!(INFO, "config reloaded ({n} domains)");
                }
                Err(e) => {
                    reload_svc.metrics.reload_errors.fetch_add(1, Ordering::Relaxed);
                    log!(ERROR, "config reload failed, keeping the running config: {e}");
                }
            }
        }
    });

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log!(INFO, "draining calls in flight");
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr} ({domains} domains)");
        let _ = out.flush();
    }
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::from_arc(svc))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("server: {e}"))?;
    log!(INFO, "stopped");
    Ok(())
}

fn main() {
    // `--check-config FILE`: validate a config (CI, a ConfigMap before rollout) and exit.
    let argv: Vec<String> = std::env::args().collect();
    if let [_, flag, file] = argv.as_slice() {
        if flag == "--check-config" {
            match load(&PathBuf::from(file)) {
                Ok(s) => {
                    println!("{file}: ok ({} domains)", s.domains.len());
                    std::process::exit(0);
                }
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // One thread by default: a call is a few microseconds of work between two network
    // waits, and with several worker threads a large share of its CPU went to waking and
    // parking threads (futex), not to the call (docs/service.md "CPU per decision, latency").
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("tenant-ratelimit-service: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout("m"), None);
        assert_eq!(grpc_timeout(""), None);
        assert_eq!(grpc_timeout("123456789m"), None);
        assert_eq!(grpc_timeout("5x"), None);
        assert_eq!(grpc_timeout("+5m"), None);
        assert_eq!(grpc_timeout("5é"), None);
    }
}
