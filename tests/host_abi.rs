#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! The ABI behaviour the filter relies on (denial reply, response headers, properties,
//! stats), and the host's own guarantees (refusing unknown imports, Envoy's shared-data
//! semantics, traps surfacing as errors).

mod host;
use host::{status, Action, HostError, Level, Loaded, Request, Vm, World, SEC, T0_NS};

#[test]
fn denial_is_a_429_local_reply_with_retry_after_content_type_and_body() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":2,"refill_rate":0.5}"#);
    let acme = Request::get("/").tenant("acme");

    let first = vm.request(&acme).unwrap();
    assert!(first.allowed(), "{first:?}");
    assert_eq!(first.response_action, Some(Action::Continue));
    // The rate-limit headers are added to the upstream's response.
    assert_eq!(
        first.added_response_headers,
        vec![
            ("x-ratelimit-limit".to_string(), "2".to_string()),
            ("x-ratelimit-remaining".to_string(), "1".to_string()),
            ("x-ratelimit-reset".to_string(), "2".to_string()),
        ]
    );
    assert_eq!(first.response_header(":status").as_deref(), Some("200"));
    assert!(vm.request(&acme).unwrap().allowed());

    let denied = vm.request(&acme).unwrap();
    assert_eq!(denied.request_action, Action::Pause);
    let reply = denied.local_reply.clone().expect("a local reply");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("2")); // 1 token at 0.5/s, rounded up
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(reply.body, br#"{"error":"Too Many Requests"}"#);
    assert_eq!(reply.grpc_status, -1);
    assert_eq!(world.counter("tenant_ratelimit.allowed"), 2);
    assert_eq!(world.counter("tenant_ratelimit.denied"), 1);
}

#[test]
fn configured_deny_status_body_and_content_type_are_used() {
    let world = World::new();
    let vm = Vm::configured(
        &world,
        r#"{"capacity":1,"refill_rate":"1/h","rate_limit_headers":false,
            "deny":{"status":503,"body":"slow down","content_type":"text/plain"}}"#,
    );
    let r = Request::get("/").tenant("t");
    let ok = vm.request(&r).unwrap();
    assert!(ok.allowed());
    assert!(ok.added_response_headers.is_empty(), "{ok:?}");
    let reply = vm.request(&r).unwrap().local_reply.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, b"slow down");
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.header("retry-after"), Some("3600"));
    assert_eq!(reply.header("x-ratelimit-limit"), None);
}

#[test]
fn ietf_headers_on_allow_and_deny() {
    let world = World::new();
    let vm = Vm::configured(
        &world,
        r#"{"capacity":2,"refill_rate":"2/min","rate_limit_headers":"ietf","tenants":{"acme":{"capacity":1}}}"#,
    );
    let acme = Request::get("/").tenant("acme");
    let ok = vm.request(&acme).unwrap();
    assert_eq!(ok.response_header("ratelimit-policy").as_deref(), Some("\"acme\";q=1;w=30"));
    assert_eq!(ok.response_header("ratelimit").as_deref(), Some("\"acme\";r=0;t=30"));
    let denied = vm.request(&acme).unwrap().local_reply.unwrap();
    assert_eq!(denied.header("ratelimit"), Some("\"acme\";r=0;t=30"));
    assert_eq!(world.counter("tenant_ratelimit.tenant.acme.allowed"), 1);
    assert_eq!(world.counter("tenant_ratelimit.tenant.acme.denied"), 1);
}

