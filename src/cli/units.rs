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

/// Parse a size: bytes, or with a binary unit `K`, `M`, `G`, `T` (optionally `i`, `B`,
/// `iB`), e.g. `20G`, `512MiB`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 20G, 512M, 1048576)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KI" | "KIB" => 1 << 10,
        "M" | "MB" | "MI" | "MIB" => 1 << 20,
        "G" | "GB" | "GI" | "GIB" => 1 << 30,
        "T" | "TB" | "TI" | "TIB" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
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

    #[test]
    fn sizes() {
        for (s, v) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("20G", 20 << 30),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("1.5G", 3 << 29),
            ("4k", 4096),
            (" 2T ", 2 << 40),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in ["", "G", "-1G", "1X", "1.2.3M", "abc"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
