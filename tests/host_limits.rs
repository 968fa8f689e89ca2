#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Several limits on one policy (`limits`), in the release module: one record and one CAS
//! decide them all, so across workers a tenant gets exactly the minimum the limits allow and
//! a denial debits no limit; headers, retry-after and per-limit stats; a record written by
//! a build before several limits existed carries over into the first limit.

mod host;
use host::{Cluster, Request, Rng, Scheduler, Step, Vm, World, T0_NS};
use proptest::prelude::*;
use tenant_ratelimit::bucket::{debit_all, Limit, Limits, MAX_LIMITS};
use tenant_ratelimit::store::{hash128, Namespace};

/// 5 per second and 8 per minute, on listed tenant `acme`.
const TWO: &str = r#"{"capacity":1000,"refill_rate":1000,"rate_limit_headers":"ietf","tenants":{"acme":{"limits":[
    {"name":"burst","capacity":5,"refill_rate":"5/s"},{"name":"minute","capacity":8,"refill_rate":"8/min"}]}}}"#;

fn two_limits() -> Limits {
    let mut l = Limits::default();
    l.push(1, Limit::new(5, 5.0).unwrap());
    l.push(2, Limit::new(8, 8.0 / 60.0).unwrap());
    l
}

fn spend(vm: &Vm, n: usize) -> usize {
    let r = Request::get("/").tenant("acme");
    (0..n).filter(|_| vm.request(&r).unwrap().allowed()).count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Two workers, interleaved between each get and set with forced conflicts: the
    /// admissions equal one sequential all-or-nothing debit over both limits (the oracle),
    /// so the tenant gets exactly the minimum of the limits.
    #[test]
    fn two_workers_admit_exactly_the_minimum_over_the_limits(seed in any::<u64>(), epochs in 10usize..40) {
        let cluster = Cluster::new(2, TWO);
        let mut rng = Rng::new(seed);
        let mut steps = Vec::new();
        let mut asks = Vec::new();
        let mut t = 0u64;
        for e in 0..epochs {
            if e > 0 {
                let dt = (50 + rng.below(1500)) * 1_000_000;
                steps.push(Step::AdvanceNs(dt));
                t += dt;
            }
            let n = rng.below(7);
            for _ in 0..n {
                steps.push(Step::Request(Request::get("/").tenant("acme")));
            }
            asks.push((t, n));
        }
        let mut sched = Scheduler::new(seed ^ 0x5a5a);
        sched.run_other_permille = 300;
        sched.foreign_write_permille = 200;
        sched.max_per_request = 4;
        let done = cluster.run(&steps, sched).unwrap();
        let admitted = done.iter().filter(|c| c.allowed).count() as u64;
        // The oracle: every request in order, all limits or none.
        let limits = two_limits();
        let mut states = [0u128; MAX_LIMITS];
        let mut want = 0u64;
        for (t, n) in asks {
            for _ in 0..n {
                let v = debit_all(&limits, &states, T0_NS + t, 1);
                if v.allowed {
                    states = v.states();
                    want += 1;
                }
            }
        }
        prop_assert_eq!(cluster.world.counter("tenant_ratelimit.store_errors"), 0);
        prop_assert_eq!(admitted, want, "seed {}", seed);
        prop_assert_eq!(cluster.world.counter("tenant_ratelimit.tenant.acme.allowed"), want);
    }
}

#[test]
fn a_denial_debits_no_limit() {
    let world = World::new();
    let a = Vm::configured(&world, TWO);
    let b = Vm::configured(&world, TWO);
    // The burst limit admits 5; 40 more denials (on both workers) take nothing from the
    // minute limit, which still has 3 once the burst refilled.
    assert_eq!(spend(&a, 3) + spend(&b, 3), 5);
    assert_eq!(spend(&a, 20) + spend(&b, 20), 0);
    world.advance_secs(1.0);
    assert_eq!(spend(&b, 2) + spend(&a, 10), 3);
    // Now the minute limit denies, whatever the burst has.
    world.advance_secs(5.0);
    assert_eq!(spend(&a, 5), 0);
    assert_eq!(world.counter("tenant_ratelimit.tenant.acme.limit.burst.denied"), 41);
    assert!(world.counter("tenant_ratelimit.tenant.acme.limit.minute.denied") >= 12);
    // 8 per minute: after a minute from the first request, exactly 8 more.
    world.advance_secs(60.0);
    assert_eq!(spend(&a, 4) + spend(&b, 4), 5, "the burst caps the first second");
    world.advance_secs(1.0);
    assert_eq!(spend(&a, 10), 3);
}

