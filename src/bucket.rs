//! Token-bucket math on integers, as GCRA: the whole bucket state is one number, `t_full`,
//! the (fixed-point) time at which the bucket would be full again.
//!
//! Time is in "ticks": nanoseconds scaled by 2^32, so one token's interval is exact for any
//! rate that divides a second into whole 2^-32 ns steps and within 2^-32 ns otherwise
//! (relative error 2e-7 at 1e12 tokens/s). Nothing accumulates rounding: `t_full` only ever
//! moves by whole intervals, so fractional refill is never thrown away (no starvation at
//! 0.01 tokens/s), and a clock that goes backwards only makes the bucket look emptier.
//!
//! Bounds (checked by config): capacity <= 2^40 and rate >= 1e-6/s give an interval <= 2^82
//! ticks and a full-bucket span (`tau`) <= 2^122; the wall clock in ticks is < 2^95 until
//! the year 2554. All arithmetic is saturating, so even out-of-contract inputs cannot wrap.

pub const FRAC_BITS: u32 = 32;
pub const TICKS_PER_NS: u128 = 1 << FRAC_BITS;
pub const TICKS_PER_SECOND: u128 = 1_000_000_000 * TICKS_PER_NS;
pub const MAX_CAPACITY: u64 = 1 << 40;
pub const MIN_RATE: f64 = 0.000_001;
pub const MAX_RATE: f64 = 1e12;

/// Bucket parameters: capacity in tokens, and the refill interval per token in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub capacity: u64,
    pub interval: u128,
}

impl Limit {
    /// `None` when the inputs are out of the documented range.
    pub fn new(capacity: u64, tokens_per_second: f64) -> Option<Limit> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return None;
        }
        if !(MIN_RATE..=MAX_RATE).contains(&tokens_per_second) {
            return None;
        }
        // Computed once at config time. Rounded *up*: a slightly longer interval can only
        // under-admit (by < 2^-32 ns per token), never over-admit.
        let interval = (TICKS_PER_SECOND as f64 / tokens_per_second).ceil();
        if !(1.0..=2f64.powi(90)).contains(&interval) {
            return None;
        }
        Some(Limit { capacity, interval: interval as u128 })
    }

    /// Ticks for an empty bucket to refill completely.
    pub fn tau(&self) -> u128 {
        self.interval.saturating_mul(self.capacity as u128)
    }

    /// Whole seconds, rounded up, for an empty bucket to refill (the `w` of RateLimit-Policy).
    pub fn window_seconds(&self) -> u64 {
        ticks_to_seconds_ceil(self.tau())
    }
}

/// Limits one policy may have: they live in one shared-data record decided by one
/// compare-and-swap, and a request handles them in fixed arrays on the stack.
pub const MAX_LIMITS: usize = 4;

/// The limits of one policy, in order: each with an opaque `id` (its name's hash) so a stored
/// state follows its limit, not its position, across a reconfiguration. Fixed capacity, no
/// allocation, `Copy`.
///
/// Unused slots are always zero, so two `Limits` are equal exactly when their limits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    limits: [Limit; MAX_LIMITS],
    ids: [u64; MAX_LIMITS],
    len: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        const EMPTY: Limits =
            Limits { limits: [Limit { capacity: 0, interval: 0 }; MAX_LIMITS], ids: [0; MAX_LIMITS], len: 0 };
        EMPTY
    }
}

impl Limits {
    /// One limit (the `capacity`/`refill_rate` form, the overflow bucket).
    pub fn one(id: u64, limit: Limit) -> Limits {
        let mut limits = Limits::default();
        limits.push(id, limit);
        limits
    }

