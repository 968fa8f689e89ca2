//! Readable rates: `"120/min"` beside a plain number of tokens per second.

const UNITS: &[(&str, f64)] = &[
    ("s", 1.0),
    ("sec", 1.0),
    ("second", 1.0),
    ("min", 60.0),
    ("minute", 60.0),
    ("h", 3600.0),
    ("hour", 3600.0),
    ("d", 86_400.0),
    ("day", 86_400.0),
];

/// The units of [`UNITS`], as the error lists them (a constant: joining them at run time
/// costs the .wasm a string-join routine of its own).
const ACCEPTED: &str = "s, sec, second, min, minute, h, hour, d, day";

/// Parses `"<number>/<unit>"` into tokens per second; the error says what is accepted.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let Some((amount, unit)) = text.split_once('/') else {
        return Err(format!("\"{text}\" is not a rate: write a number or \"<n>/<unit>\" such as \"120/min\""));
    };
    let amount = match parse_decimal(amount.trim()) {
        Some(a) if a > 0.0 => a,
        _ => return Err(format!("\"{text}\": the amount before \"/\" must be a positive number such as 120 or 0.5")),
    };
    let unit = unit.trim();
    match UNITS.iter().find(|(u, _)| *u == unit) {
        Some((_, seconds)) => Ok(amount / seconds),
        None => Err(format!("\"{text}\": unknown unit \"{unit}\"; accepted units: {ACCEPTED}")),
    }
}

/// `123` or `123.456` (at most 18 digits on each side). Hand-rolled because core's
/// `f64::from_str` adds ~15 KB of tables to the .wasm, and rates need nothing more.
fn parse_decimal(text: &str) -> Option<f64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || (text.contains('.') && frac.is_empty()) {
        return None;
    }
    let whole: u64 = whole.bytes().fold(0, |n, b| n * 10 + u64::from(b - b'0'));
    let frac_value: u64 = frac.bytes().fold(0, |n, b| n * 10 + u64::from(b - b'0'));
    Some(whole as f64 + frac_value as f64 / 10f64.powi(frac.len() as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_rate("120/min"), Ok(2.0));
        assert_eq!(parse_rate("5/s"), Ok(5.0));
        assert_eq!(parse_rate("7200 / hour"), Ok(2.0));
        assert_eq!(parse_rate("86400/day"), Ok(1.0));
        assert_eq!(parse_rate("0.5/sec"), Ok(0.5));
    }

    #[test]
    fn the_accepted_list_is_the_units() {
        assert_eq!(ACCEPTED, UNITS.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(", "));
        // Hourly and daily quotas (several limits on one policy).
        assert_eq!(parse_rate("3600/h"), Ok(1.0));
        assert_eq!(parse_rate("864000/d"), Ok(10.0));
    }

    #[test]
    fn errors_say_what_is_accepted() {
        let e = parse_rate("5/fortnight").unwrap_err();
        assert!(e.contains("accepted units: s, sec, second, min"), "{e}");
        assert!(parse_rate("120").is_err());
        assert!(parse_rate("-1/s").is_err());
        assert!(parse_rate("nan/s").is_err());
        assert!(parse_rate("/s").is_err());
        assert!(parse_rate("1e3/s").is_err());
        assert!(parse_rate("1./s").is_err());
        assert!(parse_rate(".5/s").is_err());
        assert!(parse_rate("99999999999999999999/s").is_err());
    }
}
