//! Which requests are metered, and at what cost. The first matching rule decides; with no
//! rules configured every request costs 1; with rules, a request matching none passes
//! unmetered (so rules are also how operators exempt health checks).

use crate::config::Rule;

/// What a request is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metering<'c> {
    /// Not metered: no rule matched, or the rule's cost is 0.
    Free,
    /// Debit `cost` tokens; `rule` is the matching rule, if rules are configured.
    Charge { cost: u64, rule: Option<(usize, &'c Rule)> },
}

/// The path part used for prefix matching: everything before `?` or `#`.
fn path_only(path: &[u8]) -> &[u8] {
    match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => path.get(..end).unwrap_or(path),
        None => path,
    }
}

pub fn classify<'c>(rules: &'c [Rule], method: &[u8], path: &[u8]) -> Metering<'c> {
    if rules.is_empty() {
        return Metering::Charge { cost: 1, rule: None };
    }
    let path = path_only(path);
    for (index, rule) in rules.iter().enumerate() {
        let method_ok = rule.methods.is_empty() || rule.methods.iter().any(|m| m.as_bytes() == method);
        if method_ok && path.starts_with(rule.path_prefix.as_bytes()) {
            return if rule.cost == 0 {
                Metering::Free
            } else {
                Metering::Charge { cost: rule.cost, rule: Some((index, rule)) }
            };
        }
    }
    Metering::Free
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rules(json: &str) -> Vec<Rule> {
        Config::from_json_bytes(format!(r#"{{"capacity":10,"refill_rate":1,"rules":{json}}}"#).as_bytes())
            .unwrap()
            .rules
    }

    #[test]
    fn no_rules_meter_everything_at_one() {
        assert_eq!(classify(&[], b"GET", b"/"), Metering::Charge { cost: 1, rule: None });
    }

    #[test]
    fn first_match_wins_and_unmatched_is_free() {
        let r = rules(
            r#"[{"path_prefix":"/healthz","cost":0},{"methods":["POST"],"path_prefix":"/api","cost":5},{"methods":["GET"]}]"#,
        );
        assert_eq!(classify(&r, b"GET", b"/healthz"), Metering::Free);
        assert!(matches!(classify(&r, b"POST", b"/api/x?y=1"), Metering::Charge { cost: 5, rule: Some((1, _)) }));
        assert!(matches!(classify(&r, b"GET", b"/api"), Metering::Charge { cost: 1, rule: Some((2, _)) }));
        assert_eq!(classify(&r, b"DELETE", b"/other"), Metering::Free);
        assert_eq!(classify(&r, b"POST", b"/ap"), Metering::Free);
    }

    #[test]
    fn query_does_not_extend_the_path() {
        let r = rules(r#"[{"path_prefix":"/a/b"}]"#);
        assert_eq!(classify(&r, b"GET", b"/a?/b"), Metering::Free);
    }
}
