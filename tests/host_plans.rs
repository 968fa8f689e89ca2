#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Issue 18: plans (tiers), and decisions you can see: the plan a request is on (and the
//! precedence of a tenant's own fields over plans), `enforce_percent`, the shadow header to
//! the upstream, and the decision as filter state for access logs. Two workers over one
//! shared store, so a plan's bucket is exact across them.

mod host;
use host::{Request, Vm, World};

const SEED_PLANS: &str = r#"{
  "capacity": 1000, "refill_rate": "1000/min",
  "plans": {"free": {"capacity": 60, "refill_rate": "60/min"},
            "pro":  {"capacity": 120, "refill_rate": "120/min"}},
  "tenant": {"from": [{"header": "x-tenant-id"}], "plan_from": [{"header": "x-plan"}], "default_plan": "free"},
  "tenants": {"acme": {"plan": "pro"}, "globex": {"capacity": 300, "refill_rate": "300/min"}},
  "filter_state": true
}"#;

fn on_plan(tenant: &str, plan: Option<&str>) -> Request {
    let r = Request::get("/api").tenant(tenant);
    match plan {
        Some(p) => r.header("x-plan", p),
        None => r,
    }
}

/// Requests admitted out of `n`, spread over the workers in turn.
fn admitted(vms: &[Vm], n: usize, r: &Request) -> usize {
    (0..n).filter(|i| vms[i % vms.len()].request(r).unwrap().allowed()).count()
}

#[test]
fn each_tenant_gets_its_plan_exactly_across_workers() {
    let world = World::new();
    let vms = [Vm::configured(&world, SEED_PLANS), Vm::configured(&world, SEED_PLANS)];
    // Unlisted, no plan: default_plan free (60); a client-chosen unknown plan: free too.
    assert_eq!(admitted(&vms, 80, &on_plan("new1", None)), 60);
    assert_eq!(admitted(&vms, 80, &on_plan("new2", Some("platinum"))), 60);
    // Unlisted on pro from plan_from: 120.
    assert_eq!(admitted(&vms, 150, &on_plan("new3", Some("pro"))), 120);
    // acme's named plan wins over the request's plan.
    assert_eq!(admitted(&vms, 150, &on_plan("acme", Some("free"))), 120);
    // globex's own fields win over every plan.
    assert_eq!(admitted(&vms, 350, &on_plan("globex", Some("free"))), 300);
    // Per-plan stats, bounded by the config.
    assert_eq!(world.counter("tenant_ratelimit.plan.free.allowed"), 120);
    assert_eq!(world.counter("tenant_ratelimit.plan.free.denied"), 40);
    assert_eq!(world.counter("tenant_ratelimit.plan.pro.allowed"), 120);
    assert_eq!(world.counter("tenant_ratelimit.tenant.acme.allowed"), 120);
}

#[test]
fn the_decision_is_filter_state_for_the_access_log() {
    let world = World::new();
    let vm = Vm::configured(&world, SEED_PLANS);
    let reply = vm.request(&on_plan("acme", None)).unwrap();
    assert_eq!(
        reply.property(&["tenant_ratelimit"]).as_deref(),
        Some("tenant=acme plan=pro rule=- policy=acme limit=- outcome=allowed")
    );
    let reply = vm.request(&on_plan("zed", Some("pro"))).unwrap();
    assert_eq!(
        reply.property(&["tenant_ratelimit"]).as_deref(),
        Some("tenant=zed plan=pro rule=- policy=pro limit=- outcome=allowed")
    );
    // Off by default: no host call, no property.
    let quiet = Vm::configured(&World::new(), r#"{"capacity":1,"refill_rate":1}"#);
    assert_eq!(quiet.request(&on_plan("a", None)).unwrap().property(&["tenant_ratelimit"]), None);
}

#[test]
fn shadow_denials_tell_the_upstream_which_policy_would_have_denied() {
    let world = World::new();
    let vm = Vm::configured(
        &world,
        r#"{"capacity":1,"refill_rate":"1/h","shadow_header":"x-ratelimit-would-deny","filter_state":true,
        "tenants":{"trial":{"mode":"shadow"}}}"#,
    );
    let first = vm.request(&on_plan("trial", None)).unwrap();
    assert_eq!(first.upstream_header("x-ratelimit-would-deny"), None);
    let second = vm.request(&on_plan("trial", None)).unwrap();
    assert!(second.allowed());
    assert_eq!(second.upstream_header("x-ratelimit-would-deny").as_deref(), Some("trial"));
    assert!(second.property(&["tenant_ratelimit"]).unwrap().ends_with("outcome=shadow_denied"));
    assert_eq!(world.counter("tenant_ratelimit.shadow_denied"), 1);
    // An enforced denial is a local reply; the upstream sees nothing.
    vm.request(&on_plan("other", None)).unwrap();
    assert!(!vm.request(&on_plan("other", None)).unwrap().allowed());
}

