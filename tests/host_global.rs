#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! The `global` mode in the wasm test host: the module's `proxy_grpc_call`s are answered by a
//! model of a rate-limit service (fixed windows per tenant, as limitador and
//! envoyproxy/ratelimit count), with or without descriptor statuses, or fail, time out, or
//! fail to dispatch. Checked: each metered request lands in exactly one of `allowed`,
//! `denied`, `shadow_denied` in every mode and path (issue 15 item 4), and token leases never
//! over-admit nor outlive their bound, also against a service that sends no statuses (item 6).

mod host;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use host::{status, GrpcAnswer, GrpcCall, Reply, Request, Rng, Vm, World, SEC};
use prost::Message;
use std::collections::HashMap;

/// A rate-limit service: `limit` hits per tenant per fixed `window_s` window.
struct Service {
    limit: u64,
    window_s: u64,
    /// Send descriptor statuses (limit, remaining, duration_until_reset); Limitador sends none.
    statuses: bool,
    /// (tenant, window index) -> hits counted.
    used: HashMap<(String, u64), u64>,
    /// Hits the service counted as used (granted), per tenant.
    granted: HashMap<String, u64>,
    calls: u64,
}

impl Service {
    fn new(limit: u64, window_s: u64, statuses: bool) -> Service {
        Service { limit, window_s, statuses, used: HashMap::new(), granted: HashMap::new(), calls: 0 }
    }

    fn answer(&mut self, call: &GrpcCall, now_ns: u64) -> GrpcAnswer {
        assert_eq!(call.service, "envoy.service.ratelimit.v3.RateLimitService");
        assert_eq!(call.method, "ShouldRateLimit");
        self.calls += 1;
        let req = RateLimitRequest::decode(call.message.as_slice()).unwrap();
        let tenant = req.descriptors[0].entries.iter().find(|e| e.key == "tenant").unwrap().value.clone();
        let hits = u64::from(req.hits_addend.max(1));
        let window_ns = self.window_s * SEC;
        let index = now_ns / window_ns;
        let used = self.used.entry((tenant.clone(), index)).or_insert(0);
        let over = *used + hits > self.limit;
        if !over {
            *used += hits;
            *self.granted.entry(tenant).or_insert(0) += hits;
        }
        let left = (index + 1) * window_ns - now_ns;
        let mut response = RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            ..Default::default()
        };
        if self.statuses {
            response.statuses.push(DescriptorStatus {
                code: response.overall_code,
                current_limit: Some(RateLimit { requests_per_unit: self.limit as u32, unit: 2, ..Default::default() }),
                limit_remaining: (self.limit - *used) as u32,
                duration_until_reset: Some(PbDuration { seconds: (left / SEC) as i64, nanos: (left % SEC) as i32 }),
                ..Default::default()
            });
        }
        GrpcAnswer::Message(response.encode_to_vec())
    }
}

fn outcome_sum(world: &World) -> u64 {
    ["allowed", "denied", "shadow_denied"].iter().map(|c| world.counter(&format!("tenant_ratelimit.{c}"))).sum()
}