#[test]
fn headers_list_every_limit_and_report_the_tightest() {
    let world = World::new();
    let vm = Vm::configured(&world, TWO);
    let r = Request::get("/").tenant("acme");
    let first = vm.request(&r).unwrap();
    assert_eq!(first.response_header("ratelimit-policy").as_deref(), Some("\"burst\";q=5;w=1, \"minute\";q=8;w=60"));
    assert_eq!(first.response_header("ratelimit").as_deref(), Some("\"burst\";r=4;t=1"));
    for _ in 0..4 {
        assert!(vm.request(&r).unwrap().allowed());
    }
    // Burst empty: denied, retry-after from the burst (1 s).
    let denied = vm.request(&r).unwrap();
    let reply = denied.local_reply.clone().expect("denied");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("ratelimit"), Some("\"burst\";r=0;t=1"));
    // A second later: 3 left in the minute limit, 5 in the burst: the minute one is reported.
    world.advance_secs(1.0);
    let next = vm.request(&r).unwrap();
    assert_eq!(next.response_header("ratelimit").as_deref(), Some("\"minute\";r=2;t=7"));
    assert_eq!(spend(&vm, 2), 2);
    // Minute empty: retry-after is the longest wait among the limits that denied.
    let denied = vm.request(&r).unwrap();
    let reply = denied.local_reply.clone().expect("denied");
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert!(reply.header("ratelimit").unwrap().starts_with("\"minute\";r=0;t="), "{reply:?}");
}

#[test]
fn a_record_of_the_old_layout_carries_into_the_first_limit() {
    let world = World::new();
    // What a build without several limits stored for `acme` (capacity 5 at 0.001/s, 4 spent):
    // version 1, owner, capacity, interval, t_full.
    let old = Limit::new(5, 0.001).unwrap();
    let owner = hash128(&[b"acme"]);
    let t_full = (u128::from(T0_NS) << 32) + 4 * old.interval;
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&owner.to_le_bytes());
    bytes.extend_from_slice(&old.capacity.to_le_bytes());
    bytes.extend_from_slice(&old.interval.to_le_bytes());
    bytes.extend_from_slice(&t_full.to_le_bytes());
    let key = Namespace::new("tenant-ratelimit").reserved_key(owner);
    world.set_shared(key.as_str(), &bytes, 0);
    let vm = Vm::configured(
        &world,
        r#"{"capacity":100,"refill_rate":1,"tenants":{"acme":{"limits":[
        {"name":"a","capacity":5,"refill_rate":0.001},{"name":"b","capacity":3,"refill_rate":0.001}]}}}"#,
    );
    // `a` kept its 4 spent tokens; `b` was added and starts full.
    assert_eq!(spend(&vm, 5), 1);
    let stored = world.shared_data()[key.as_str()].0.clone();
    assert_eq!((stored[0], stored.len()), (3, 1 + 16 + 1 + 2 * 48), "now a record of two limits");
    // Back to one limit: its state is only found in a one-limit record (a one-limit policy
    // stores no limit id), so it starts full (README: going from several limits back to
    // one), and the record is of the old layout again.
    assert!(vm
        .configure(r#"{"capacity":100,"refill_rate":1,"tenants":{"acme":{"capacity":5,"refill_rate":0.001}}}"#)
        .unwrap());
    assert_eq!(spend(&vm, 10), 5);
    assert_eq!(world.shared_data()[key.as_str()].0.len(), 57);
}