#[test]
fn enforce_percent_enforces_about_that_share_and_counts_the_rest_as_shadow() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/h","enforce_percent":25}"#);
    let mut denied = 0;
    for i in 0..400 {
        world.advance_ns(1_000 + i * 7);
        if !vm.request(&on_plan("a", None)).unwrap().allowed() {
            denied += 1;
        }
    }
    // One admission, then 399 over the limit: about a quarter enforced.
    assert!((60..=140).contains(&denied), "{denied} of 399 enforced at 25 %");
    assert_eq!(world.counter("tenant_ratelimit.denied"), denied);
    assert_eq!(world.counter("tenant_ratelimit.shadow_denied"), 399 - denied);
}

#[test]
fn a_plans_rules_come_after_the_tenants_own_and_before_the_top_level_ones() {
    let world = World::new();
    let config = r#"{"capacity": 10, "refill_rate": "10/h",
        "plans": {"free": {"rules": [{"path_prefix": "/search", "cost": 5},
                                     {"name": "free-export", "path": "/export", "capacity": 1, "refill_rate": "1/h"}]},
                  "pro": {}},
        "tenant": {"plan_from": [{"header": "x-plan"}], "default_plan": "free"},
        "tenants": {"acme": {"rules": [{"path_prefix": "/search", "cost": 2}]}},
        "rules": [{"path_prefix": "/"}]}"#;
    let vms = [Vm::configured(&world, config), Vm::configured(&world, config)];
    let search = |tenant: &str, plan: &str| Request::get("/search").tenant(tenant).header("x-plan", plan);
    // free: /search costs 5 (the plan's rule), so 2 of 3 fit in 10 tokens.
    assert_eq!(admitted(&vms, 3, &search("f", "free")), 2);
    // pro has no rules: the top-level rule, cost 1.
    assert_eq!(admitted(&vms, 12, &search("p", "pro")), 10);
    // acme's own rule wins over its plan's (free by default): cost 2.
    assert_eq!(admitted(&vms, 6, &search("acme", "free")), 5);
    // The plan's rule with its own limit: a bucket per (tenant, rule), counted by name.
    let export = Request::get("/export").tenant("g").header("x-plan", "free");
    assert_eq!(admitted(&vms, 3, &export), 1);
    assert_eq!(world.counter("tenant_ratelimit.rule.free-export.allowed"), 1);
}

#[test]
fn the_access_log_names_the_limit_that_refused() {
    let world = World::new();
    let vm = Vm::configured(
        &world,
        r#"{"capacity": 100, "refill_rate": "100/h", "filter_state": true,
        "plans": {"pro": {"limits": [{"name": "minute", "capacity": 3, "refill_rate": "3/min"},
                                     {"name": "daily", "capacity": 2, "refill_rate": "2/day"}]}},
        "tenants": {"acme": {"plan": "pro"}}}"#,
    );
    let state = |r: host::Reply| r.property(&["tenant_ratelimit"]).unwrap_or_default();
    assert!(state(vm.request(&on_plan("acme", None)).unwrap()).ends_with("policy=acme limit=- outcome=allowed"));
    vm.request(&on_plan("acme", None)).unwrap();
    let denied = state(vm.request(&on_plan("acme", None)).unwrap());
    assert_eq!(denied, "tenant=acme plan=pro rule=- policy=acme limit=daily outcome=denied");
}