#[test]
fn configure_logs_and_defines_every_stat() {
    let world = World::new();
    let vm = Vm::new(&world).unwrap();
    assert!(vm
        .configure(r#"{"capacity":5,"refill_rate":1,"tenants":{"acme":{}},"rules":[{"name":"login","path_prefix":"/login","capacity":1,"refill_rate":1},{"path_prefix":"/"}]}"#)
        .unwrap());
    let logs = vm.logs();
    assert!(
        logs.iter().any(|l| l.level == Level::Info && l.message.contains("tenant-ratelimit: configured: capacity 5")),
        "{logs:?}"
    );
    for name in [
        "allowed",
        "denied",
        "shadow_denied",
        "cas_retries",
        "store_errors",
        "near_limit",
        "unmetered",
        "slots_reclaimed",
        "overflow_used",
        "overflow_denied",
        "live_slots",
        "tenant.acme.allowed",
        "tenant.acme.denied",
        "tenant.acme.shadow_denied",
        "rule.login.allowed",
        "rule.login.denied",
        "rule.login.shadow_denied",
    ] {
        let full = format!("tenant_ratelimit.{name}");
        let kind = world.metric_kind(&full).unwrap_or_else(|| panic!("{full} not defined: {:?}", world.metrics()));
        let want = if name == "live_slots" { host::MetricKind::Gauge } else { host::MetricKind::Counter };
        assert_eq!(kind, want, "{full}");
    }
    // Unmetered requests (no rule matches) pass and are counted.
    let rules = r#"{"capacity":1,"refill_rate":1,"rules":[{"path_prefix":"/api"}]}"#;
    let vm = Vm::configured(&world, rules);
    for _ in 0..3 {
        assert!(vm.request(&Request::get("/health")).unwrap().allowed());
    }
    assert_eq!(world.counter("tenant_ratelimit.unmetered"), 3);
}

#[test]
fn stats_are_summed_across_vms_by_name() {
    let world = World::new();
    let config = r#"{"capacity":3,"refill_rate":"1/h"}"#;
    let vms: Vec<Vm> = (0..3).map(|_| Vm::configured(&world, config)).collect();
    for i in 0..9 {
        vms[i % 3].request(&Request::get("/").tenant("acme")).unwrap();
    }
    assert_eq!(world.counter("tenant_ratelimit.allowed"), 3);
    assert_eq!(world.counter("tenant_ratelimit.denied"), 6);
    assert_eq!(world.metric("tenant_ratelimit.live_slots"), 1);
}

#[test]
fn tenant_from_properties_source_address_peer_and_jwt_claim() {
    let world = World::new();
    let config = r#"{"capacity":1,"refill_rate":"1/h","tenant":{"from":[
        {"jwt_claim":{"claim":"org.id"}},{"peer_principal":true},{"source_ip":true}]}}"#;
    let vm = Vm::configured(&world, config);
    let jwt_path = ["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", "jwt_payload", "org", "id"];
    // Same source IP, different ports: one tenant.
    assert!(vm.request(&Request::get("/").source("10.0.0.1:1111")).unwrap().allowed());
    assert!(!vm.request(&Request::get("/").source("10.0.0.1:2222")).unwrap().allowed());
    assert!(vm.request(&Request::get("/").source("[::1]:80")).unwrap().allowed());
    // A JWT claim wins over the source address; the peer principal over the source address.
    let jwt = Request::get("/").source("10.0.0.1:1").property(&jwt_path, "org-7");
    assert!(vm.request(&jwt).unwrap().allowed());
    assert!(!vm.request(&jwt).unwrap().allowed());
    let peer = Request::get("/")
        .source("10.0.0.1:1")
        .property(&["connection", "uri_san_peer_certificate"], "spiffe://x/ns/a/sa/b");
    assert!(vm.request(&peer).unwrap().allowed());
    assert!(!vm.request(&peer).unwrap().allowed());
    // Nothing at all: the default tenant.
    assert!(vm.request(&Request::get("/")).unwrap().allowed());
    assert!(!vm.request(&Request::get("/")).unwrap().allowed());
}

