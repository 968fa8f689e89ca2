#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Issue 18, matching: a listed tenant's own rules before the top-level ones, with a bucket per
//! (tenant, rule) for a rule with its own limit; a rule on the Envoy route name
//! (`xds.route_name`), with host and header matchers, through the real module.

mod host;
use host::{Request, Vm, World};

const CONFIG: &str = r#"{"capacity":3,"refill_rate":0.001,
    "tenants":{"acme":{"capacity":5,"rules":[
        {"name":"acme-export","path_separated_prefix":"/export","capacity":2,"refill_rate":0.001},
        {"path":"/free","cost":0}]}},
    "rules":[
        {"path_separated_prefix":"/healthz","cost":0},
        {"name":"reviews","route":"reviews-v2","capacity":1,"refill_rate":0.001},
        {"host":"*.example.com","headers":[{"name":"x-debug","exact":"1"}],"cost":3},
        {"methods":["GET","POST"]}]}"#;

fn passed(vm: &Vm, n: usize, req: impl Fn() -> Request) -> usize {
    (0..n).filter(|_| vm.request(&req()).unwrap().allowed()).count()
}

#[test]
fn a_tenants_own_rules_come_first_with_their_own_buckets() {
    let world = World::new();
    let vm = Vm::configured(&world, CONFIG);
    let vm2 = Vm::configured(&world, CONFIG);
    // acme's export rule: 2 tokens per (acme, acme-export), across both workers, and acme's
    // main bucket (5) untouched by it.
    assert_eq!(passed(&vm, 2, || Request::get("/export/a").tenant("acme")), 2);
    assert_eq!(passed(&vm2, 3, || Request::get("/export").tenant("acme")), 0);
    assert_eq!(passed(&vm, 3, || Request::get("/exportx").tenant("acme")), 3, "/exportx is not under /export");
    assert_eq!(passed(&vm2, 5, || Request::get("/other").tenant("acme")), 2, "acme's main bucket: 5 - 3");
    // acme's /free is exempt; for everyone else /free is an ordinary GET.
    assert_eq!(passed(&vm, 4, || Request::get("/free").tenant("acme")), 4);
    assert_eq!(passed(&vm, 4, || Request::get("/free").tenant("globex")), 3);
    // acme's rules are acme's only: globex's /export goes to the top-level rules.
    assert_eq!(passed(&vm2, 2, || Request::get("/export").tenant("initech")), 2);
    // Top-level exemptions still apply to acme after its own list.
    assert_eq!(passed(&vm, 5, || Request::get("/healthz/live").tenant("acme")), 5);
    assert_eq!(world.counter("tenant_ratelimit.rule.acme-export.allowed"), 2);
    assert_eq!(world.counter("tenant_ratelimit.rule.acme-export.denied"), 3);
    assert_eq!(world.counter("tenant_ratelimit.unmetered"), 9);
}

#[test]
fn a_rule_on_the_route_name_meters_that_route_only() {
    let world = World::new();
    let vm = Vm::configured(&world, CONFIG);
    let reviews = || Request::get("/reviews/1").tenant("globex").route("reviews-v2");
    assert_eq!(passed(&vm, 3, reviews), 1, "the reviews rule's own bucket: 1");
    // The same path on another route (or a route without a name) is the tenant's bucket.
    assert_eq!(passed(&vm, 2, || Request::get("/reviews/1").tenant("globex").route("ratings")), 2);
    assert_eq!(passed(&vm, 2, || Request::get("/reviews/1").tenant("globex").route("")), 1);
    assert_eq!(world.counter("tenant_ratelimit.rule.reviews.denied"), 2);
}

#[test]
fn host_and_header_matchers() {
    let world = World::new();
    let vm = Vm::configured(&world, CONFIG);
    let debug = |authority: &'static str| {
        move || Request::get("/x").tenant("globex").header(":authority", authority).header("x-debug", "1")
    };
    // Request::get sets :authority example.test; the host matcher reads the first value, so
    // build requests whose only :authority is the one under test.
    let only = |req: Request| {
        let mut req = req;
        let first = req.headers.iter().position(|(n, _)| n == b":authority").unwrap();
        req.headers.remove(first);
        req
    };
    // cost 3 of 3: one debug request empties globex's bucket.
    assert_eq!(passed(&vm, 2, || only(debug("API.Example.com:8443")())), 1);
    world.advance_secs(3000.0);
    // example.com itself is not *.example.com, and without x-debug: 1 it is a plain GET.
    assert_eq!(passed(&vm, 3, || only(debug("example.com")())), 3);
    world.advance_secs(3000.0);
    let plain =
        || only(Request::get("/x").tenant("globex").header(":authority", "a.example.com").header("x-debug", "2"));
    assert_eq!(passed(&vm, 4, plain), 3);
}
