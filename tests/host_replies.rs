#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Issue 15, items 3 and 5: what a denial looks like on the wire. Every local reply names
//! its reason in the response code details; a gRPC request gets a gRPC status (8,
//! RESOURCE_EXHAUSTED, unless configured) with the gRFC A6 retry pushback; draft-10's `t`
//! never points later than `retry-after`.

mod host;
use host::{status, LocalReply, Request, Vm, World};

fn grpc(tenant: &str) -> Request {
    Request::new("POST", "/pkg.Svc/Call").tenant(tenant).header("content-type", "application/grpc")
}

/// Spends a one-token bucket and returns the denial of the second request.
fn deny_second(vm: &Vm, r: &Request) -> LocalReply {
    assert!(vm.request(r).unwrap().allowed());
    vm.request(r).unwrap().local_reply.expect("a local reply")
}

#[test]
fn grpc_denial_is_resource_exhausted_with_pushback() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/min"}"#);
    let reply = deny_second(&vm, &grpc("acme"));
    assert_eq!(reply.grpc_status, 8, "{reply:?}");
    assert_eq!(reply.status, 200, "gRPC needs HTTP 200 on the wire");
    assert_eq!(reply.details, "tenant_ratelimit_denied");
    assert_eq!(reply.header("grpc-status"), Some("8"));
    assert_eq!(reply.header("grpc-message"), Some("Too Many Requests"));
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert_eq!(reply.header("grpc-retry-pushback-ms"), Some("60000"));
    assert_eq!(reply.header("content-type"), Some("application/grpc"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    assert!(reply.body.is_empty(), "a body would corrupt gRPC framing");
    assert_eq!(world.counter("tenant_ratelimit.denied"), 1);
}

#[test]
fn grpc_status_and_message_are_configurable_and_any_grpc_content_type_counts() {
    let world = World::new();
    let vm = Vm::configured(
        &world,
        r#"{"capacity":1,"refill_rate":"1/min","deny":{"status":503,"grpc_status":14,"grpc_message":"back off 100%"}}"#,
    );
    let r = Request::new("POST", "/pkg.Svc/Call").tenant("a").header("Content-Type", "application/grpc+proto");
    let reply = deny_second(&vm, &r);
    assert_eq!((reply.status, reply.grpc_status), (200, 14));
    assert_eq!(reply.header("grpc-status"), Some("14"));
    assert_eq!(reply.header("grpc-message"), Some("back off 100%25"));
    assert_eq!(reply.header("content-type"), Some("application/grpc+proto"));
}

#[test]
fn http_denial_carries_details_and_no_grpc_status() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/min"}"#);
    let r = Request::new("POST", "/").tenant("a").header("content-type", "application/json");
    let reply = deny_second(&vm, &r);
    assert_eq!((reply.status, reply.grpc_status), (429, -1));
    assert_eq!(reply.details, "tenant_ratelimit_denied");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("grpc-status"), None);
    assert_eq!(reply.header("grpc-retry-pushback-ms"), None);
    assert_eq!(reply.body, br#"{"error":"Too Many Requests"}"#);
}

#[test]
fn store_error_denial_says_store_error() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":5,"refill_rate":1,"on_store_error":"deny"}"#);
    world.fail_gets(1, status::INTERNAL_FAILURE);
    let reply = vm.request(&grpc("a")).unwrap().local_reply.expect("denied");
    assert_eq!(reply.details, "tenant_ratelimit_store_error");
    assert_eq!((reply.grpc_status, reply.header("grpc-retry-pushback-ms")), (8, Some("1000")));
    world.fail_gets(1, status::INTERNAL_FAILURE);
    let reply = vm.request(&Request::get("/").tenant("a")).unwrap().local_reply.expect("denied");
    assert_eq!((reply.status, reply.details.as_str()), (429, "tenant_ratelimit_store_error"));
}

#[test]
fn overflow_denial_says_overflow() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/h","max_tenants":1,"overflow":"deny"}"#);
    assert!(vm.request(&Request::get("/").tenant("first")).unwrap().allowed());
    let mut details = Vec::new();
    for i in 0..8 {
        if let Some(reply) = vm.request(&Request::get("/").tenant(&format!("t{i}"))).unwrap().local_reply {
            details.push(reply.details);
        }
    }
    assert!(!details.is_empty());
    assert!(details.iter().all(|d| d == "tenant_ratelimit_overflow_denied"), "{details:?}");
    assert_eq!(world.counter("tenant_ratelimit.overflow_denied"), details.len() as u64);
}

#[test]
fn ietf_t_on_a_denial_is_not_later_than_retry_after() {
    // The issue's case: capacity 2 at 60/min answered `t=2` with `retry-after: 1`.
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":2,"refill_rate":"60/min","rate_limit_headers":"ietf"}"#);
    let r = Request::get("/").tenant("a");
    let first = vm.request(&r).unwrap();
    assert_eq!(first.response_header("ratelimit").as_deref(), Some("\"default\";r=1;t=1"));
    assert!(vm.request(&r).unwrap().allowed());
    let reply = vm.request(&r).unwrap().local_reply.unwrap();
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("ratelimit"), Some("\"default\";r=0;t=1"));
    assert_eq!(reply.header("ratelimit-policy"), Some("\"default\";q=2;w=2"));
}

#[test]
fn x_ratelimit_reset_still_counts_to_a_full_bucket() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":3,"refill_rate":"60/min"}"#);
    let r = Request::get("/").tenant("a");
    for _ in 0..3 {
        assert!(vm.request(&r).unwrap().allowed());
    }
    let reply = vm.request(&r).unwrap().local_reply.unwrap();
    assert_eq!(reply.header("x-ratelimit-reset"), Some("3"));
    assert_eq!(reply.header("retry-after"), Some("1"));
}