#[test]
fn plugin_root_id_separates_namespaces() {
    let world = World::new();
    let config = r#"{"capacity":1,"refill_rate":"1/h"}"#;
    let a = Vm::new(&world).unwrap();
    a.set_property(&["plugin_root_id"], "filter-a");
    assert!(a.configure(config).unwrap());
    let b = Vm::new(&world).unwrap();
    b.set_property(&["plugin_root_id"], "filter-b");
    assert!(b.configure(config).unwrap());
    let r = Request::get("/").tenant("acme");
    assert!(a.request(&r).unwrap().allowed());
    assert!(b.request(&r).unwrap().allowed());
    assert!(!a.request(&r).unwrap().allowed());
    let keys: Vec<String> = world.shared_data().into_keys().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(a.logs().iter().any(|l| l.message.contains("root id \"filter-a\"")));
}

#[test]
fn shared_data_has_envoys_semantics() {
    let world = World::new();
    // A missing key is created whatever cas is passed.
    assert_eq!(world.set_shared("k", b"1", 12345), status::OK);
    let (_, cas1) = world.shared_data()["k"].clone();
    assert_ne!(cas1, 0);
    // A stale nonzero cas on an existing key is a mismatch and writes nothing.
    assert_eq!(world.set_shared("k", b"2", cas1.wrapping_add(1)), status::CAS_MISMATCH);
    assert_eq!(world.shared_data()["k"].0, b"1");
    // The current cas succeeds and moves the cas on.
    assert_eq!(world.set_shared("k", b"3", cas1), status::OK);
    let (_, cas2) = world.shared_data()["k"].clone();
    assert_ne!(cas2, cas1);
    // Cas 0 overwrites unconditionally.
    assert_eq!(world.set_shared("k", b"4", 0), status::OK);
    assert_eq!(world.shared_data()["k"].0, b"4");
    // The cas counter skips 0 when it wraps.
    world.shared().last_cas = u32::MAX - 1;
    world.set_shared("a", b"", 0);
    world.set_shared("b", b"", 0);
    let data = world.shared_data();
    assert_eq!(data["a"].1, u32::MAX);
    assert_eq!(data["b"].1, 1);
}

#[test]
fn the_filter_creates_keys_with_a_nonzero_cas_and_retries_on_a_create_race() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":5,"refill_rate":"1/h"}"#);
    world.trace_shared();
    // Another worker creates the key between this VM's get (NotFound) and its set (once).
    let mut fired = false;
    world.set_hook(move |point, _vm, key| {
        if point == host::Point::BeforeSet && key.starts_with("trl/") && !fired {
            fired = true;
            vec![host::Interference::ForeignWrite { bytes: b"not a record".to_vec() }]
        } else {
            vec![]
        }
    });
    let r = vm.request(&Request::get("/").tenant("acme")).unwrap();
    assert!(r.allowed());
    let trace = world.take_trace();
    let sets: Vec<_> = trace.iter().filter(|op| matches!(op, host::SharedOp::Set { .. })).collect();
    // First set: create with a nonzero cas -> CasMismatch (the foreign write won); retried.
    assert!(matches!(sets[0], host::SharedOp::Set { cas, status, .. } if *cas != 0 && *status == status::CAS_MISMATCH));
    assert!(matches!(sets.last().unwrap(), host::SharedOp::Set { status, .. } if *status == status::OK));
    assert!(world.counter("tenant_ratelimit.cas_retries") >= 1);
}

/// A minimal module importing a call the host does not implement.
fn module_importing(name: &str) -> Vec<u8> {
    let mut import = vec![1u8, 3, b'e', b'n', b'v', name.len() as u8];
    import.extend_from_slice(name.as_bytes());
    import.extend_from_slice(&[0, 0]); // function, type 0
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend_from_slice(&[1, 6, 1, 0x60, 1, 0x7f, 1, 0x7f]); // type 0: (i32) -> i32
    m.push(2);
    m.push(import.len() as u8);
    m.extend_from_slice(&import);
    m
}

#[test]
fn refuses_a_module_importing_an_unimplemented_call() {
    let err = Loaded::from_bytes(&module_importing("proxy_get_future_thing")).err().expect("refused");
    match err {
        HostError::Refused(m) => assert!(m.contains("env.proxy_get_future_thing"), "{m}"),
        other => panic!("{other}"),
    }
    // A known call with the wrong signature is refused too.
    assert!(matches!(Loaded::from_bytes(&module_importing("proxy_log")), Err(HostError::Refused(_))));
}

