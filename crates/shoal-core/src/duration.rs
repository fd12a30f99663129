//! The one syntax of every time on shoal's command line and in its files:
//! a number with an optional unit, `500ms`, `6s`, `2m`, `1h`; a bare number
//! is seconds (`6`), so the scripts written before units were accepted keep
//! working. Decimals are allowed (`1.5s`, `0.5`), negative or non-finite
//! values are not. Pure text to value: no clock here.

use std::time::Duration;

/// Why a duration was refused; the message names the input and the syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {why}; write a number with a unit, e.g. 500ms, 6s, 2m or 1h (a bare number is seconds)"
)]
pub struct DurationError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses `6`, `6s`, `1.5s`, `500ms`, `2m`, `1h` into seconds.
pub fn parse_secs(s: &str) -> Result<f64, DurationError> {
    let bad = |why| DurationError {
        input: s.to_string(),
        why,
    };
    let t = s.trim();
    let (num, unit_secs) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let num = num.trim_end();
    if num.is_empty() {
        return Err(bad("no number"));
    }
    // Only plain decimal numbers: f64's parser would also take "inf", "NaN"
    // and "1e3", none of which is a duration anyone means.
    if !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad(if num.starts_with('-') {
            "it must not be negative"
        } else {
            "not a number with a known unit (ms, s, m, h)"
        }));
    }
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let secs = v * unit_secs;
    if !secs.is_finite() || secs > 1e12 {
        return Err(bad("too large"));
    }
    Ok(secs)
}

/// [`parse_secs`] as a [`Duration`].
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    parse_secs(s).map(Duration::from_secs_f64)
}

/// [`parse_secs`], refusing zero: for periods and timeouts that cannot be 0.
pub fn parse_positive_secs(s: &str) -> Result<f64, DurationError> {
    let v = parse_secs(s)?;
    if v == 0.0 {
        return Err(DurationError {
            input: s.to_string(),
            why: "it must be more than zero",
        });
    }
    Ok(v)
}

/// [`parse_positive_secs`] as a [`Duration`].
pub fn parse_positive_duration(s: &str) -> Result<Duration, DurationError> {
    parse_positive_secs(s).map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_and_a_bare_number() {
        assert_eq!(parse_secs("6").unwrap(), 6.0);
        assert_eq!(parse_secs("6s").unwrap(), 6.0);
        assert_eq!(parse_secs("1.5s").unwrap(), 1.5);
        assert_eq!(parse_secs("0.5").unwrap(), 0.5);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration(" 30s ").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_secs("0").unwrap(), 0.0);
    }

    #[test]
    fn refusals_name_the_input_and_the_syntax() {
        for bad in [
            "", "s", "fast", "-1s", "1d", "inf", "NaN", "1e3", "1..2s", "6 sec",
        ] {
            let e = parse_secs(bad).unwrap_err();
            let m = e.to_string();
            assert!(m.contains(&format!("{bad:?}")), "{m}");
            assert!(m.contains("500ms, 6s, 2m or 1h"), "{m}");
        }
        assert!(parse_positive_secs("0s").is_err());
        assert!(parse_positive_secs("0.1").is_ok());
        assert!(parse_secs("99999999999999h").is_err());
    }
}
