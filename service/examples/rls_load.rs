//! Open-loop load for tenant-ratelimit-service (bench/phases/global_.py runs it): sends
//! `ShouldRateLimit` calls on a fixed schedule, whatever the answers' latency, and measures each
//! call from its *scheduled* send time, so queueing (in this client, the service or Redis)
//! counts. Native, so the client takes little of the CPU it shares with the service.
//!
//! ```text
//! rls_load --target 127.0.0.1:8081[,127.0.0.1:8082] --rate 1000 --seconds 10 [--warm 1]
//!          [--domain bench] [--tenants 1] [--hits 1] [--svc-pids P,P] [--redis-pids P,P]
//! ```
//!
//! One HTTP/2 connection per target (as an Envoy worker keeps one per upstream host), calls
//! round robin over the targets. Prints one JSON line: calls, errors, the rate reached, latency
//! percentiles (us, from the scheduled time) and, for the given pids, CPU (utime + stime from
//! /proc/<pid>/stat) per call during the measured part only.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

struct Args {
    targets: Vec<String>,
    rate: u64,
    seconds: u64,
    warm: u64,
    domain: String,
    tenants: u64,
    hits: u32,
    svc_pids: Vec<u32>,
    redis_pids: Vec<u32>,
}

fn pids(v: &str) -> Result<Vec<u32>, String> {
    v.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().map_err(|e| format!("pid {s}: {e}"))).collect()
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        targets: Vec::new(),
        rate: 1000,
        seconds: 10,
        warm: 1,
        domain: "bench".into(),
        tenants: 1,
        hits: 1,
        svc_pids: Vec::new(),
        redis_pids: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--target" => a.targets = v.split(',').map(|s| format!("http://{s}")).collect(),
            "--rate" => a.rate = num(&v)?.clamp(1, 1_000_000),
            "--seconds" => a.seconds = num(&v)?.clamp(1, 600),
            "--warm" => a.warm = num(&v)?.min(60),
            "--domain" => a.domain = v,
            "--tenants" => a.tenants = num(&v)?.max(1),
            "--hits" => a.hits = u32::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--svc-pids" => a.svc_pids = pids(&v)?,
            "--redis-pids" => a.redis_pids = pids(&v)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.targets.is_empty() {
        return Err("--target is required".into());
    }
    Ok(a)
}

/// utime + stime of the processes, in clock ticks.
fn ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
            Some(f.iter().sum::<u64>())
        })
        .sum()
}

fn clk_tck() -> f64 {
    // getconf CLK_TCK is 100 on every Linux this runs on; /proc reports in these ticks.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn request(domain: &str, tenant: u64, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: "tenant".into(), value: format!("tenant-{tenant}") }],
            ..Default::default()
        }],
        hits_addend: hits,
    }
}

/// Runs `seconds` of calls at `rate`, the i-th due at start + i/rate, and returns (latencies in
/// us, errors, wall time). This thread keeps the schedule with `thread::sleep` (tokio's timer
/// has 1 ms granularity, which would delay sends by up to a millisecond); the runtime's one
/// worker thread sends and receives.
fn run(
    rt: &tokio::runtime::Runtime,
    clients: &[RateLimitServiceClient<Channel>],
    a: &Args,
    seconds: u64,
    bodies: &[RateLimitRequest],
) -> (Vec<u64>, u64, Duration) {
    let total = a.rate * seconds;
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let scheduled = start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / a.rate);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        let (Some(client), Some(body)) =
            (clients.get((i as usize) % clients.len()), bodies.get((i as usize) % bodies.len()))
        else {
            break;
        };
        let (mut client, body) = (client.clone(), body.clone());
        let (lat, errors) = (lat.clone(), errors.clone());
        tasks.push(rt.spawn(async move {
            let ok = client.should_rate_limit(body).await.is_ok();
            let us = scheduled.elapsed().as_micros() as u64;
            if !ok {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut l) = lat.lock() {
                l.push(us);
            }
        }));
    }
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let wall = start.elapsed();
    let l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    (l, errors.load(Ordering::Relaxed), wall)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied().unwrap_or(0)
}

fn main_with(rt: &tokio::runtime::Runtime, a: Args) -> Result<(), String> {
    let mut clients = Vec::new();
    for t in &a.targets {
        let endpoint = Channel::from_shared(t.clone()).map_err(|e| format!("{t}: {e}"))?.tcp_nodelay(true);
        let ch = rt.block_on(endpoint.connect()).map_err(|e| format!("{t}: {e}"))?;
        clients.push(RateLimitServiceClient::new(ch));
    }
    let bodies: Vec<RateLimitRequest> = (1..=a.tenants).map(|t| request(&a.domain, t, a.hits)).collect();
    if a.warm > 0 {
        run(rt, &clients, &a, a.warm, &bodies);
    }
    let (s0, r0) = (ticks(&a.svc_pids), ticks(&a.redis_pids));
    let (mut lat, errors, wall) = run(rt, &clients, &a, a.seconds, &bodies);
    let (s1, r1) = (ticks(&a.svc_pids), ticks(&a.redis_pids));
    lat.sort_unstable();
    let n = lat.len().max(1) as f64;
    let tck = clk_tck();
    let per_call = |t: u64| t as f64 * 1e6 / tck / n;
    println!(
        "{{\"calls\":{},\"errors\":{},\"seconds\":{:.3},\"rate\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\
         \"p999_us\":{},\"max_us\":{},\"svc_cpu_us_per_call\":{:.2},\"redis_cpu_us_per_call\":{:.2}}}",
        lat.len(),
        errors,
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64().max(1e-9),
        pct(&lat, 0.50),
        pct(&lat, 0.90),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or(0),
        per_call(s1.saturating_sub(s0)),
        per_call(r1.saturating_sub(r0)),
    );
    Ok(())
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rls_load: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rls_load: tokio: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = main_with(&rt, a) {
        eprintln!("rls_load: {e}");
        std::process::exit(1);
    }
}