#[test]
fn virtual_clock_is_what_the_module_sees() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":1}"#);
    assert_eq!(world.now_ns(), T0_NS);
    let r = Request::get("/").tenant("a");
    assert!(vm.request(&r).unwrap().allowed());
    assert!(!vm.request(&r).unwrap().allowed());
    world.advance_ns(999_999_999);
    assert!(!vm.request(&r).unwrap().allowed());
    world.advance_ns(1);
    assert!(vm.request(&r).unwrap().allowed());
}

#[test]
fn a_host_error_status_is_not_a_trap() {
    // Envoy does not return InternalFailure from get_shared_data today; if it ever does, the
    // request follows on_store_error (default allow) and the VM lives on.
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":5,"refill_rate":1}"#);
    world.fail_gets(1, status::INTERNAL_FAILURE);
    assert!(vm.request(&Request::get("/").tenant("a")).unwrap().allowed());
    assert!(!vm.is_dead());
    assert_eq!(world.counter("tenant_ratelimit.store_errors"), 1);
}

/// Counters are added up in the module and handed to the host on the tick (which runs with
/// any config, not only with worker leases) and when the plugin goes away: a request makes
/// no stats call.
#[test]
fn counters_are_published_on_the_tick_and_at_teardown() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":2,"refill_rate":"1/h","tenants":{"acme":{"capacity":1}}}"#);
    assert_eq!(vm.tick_period_ms(), 1000, "the tick runs without worker leases too");
    for _ in 0..3 {
        vm.request(&Request::get("/").tenant("acme")).unwrap();
    }
    vm.request(&Request::get("/").tenant("other")).unwrap();
    assert_eq!(world.published("tenant_ratelimit.allowed"), 0, "no stats call on the request path");
    assert_eq!(world.published("tenant_ratelimit.tenant.acme.denied"), 0);
    world.advance_ns(SEC as i64);
    assert!(vm.tick().unwrap());
    assert_eq!(world.published("tenant_ratelimit.allowed"), 2);
    assert_eq!(world.published("tenant_ratelimit.denied"), 2);
    assert_eq!(world.published("tenant_ratelimit.tenant.acme.allowed"), 1);
    assert_eq!(world.published("tenant_ratelimit.tenant.acme.denied"), 2);
    assert_eq!(world.published("tenant_ratelimit.live_slots"), 2);
    // Counted after the last tick, published when Envoy deletes the root context.
    vm.request(&Request::get("/").tenant("other")).unwrap();
    assert_eq!(world.published("tenant_ratelimit.allowed"), 2);
    drop(vm);
    assert_eq!(world.published("tenant_ratelimit.allowed"), 3);
}

/// Two plugins in one VM (Envoy shares a VM between plugins with the same `vm_id` and code):
/// the module does not export `proxy_on_context_create`, so a stream's plugin comes from its
/// `plugin_root_id`; each plugin keeps its own config and buckets.
#[test]
fn plugins_sharing_a_vm_each_get_their_own_streams() {
    let world = World::new();
    let vm = Vm::new(&world).unwrap();
    vm.set_property(&["plugin_root_id"], "a");
    assert!(vm.configure(r#"{"capacity":1,"refill_rate":"1/h"}"#).unwrap());
    assert!(vm.add_plugin("b", r#"{"capacity":3,"refill_rate":"1/h"}"#).unwrap());
    let admitted = |root: &str| {
        (0..5).filter(|_| vm.request(&Request::get("/").tenant("acme").plugin(root)).unwrap().allowed()).count()
    };
    assert_eq!(admitted("b"), 3);
    assert_eq!(admitted("a"), 1);
    assert!(vm.logs().iter().all(|l| l.level < Level::Error), "{:?}", vm.logs());
}