fn global(extra: &str) -> String {
    format!(r#""global":{{"cluster":"rls","domain":"d","timeout_ms":100{extra}}}"#)
}

/// The issue's case: mode both, 5 tokens at the service, a large local bucket, 10 requests:
/// 5 admitted, 5 denied, and the counters say so (the old code counted allowed = 15).
#[test]
fn both_mode_counts_each_request_once() {
    let world = World::new();
    let vm =
        Vm::configured(&world, &format!(r#"{{"capacity":1000,"refill_rate":100,{}}}"#, global(r#","mode":"both""#)));
    let mut service = Service::new(5, 60, true);
    let mut passed = 0;
    for _ in 0..10 {
        let now = world.now_ns();
        let reply = vm.request_answering(&Request::get("/").tenant("acme"), |c| service.answer(c, now)).unwrap();
        passed += u32::from(reply.passed());
        if !reply.passed() {
            assert_eq!(reply.status(), Some(429));
        }
    }
    assert_eq!(passed, 5);
    assert_eq!(service.calls, 10);
    assert_eq!(world.counter("tenant_ratelimit.allowed"), 5);
    assert_eq!(world.counter("tenant_ratelimit.denied"), 5);
    assert_eq!(world.counter("tenant_ratelimit.shadow_denied"), 0);
    assert_eq!(world.counter("tenant_ratelimit.global_calls"), 10);
    assert_eq!(world.counter("tenant_ratelimit.global_over_limit"), 5);
    // The call itself: cluster, API, timeout, the descriptor and hits.
    let call = &vm.grpc_log()[0];
    assert_eq!((call.cluster.as_str(), call.timeout_ms), ("rls", 100));
    let req = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    assert_eq!((req.domain.as_str(), req.hits_addend), ("d", 1));
}

/// Mode both with per-tenant counters: the listed tenant's scoped counters agree with the
/// global ones, and a local shadow denial stays one outcome.
#[test]
fn both_mode_scoped_and_shadow_counts() {
    let world = World::new();
    let config = format!(
        r#"{{"capacity":2,"refill_rate":0.001,"mode":"shadow","tenants":{{"vip":{{}}}},{}}}"#,
        global(r#","mode":"both""#)
    );
    let vm = Vm::configured(&world, &config);
    let mut service = Service::new(3, 60, true);
    for _ in 0..6 {
        let now = world.now_ns();
        let reply = vm.request_answering(&Request::get("/").tenant("vip"), |c| service.answer(c, now)).unwrap();
        assert!(reply.passed(), "shadow mode denies nothing");
    }
    // Local: 2 admitted, 4 would be denied; service: 3 admitted, 3 over limit. A request is
    // allowed only if both admit it (2); the other 4 are shadow denials, each counted once.
    assert_eq!(world.counter("tenant_ratelimit.allowed"), 2);
    assert_eq!(world.counter("tenant_ratelimit.shadow_denied"), 4);
    assert_eq!(world.counter("tenant_ratelimit.denied"), 0);
    assert_eq!(world.counter("tenant_ratelimit.tenant.vip.allowed"), 2);
    assert_eq!(world.counter("tenant_ratelimit.tenant.vip.shadow_denied"), 4);
}

/// Failures, timeouts and dispatch failures land in one outcome each, by failure_mode.
#[test]
fn service_failures_count_once_by_failure_mode() {
    for (mode, want_pass) in [("allow", true), ("deny", false)] {
        for both in [false, true] {
            let world = World::new();
            let m = if both { "both" } else { "global" };
            let config = format!(
                r#"{{"capacity":100,"refill_rate":1,{}}}"#,
                global(&format!(r#","mode":"{m}","failure_mode":"{mode}""#))
            );
            let vm = Vm::configured(&world, &config);
            let r = vm.request_answering(&Request::get("/").tenant("a"), |_| GrpcAnswer::Status(14)).unwrap();
            assert_eq!(r.passed(), want_pass);
            let r = vm.request_answering(&Request::get("/").tenant("a"), |_| GrpcAnswer::Timeout).unwrap();
            assert_eq!(r.passed(), want_pass);
            let r = vm.request_answering(&Request::get("/").tenant("a"), |_| GrpcAnswer::Message(vec![0xff])).unwrap();
            assert_eq!(r.passed(), want_pass);
            vm.fail_grpc_dispatch(1, status::PARSE_FAILURE);
            let r = vm.request(&Request::get("/").tenant("a")).unwrap();
            assert_eq!(r.passed(), want_pass, "dispatch failure");
            assert!(!vm.is_dead());
            assert_eq!(world.counter("tenant_ratelimit.global_errors"), 4, "{mode} {m}");
            assert_eq!(outcome_sum(&world), 4, "{mode} {m}: {:?}", world.metrics());
            let c = if want_pass { "allowed" } else { "denied" };
            assert_eq!(world.counter(&format!("tenant_ratelimit.{c}")), 4);
        }
    }
}

/// Leases from the service: never more admitted than the service granted; every request
/// counted once (lease hits included), including on other workers sharing the lease.
#[test]
fn service_leases_never_over_admit_and_count_once() {
    let world = World::new();
    let config = format!(r#"{{"capacity":100000,"refill_rate":100000,{}}}"#, global(r#","lease_tokens":5"#));
    let vms: Vec<Vm> = (0..3).map(|_| Vm::configured(&world, &config)).collect();
    let mut service = Service::new(23, 60, true);
    let mut passed = 0;
    for i in 0..40 {
        let now = world.now_ns();
        let reply = vms[i % 3].request_answering(&Request::get("/").tenant("t"), |c| service.answer(c, now)).unwrap();
        passed += u64::from(reply.passed());
    }
    let granted = service.granted["t"];
    assert!(passed <= granted, "admitted {passed} > granted {granted}");
    assert!(passed >= 23 - 4, "{passed}"); // 23 = 4 leases of 5 + 3 refused as a whole
    assert_eq!(outcome_sum(&world), 40);
    assert_eq!(world.counter("tenant_ratelimit.allowed"), passed);
    assert_eq!(world.counter("tenant_ratelimit.lease_hits") + service.calls, 40);
}

/// Issue 15 item 6: a service that sends no descriptor statuses (as Limitador) gives no reset
/// time, so no lease: the spare tokens of that answer are dropped, then this worker asks for
/// each request's own cost (no waste, no over-admission) until the back-off ends, and then
/// tries a lease once more.
#[test]
fn service_without_statuses_gets_no_lease_and_no_over_admission() {
    let world = World::new();
    let config = format!(r#"{{"capacity":100000,"refill_rate":100000,{}}}"#, global(r#","lease_tokens":5"#));
    let vm = Vm::configured(&world, &config);
    let mut service = Service::new(20, 3600, false);
    let mut passed = 0;
    let mut hits = Vec::new();
    for _ in 0..30 {
        let now = world.now_ns();
        let reply = vm
            .request_answering(&Request::get("/").tenant("t"), |c| {
                hits.push(RateLimitRequest::decode(c.message.as_slice()).unwrap().hits_addend);
                service.answer(c, now)
            })
            .unwrap();
        passed += u64::from(reply.passed());
        world.advance_ns(SEC as i64 / 10);
    }
    // The first call asked for a lease (5) and got no reset time: its 4 spare tokens are
    // dropped; then single hits: 20 - 5 = 15 more admitted, exactly.
    assert_eq!(hits[0], 5);
    assert!(hits[1..].iter().all(|&h| h == 1), "{hits:?}");
    assert_eq!(passed, 16);
    assert_eq!(world.counter("tenant_ratelimit.lease_hits"), 0);
    assert_eq!(outcome_sum(&world), 30);
    // While leases are off, a request reads no shared data (no lease can exist).
    let gets = world.shared_calls().0;
    let now = world.now_ns();
    vm.request_answering(&Request::get("/").tenant("t"), |c| service.answer(c, now)).unwrap();
    assert_eq!(world.shared_calls().0, gets);
    // After the back-off (60 s) the worker probes with a lease request again.
    world.advance_ns(61 * SEC as i64);
    let now = world.now_ns();
    let mut probe = 0;
    vm.request_answering(&Request::get("/").tenant("t"), |c| {
        probe = RateLimitRequest::decode(c.message.as_slice()).unwrap().hits_addend;
        service.answer(c, now)
    })
    .unwrap();
    assert_eq!(probe, 5);
}

/// A lease never outlives 60 s, even when the service's window is a day.
#[test]
fn lease_lifetime_is_bounded() {
    let world = World::new();
    let config = format!(r#"{{"capacity":100000,"refill_rate":100000,{}}}"#, global(r#","lease_tokens":10"#));
    let vm = Vm::configured(&world, &config);
    let mut service = Service::new(1000, 86_400, true);
    let mut run = |vm: &Vm| {
        let now = world.now_ns();
        vm.request_answering(&Request::get("/").tenant("t"), |c| service.answer(c, now)).unwrap();
    };
    run(&vm);
    run(&vm);
    assert_eq!(vm.grpc_log().len(), 1, "the second request spends the lease");
    world.advance_ns(61 * SEC as i64);
    run(&vm);
    assert_eq!(vm.grpc_log().len(), 2, "the lease expired after 60 s although the window is a day");
}

/// Counters are batched per worker; a tick (once its period has passed) flushes them and
/// gives unspent worker-lease tokens back.
#[test]
fn tick_flushes_batched_counters_and_gives_back_leases() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":100,"refill_rate":0.001,"worker_lease":8}"#);
    assert_eq!(vm.tick_period_ms(), 1000);
    for _ in 0..5 {
        assert!(vm.request(&Request::get("/").tenant("t")).unwrap().allowed());
    }
    // The first request debited 1 + 8 leased; the next 4 came from the lease. No request
    // made a stats call: nothing is published before the tick.
    assert_eq!(world.published("tenant_ratelimit.allowed"), 0);
    assert!(!vm.tick().unwrap(), "no tick before the period");
    world.advance_ns(SEC as i64);
    assert!(vm.tick().unwrap());
    assert_eq!(world.published("tenant_ratelimit.allowed"), 5);
    // The 4 unspent lease tokens went back: another worker can drain exactly 95 more.
    let other = Vm::configured(&world, r#"{"capacity":100,"refill_rate":0.001}"#);
    let mut more = 0;
    while other.request(&Request::get("/").tenant("t")).unwrap().allowed() {
        more += 1;
    }
    assert_eq!(more, 95);
}

/// A seeded mix over every mode and path (local, global, both, leases of both kinds,
/// overflow, store errors, service errors, timeouts, dispatch failures, shadow mode,
/// unmetered requests), several workers: allowed + denied + shadow_denied = metered, the
/// denials are exactly the local replies, and a listed tenant's own counters add up too.
#[test]
fn counters_add_up_in_every_mode() {
    let scenarios = [
        r#""capacity":3,"refill_rate":1"#.to_string(),
        r#""capacity":3,"refill_rate":1,"mode":"shadow""#.to_string(),
        r#""capacity":40,"refill_rate":1,"worker_lease":4"#.to_string(),
        r#""capacity":3,"refill_rate":1,"max_tenants":4,"overflow":"deny""#.to_string(),
        r#""capacity":3,"refill_rate":1,"max_tenants":4,"overflow":{"capacity":5,"refill_rate":1}"#.to_string(),
        r#""capacity":3,"refill_rate":1,"on_store_error":"deny""#.to_string(),
        format!(r#""capacity":1000,"refill_rate":1,{}"#, global("")),
        format!(r#""capacity":1000,"refill_rate":1,{}"#, global(r#","failure_mode":"deny""#)),
        format!(r#""capacity":3,"refill_rate":1,{}"#, global(r#","mode":"both""#)),
        format!(r#""capacity":3,"refill_rate":1,"mode":"shadow",{}"#, global(r#","mode":"both""#)),
        format!(r#""capacity":1000,"refill_rate":1,{}"#, global(r#","lease_tokens":3"#)),
        format!(r#""capacity":40,"refill_rate":1,"worker_lease":4,{}"#, global(r#","mode":"both","lease_tokens":3"#)),
    ];
    for (n, body) in scenarios.iter().enumerate() {
        for statuses in [true, false] {
            let config = format!(
                r#"{{{body},"tenants":{{"vip":{{}}}},"rules":[{{"path_prefix":"/api","cost":1}},{{"path_prefix":"/free","cost":0}}]}}"#
            );
            let world = World::new();
            let vms: Vec<Vm> = (0..3).map(|_| Vm::configured(&world, &config)).collect();
            let mut service = Service::new(6, 10, statuses);
            let mut rng = Rng::new(0x15_04 + n as u64);
            let (mut metered, mut unmetered, mut replies, mut passed_metered) = (0u64, 0u64, 0u64, 0u64);
            let mut vip_metered = 0u64;
            for _ in 0..300 {
                let vm = &vms[rng.below(3) as usize];
                let tenant = ["vip", "a", "b", "c", "d", "e", "f"][rng.below(7) as usize];
                let free = rng.permille(150);
                let path = if free { "/free" } else { "/api/x" };
                if rng.permille(20) {
                    world.fail_sets(1, status::INTERNAL_FAILURE);
                }
                if rng.permille(20) {
                    vm.fail_grpc_dispatch(1, status::INTERNAL_FAILURE);
                }
                let fault = rng.below(1000);
                let now = world.now_ns();
                let reply: Reply = vm
                    .request_answering(&Request::get(path).tenant(tenant), |c| match fault {
                        0..=29 => GrpcAnswer::Status(14),
                        30..=49 => GrpcAnswer::Timeout,
                        _ => service.answer(c, now),
                    })
                    .unwrap();
                world.fail_sets(0, 0);
                vm.fail_grpc_dispatch(0, 0);
                if free {
                    unmetered += 1;
                    assert!(reply.passed());
                } else {
                    metered += 1;
                    vip_metered += u64::from(tenant == "vip");
                    replies += u64::from(reply.local_reply.is_some());
                    passed_metered += u64::from(reply.passed());
                }
                world.advance_ns((rng.below(300) * 1_000_000) as i64);
                if rng.permille(50) {
                    for vm in &vms {
                        vm.tick().unwrap();
                    }
                }
            }
            // Batched (worker-lease) counters are flushed by the next tick.
            world.advance_ns(2 * SEC as i64);
            for vm in &vms {
                vm.tick().unwrap();
            }
            let what = format!("scenario {n} ({body}), statuses {statuses}: {:?}", world.metrics());
            assert_eq!(outcome_sum(&world), metered, "{what}");
            assert_eq!(world.counter("tenant_ratelimit.unmetered"), unmetered, "{what}");
            assert_eq!(world.counter("tenant_ratelimit.denied"), replies, "{what}");
            assert_eq!(
                world.counter("tenant_ratelimit.allowed") + world.counter("tenant_ratelimit.shadow_denied"),
                passed_metered,
                "{what}"
            );
            let vip: u64 = ["allowed", "denied", "shadow_denied"]
                .iter()
                .map(|c| world.counter(&format!("tenant_ratelimit.tenant.vip.{c}")))
                .sum();
            assert_eq!(vip, vip_metered, "{what}");
            assert!(vms.iter().all(|v| !v.is_dead()), "{what}");
        }
    }
}