    /// Adds a limit; false (and nothing added) when `MAX_LIMITS` are there already.
    pub fn push(&mut self, id: u64, limit: Limit) -> bool {
        match (self.limits.get_mut(self.len), self.ids.get_mut(self.len)) {
            (Some(slot), Some(id_slot)) => {
                (*slot, *id_slot) = (limit, id);
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every limit, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Limit> {
        self.limits.get(..self.len).unwrap_or(&[]).iter()
    }

    /// Every limit's id, in order.
    pub fn ids(&self) -> &[u64] {
        self.ids.get(..self.len).unwrap_or(&[])
    }

    /// The first limit: what a one-limit policy is, and where an old one-limit record's
    /// state goes.
    pub fn first(&self) -> Limit {
        self.limits[0]
    }

    /// The smallest capacity: what bounds a lease or a request's cost.
    pub fn min_capacity(&self) -> u64 {
        self.iter().map(|l| l.capacity).min().unwrap_or(0)
    }
}

/// The states of several limits (`t_full` each, same order as their [`Limits`]).
pub type States = [u128; MAX_LIMITS];

/// The outcome of one all-or-nothing debit over several limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdicts {
    /// Every limit admitted, and every limit was debited; otherwise none was.
    pub allowed: bool,
    /// Per limit: on an admission its own debit; on a denial the limit as it stands (a
    /// limit that would have admitted shows its tokens before the request, `retry_after` 0).
    pub each: [Verdict; MAX_LIMITS],
    pub len: usize,
}

impl Verdicts {
    pub fn iter(&self) -> std::slice::Iter<'_, Verdict> {
        self.each.get(..self.len).unwrap_or(&[]).iter()
    }

    /// The states to store (unchanged on a denial).
    pub fn states(&self) -> States {
        let mut out = [0; MAX_LIMITS];
        for (o, v) in out.iter_mut().zip(self.iter()) {
            *o = v.t_full;
        }
        out
    }

    /// Ticks until every limit that denied has this request's cost: the longest wait.
    pub fn retry_after(&self) -> u128 {
        self.iter().map(|v| v.retry_after).max().unwrap_or(0)
    }
}

/// Takes `cost` tokens from every limit at `now_ns`, or from none: a request is admitted only
/// if every limit admits, and a denial debits nothing anywhere.
pub fn debit_all(limits: &Limits, states: &States, now_ns: u64, cost: u64) -> Verdicts {
    const NONE: Verdict = Verdict { allowed: false, t_full: 0, remaining: 0, reset: 0, retry_after: 0 };
    let mut each = [NONE; MAX_LIMITS];
    let mut allowed = true;
    for ((slot, limit), t_full) in each.iter_mut().zip(limits.iter()).zip(states.iter()) {
        *slot = debit(limit, *t_full, now_ns, cost);
        allowed &= slot.allowed;
    }
    if !allowed {
        // Undo the admissions: show those limits as they are, with nothing taken.
        for ((slot, limit), t_full) in each.iter_mut().zip(limits.iter()).zip(states.iter()) {
            if slot.allowed {
                *slot = Verdict { allowed: false, t_full: *t_full, ..debit(limit, *t_full, now_ns, 0) };
            }
        }
    }
    Verdicts { allowed, each, len: limits.len() }
}

pub fn now_ticks(now_ns: u64) -> u128 {
    (now_ns as u128) << FRAC_BITS
}

pub fn ticks_to_seconds_ceil(ticks: u128) -> u64 {
    let secs = ticks.div_ceil(TICKS_PER_SECOND);
    u64::try_from(secs).unwrap_or(u64::MAX)
}

/// The outcome of one debit attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The state to store when allowed (unchanged when denied).
    pub t_full: u128,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Ticks until the bucket is full again.
    pub reset: u128,
    /// Ticks until this request's cost would be available (0 when allowed).
    pub retry_after: u128,
}

/// Tries to take `cost` tokens at `now_ns` from a bucket whose state is `t_full`
/// (0 = never used = full).
pub fn debit(limit: &Limit, t_full: u128, now_ns: u64, cost: u64) -> Verdict {
    let now = now_ticks(now_ns);
    let tau = limit.tau();
    let base = t_full.max(now);
    let next = base.saturating_add(limit.interval.saturating_mul(cost as u128));
    let debt_after = next - now; // next >= base >= now
    if debt_after <= tau {
        Verdict {
            allowed: true,
            t_full: next,
            remaining: tokens_left(limit, tau - debt_after),
            reset: debt_after,
            retry_after: 0,
        }
    } else {
        let debt_now = base - now;
        Verdict {
            allowed: false,
            t_full,
            remaining: tokens_left(limit, tau.saturating_sub(debt_now)),
            reset: debt_now,
            retry_after: debt_after - tau,
        }
    }
}

