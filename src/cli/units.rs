//! Durations and sizes as written on the command line (clap value parsers) and in
//! `config.toml`. Errors are strings: clap prints them after the flag's name.

use std::time::Duration;

/// `--timeout`: a duration above zero (a zero timeout would fail every request).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} is zero: give a positive duration, e.g. 15s")),
        d => Ok(d),
    }
}

/// A duration in humantime's grammar (`30s`, `2m`, `500ms`, `7d`, `1h 30m`, `1.5s`), or a
/// bare number of seconds (`7`, `0.5`), which `--timeout` accepted before units existed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bare = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare {
        t.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| "not a number of seconds".to_owned())
    } else {
        humantime::parse_duration(t).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 30s, 2m, 500ms, 7d, 1h 30m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, d) in [
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("500ms", Duration::from_millis(500)),
            ("7", Duration::from_secs(7)),
            ("0.5", Duration::from_millis(500)),
            (" 7 ", Duration::from_secs(7)),
            ("1.5s", Duration::from_millis(1500)),
            ("1h 30m", Duration::from_secs(5400)),
            ("5d", Duration::from_secs(5 * 86_400)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for s in ["", "x", "-1", "-1s", "1.2.3", "5q", "s", "1e3", "inf"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_timeout("1ms").unwrap(), Duration::from_millis(1));
    }
}
