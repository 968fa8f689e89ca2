#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Reconfiguration keeps each tenant's spent tokens, clamped to a smaller capacity.

mod host;
use host::{Request, Vm, World};

fn spend(vm: &Vm, tenant: &str, n: usize) -> usize {
    let r = Request::get("/").tenant(tenant);
    (0..n).filter(|_| vm.request(&r).unwrap().allowed()).count()
}

#[test]
fn growing_capacity_keeps_spent_tokens() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":10,"refill_rate":0.001}"#);
    assert_eq!(spend(&vm, "acme", 7), 7);
    assert!(vm.configure(r#"{"capacity":20,"refill_rate":0.001}"#).unwrap());
    let first = vm.request(&Request::get("/").tenant("acme")).unwrap();
    assert_eq!(first.remaining(), Some(12), "13 left before this request: {first:?}");
    assert_eq!(spend(&vm, "acme", 30), 12);
}

#[test]
fn shrinking_capacity_clamps_the_debt() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":10,"refill_rate":0.001}"#);
    assert_eq!(spend(&vm, "acme", 7), 7);
    assert!(vm.configure(r#"{"capacity":5,"refill_rate":0.001}"#).unwrap());
    assert_eq!(spend(&vm, "acme", 10), 0);
}

/// After shrinking to capacity 5 with 7 spent, the debt is clamped to 5 tokens. The first
/// request under the new limit is denied, and that denial stores the clamped state
/// (src/store/slots.rs `write`: a denial writes only to record a reconfiguration), so one
/// token is back after one interval (1000 s), not after the 3000 s of the old 7-token debt.
#[test]
fn shrinking_capacity_owes_at_most_the_new_capacity() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":10,"refill_rate":0.001}"#);
    assert_eq!(spend(&vm, "acme", 7), 7);
    assert!(vm.configure(r#"{"capacity":5,"refill_rate":0.001}"#).unwrap());
    assert_eq!(spend(&vm, "acme", 10), 0);
    world.advance_secs(999.0);
    assert_eq!(spend(&vm, "acme", 10), 0, "no token before one interval");
    world.advance_secs(1.5);
    assert_eq!(spend(&vm, "acme", 10), 1, "one token after 1000 s, not 3000 s");
}

#[test]
fn reconfiguring_one_worker_is_seen_by_the_others_through_the_shared_bucket() {
    let world = World::new();
    let old = r#"{"capacity":10,"refill_rate":0.001}"#;
    let a = Vm::configured(&world, old);
    let b = Vm::configured(&world, old);
    assert_eq!(spend(&a, "acme", 4), 4);
    assert_eq!(spend(&b, "acme", 3), 3);
    for vm in [&a, &b] {
        assert!(vm.configure(r#"{"capacity":20,"refill_rate":0.001}"#).unwrap());
    }
    assert_eq!(spend(&a, "acme", 6) + spend(&b, "acme", 20), 13);
}

/// Lowering the rate (a decision, README "Design notes"): each bucket converts to the new
/// limit when its tenant is next seen, since shared data cannot be iterated at
/// reconfiguration. Time before that refilled at the old rate; from then on, the new one.
#[test]
fn changing_the_rate_applies_when_the_tenant_is_next_seen() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":10,"refill_rate":1}"#);
    assert_eq!(spend(&vm, "acme", 10), 10);
    assert!(vm.configure(r#"{"capacity":10,"refill_rate":0.1}"#).unwrap());
    world.advance_secs(5.0);
    assert_eq!(spend(&vm, "acme", 10), 5, "5 s unseen, refilled at the old 1/s");
    world.advance_secs(5.0);
    assert_eq!(spend(&vm, "acme", 10), 0, "then the new 0.1/s: half a token in 5 s");
    world.advance_secs(5.1);
    assert_eq!(spend(&vm, "acme", 10), 1);
}

#[test]
fn changing_the_rate_takes_effect_once_the_bucket_is_written() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":10,"refill_rate":1}"#);
    assert_eq!(spend(&vm, "acme", 9), 9);
    assert!(vm.configure(r#"{"capacity":10,"refill_rate":0.1}"#).unwrap());
    assert_eq!(spend(&vm, "acme", 10), 1, "the last token, written under the new limit");
    world.advance_secs(9.5);
    assert_eq!(spend(&vm, "acme", 10), 0);
    world.advance_secs(0.6);
    assert_eq!(spend(&vm, "acme", 10), 1);
}