fn tokens_left(limit: &Limit, spare: u128) -> u64 {
    u64::try_from(spare / limit.interval.max(1)).unwrap_or(u64::MAX)
}

/// Whether a bucket in state `t_full` is full at `now_ns` (a full bucket is the same as a
/// new one, which is why its slot may be reused).
pub fn is_full(t_full: u128, now_ns: u64) -> bool {
    t_full <= now_ticks(now_ns)
}

/// Carries a bucket across a change of its limit: the tokens already spent stay spent,
/// rounded up to whole tokens, and at most the new capacity is owed.
pub fn rescale(t_full: u128, now_ns: u64, old: &Limit, new: &Limit) -> u128 {
    let now = now_ticks(now_ns);
    if old == new || t_full <= now {
        return t_full;
    }
    let spent = (t_full - now).div_ceil(old.interval.max(1));
    let spent = spent.min(new.capacity as u128);
    now.saturating_add(spent.saturating_mul(new.interval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn lim(capacity: u64, rate: f64) -> Limit {
        Limit::new(capacity, rate).unwrap()
    }

    /// Runs requests at the given times and returns how many were admitted.
    fn admitted(limit: &Limit, times: &[u64], cost: u64) -> u64 {
        let mut state = 0u128;
        let mut n = 0;
        for &t in times {
            let v = debit(limit, state, t, cost);
            if v.allowed {
                state = v.t_full;
                n += 1;
            }
        }
        n
    }

    #[test]
    fn burst_then_deny() {
        let l = lim(5, 1.0);
        let times = vec![T0; 20];
        assert_eq!(admitted(&l, &times, 1), 5);
    }

    #[test]
    fn remaining_and_retry_after() {
        let l = lim(3, 0.5); // one token every 2 s
        let v1 = debit(&l, 0, T0, 1);
        assert!(v1.allowed);
        assert_eq!(v1.remaining, 2);
        assert_eq!(ticks_to_seconds_ceil(v1.reset), 2);
        let v2 = debit(&l, v1.t_full, T0, 1);
        let v3 = debit(&l, v2.t_full, T0, 1);
        assert_eq!(v3.remaining, 0);
        assert_eq!(ticks_to_seconds_ceil(v3.reset), 6);
        let v4 = debit(&l, v3.t_full, T0, 1);
        assert!(!v4.allowed);
        assert_eq!(ticks_to_seconds_ceil(v4.retry_after), 2);
        assert_eq!(v4.t_full, v3.t_full);
    }

    #[test]
    fn slow_rates_refill_exactly() {
        // 0.01 tokens/s: one token every 100 s, never lost to truncation. Capacity 10 so the
        // bucket never sits full between polls (a full bucket cannot bank more time).
        let l = lim(10, 0.01);
        let mut state = 0u128;
        let mut admitted = 0;
        // Poll every 7 s for 10 hours.
        let mut t = T0;
        while t <= T0 + 36_000 * SEC {
            let v = debit(&l, state, t, 1);
            if v.allowed {
                state = v.t_full;
                admitted += 1;
            }
            t += 7 * SEC;
        }
        // capacity 10 + 36000 s * 0.01/s = 370, minus at most the token still accruing.
        assert!((369..=370).contains(&admitted), "{admitted}");
    }

    #[test]
    fn long_idle_refills_to_exactly_capacity() {
        let l = lim(10, 0.01);
        let mut state = 0;
        for _ in 0..10 {
            state = debit(&l, state, T0, 1).t_full;
        }
        assert!(!debit(&l, state, T0, 1).allowed);
        let later = T0 + 365 * 24 * 3600 * SEC;
        assert_eq!(admitted(&l, &vec![later; 50], 1), 10);
        let v = debit(&l, state, later, 1);
        assert_eq!(v.remaining, 9);
    }

    #[test]
    fn clock_backwards_creates_nothing() {
        let l = lim(2, 1.0);
        let s1 = debit(&l, 0, T0, 1).t_full;
        let s2 = debit(&l, s1, T0, 1).t_full;
        for back in [1, SEC / 2, 10 * SEC, T0] {
            assert!(!debit(&l, s2, T0 - back, 1).allowed);
        }
        assert!(debit(&l, s2, T0 + SEC, 1).allowed);
    }

    #[test]
    fn extreme_configs_do_not_overflow() {
        let big = lim(1 << 32, 1e9);
        let v = debit(&big, 0, u64::MAX, 1 << 32);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
        let v = debit(&big, v.t_full, u64::MAX, 1);
        assert!(!v.allowed);
        let huge = lim(MAX_CAPACITY, MIN_RATE);
        let v = debit(&huge, 0, u64::MAX, MAX_CAPACITY);
        assert!(v.allowed);
        let v = debit(&huge, u128::MAX, 0, u64::MAX);
        assert!(!v.allowed);
        let fast = lim(1, MAX_RATE);
        assert!(debit(&fast, 0, T0, 1).allowed);
    }

    #[test]
    fn rescale_keeps_spent_tokens_clamped() {
        let old = lim(100, 1.0);
        let mut s = 0;
        for _ in 0..30 {
            s = debit(&old, s, T0, 1).t_full;
        }
        // Same rate, bigger capacity: 30 spent -> 170 left of 200.
        let bigger = lim(200, 1.0);
        assert_eq!(debit(&bigger, rescale(s, T0, &old, &bigger), T0, 1).remaining, 169);
        // Smaller capacity than spent: nothing left, owes at most the new capacity.
        let smaller = lim(10, 2.0);
        let r = rescale(s, T0, &old, &smaller);
        assert!(!debit(&smaller, r, T0, 1).allowed);
        assert!(debit(&smaller, r, T0 + 5 * SEC, 10).allowed);
        // Unchanged limits leave the state alone.
        assert_eq!(rescale(s, T0, &old, &old), s);
    }

    fn limits(specs: &[(u64, f64)]) -> Limits {
        let mut out = Limits::default();
        for (i, (c, r)) in specs.iter().enumerate() {
            assert!(out.push(i as u64 + 1, lim(*c, *r)));
        }
        out
    }

    #[test]
    fn limits_are_bounded_and_compare_by_what_is_in_use() {
        let mut l = limits(&[(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)]);
        assert!(!l.push(9, lim(5, 1.0)));
        assert_eq!(l.len(), MAX_LIMITS);
        assert_eq!(l.min_capacity(), 1);
        assert_eq!(l.ids(), &[1, 2, 3, 4]);
        assert_eq!(Limits::one(0, lim(2, 1.0)), Limits::one(0, lim(2, 1.0)));
        assert_ne!(Limits::one(0, lim(2, 1.0)), Limits::one(1, lim(2, 1.0)));
        assert_ne!(limits(&[(2, 1.0)]), limits(&[(2, 1.0), (3, 1.0)]));
    }

    #[test]
    fn several_limits_admit_the_minimum_and_debit_nothing_on_a_denial() {
        // 5 per second and 8 per minute: 5 at once, then the minute limit holds 3 more.
        let l = limits(&[(5, 5.0), (8, 8.0 / 60.0)]);
        let mut states = [0; MAX_LIMITS];
        let mut admitted = 0;
        for t in [T0, T0, T0, T0, T0, T0, T0 + SEC, T0 + SEC, T0 + SEC, T0 + SEC, T0 + 2 * SEC] {
            let v = debit_all(&l, &states, t, 1);
            if v.allowed {
                states = v.states();
                admitted += 1;
            } else {
                // Nothing moved, and the limit that would have admitted says so (no wait).
                assert_eq!(v.states(), states);
                assert!(v.retry_after() > 0);
            }
        }
        assert_eq!(admitted, 8);
        let v = debit_all(&l, &states, T0 + 2 * SEC, 1);
        assert!(!v.allowed);
        // The second-limit bucket denied; the first had tokens and shows them untouched.
        assert_eq!(v.each[0].retry_after, 0);
        assert_eq!(v.each[0].remaining, 5);
        assert!(v.each[1].retry_after > 0);
        assert_eq!(v.retry_after(), v.each[1].retry_after);
    }

    proptest! {
        /// All or nothing: a denial leaves every limit as it was; an admission debits every
        /// limit exactly as a single-limit debit would; and with a second, looser limit the
        /// admissions are exactly those of the tighter limit alone (the reference model).
        #[test]
        fn several_limits_are_all_or_nothing_and_exact(
            specs in prop::collection::vec((1u64..40, 1u64..20_000), 1..=MAX_LIMITS),
            steps in prop::collection::vec((0u64..4, 0u64..2 * SEC), 1..200),
        ) {
            let l = limits(&specs.iter().map(|(c, r)| (*c, *r as f64 / 1000.0)).collect::<Vec<_>>());
            let mut states = [0u128; MAX_LIMITS];
            let mut now = T0;
            for (cost, gap) in steps {
                now += gap;
                let v = debit_all(&l, &states, now, cost);
                let singles: Vec<Verdict> = l.iter().zip(states.iter()).map(|(lim, t)| debit(lim, *t, now, cost)).collect();
                prop_assert_eq!(v.allowed, singles.iter().all(|s| s.allowed));
                if v.allowed {
                    for (i, s) in singles.iter().enumerate() {
                        prop_assert_eq!(v.each[i], *s);
                    }
                    states = v.states();
                } else {
                    prop_assert_eq!(v.states(), states);
                    let longest = singles.iter().map(|s| s.retry_after).max().unwrap();
                    prop_assert_eq!(v.retry_after(), longest);
                }
            }
        }

        #[test]
        fn a_looser_second_limit_changes_nothing(
            capacity in 1u64..50,
            rate_milli in 1u64..20_000,
            gaps in prop::collection::vec(0u64..2 * SEC, 1..300),
        ) {
            let rate = rate_milli as f64 / 1000.0;
            let tight = limits(&[(capacity, rate)]);
            let both = limits(&[(capacity * 2, rate * 3.0), (capacity, rate)]);
            let (mut a, mut b) = ([0u128; MAX_LIMITS], [0u128; MAX_LIMITS]);
            let mut now = T0;
            for g in gaps {
                now += g;
                let (va, vb) = (debit_all(&tight, &a, now, 1), debit_all(&both, &b, now, 1));
                prop_assert_eq!(va.allowed, vb.allowed);
                if va.allowed { a = va.states(); b = vb.states(); }
            }
        }

        /// Admission never exceeds capacity + rate * elapsed (+1 for rounding), whatever the
        /// request times, and a client asking faster than the rate gets that much.
        #[test]
        fn admission_is_exact(
            capacity in 1u64..200,
            rate_milli in 1u64..200_000,
            gaps in prop::collection::vec(0u64..3 * SEC, 1..400),
        ) {
            let rate = rate_milli as f64 / 1000.0;
            let l = lim(capacity, rate);
            let mut times = Vec::with_capacity(gaps.len());
            let mut t = T0;
            for g in &gaps { t += g; times.push(t); }
            let elapsed_s = (t - T0) as f64 / SEC as f64;
            let n = admitted(&l, &times, 1) as f64;
            let upper = capacity as f64 + rate * elapsed_s + 1.0;
            prop_assert!(n <= upper, "admitted {} > {}", n, upper);
        }

        #[test]
        fn greedy_client_gets_its_rate(
            capacity in 2u64..50,
            rate_milli in 100u64..50_000,
            secs in 1u64..60,
        ) {
            let rate = rate_milli as f64 / 1000.0;
            let l = lim(capacity, rate);
            // Ask 4x the rate, evenly spaced (and at least 20 per second).
            let per_sec = ((rate * 4.0).ceil() as u64).max(20);
            let total = per_sec * secs;
            // The burst first, then the stream.
            let mut times = vec![T0; capacity as usize];
            times.extend((0..=total).map(|i| T0 + i * SEC / per_sec));
            let n = admitted(&l, &times, 1) as f64;
            let expected = capacity as f64 + rate * secs as f64;
            prop_assert!(n >= expected - 1.0, "admitted {} < {}", n, expected);
            prop_assert!(n <= expected + 1.0);
        }

        #[test]
        fn never_panics(capacity in 1u64..=MAX_CAPACITY, rate in MIN_RATE..MAX_RATE,
                        t_full: u128, now: u64, cost: u64) {
            let l = lim(capacity, rate);
            let v = debit(&l, t_full, now, cost);
            prop_assert!(v.remaining <= capacity);
            let _ = rescale(t_full, now, &l, &lim(1, 1.0));
        }
    }
}
