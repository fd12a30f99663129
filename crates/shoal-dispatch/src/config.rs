//! Parsing of command-line values: backend lists and durations.

use shoal_core::select::BackendSpec;

/// A bad command-line value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A backend entry that is not `HOST:PORT[=WEIGHT]`.
    #[error(
        "bad backend {entry:?}: {why}; expected HOST:PORT or HOST:PORT=WEIGHT, e.g. 127.0.0.1:8081=2"
    )]
    Backend {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A CPU affinity that is not `none`, `auto` or a CPU list.
    #[error(
        "bad --cpu-affinity {0:?}; expected none, auto (one CPU per thread, in order) or a CPU list such as 0-3,6"
    )]
    CpuAffinity(String),
}

/// Where the dispatcher's event-loop threads run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuAffinity {
    /// Wherever the kernel schedules them.
    #[default]
    None,
    /// Thread i on the i-th CPU the process may use (round robin when
    /// there are more threads than CPUs).
    Auto,
    /// Thread i on the i-th CPU of this list (round robin).
    List(Vec<usize>),
}

/// Parses `none`, `auto` or a CPU list (`0-3,6`, as taskset -c).
pub fn parse_cpu_affinity(s: &str) -> Result<CpuAffinity, ConfigError> {
    let bad = || ConfigError::CpuAffinity(s.to_string());
    let t = s.trim();
    match t {
        "none" => return Ok(CpuAffinity::None),
        "auto" => return Ok(CpuAffinity::Auto),
        _ => {}
    }
    let mut cpus = Vec::new();
    for part in t.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| bad())?;
        let hi: usize = hi.parse().map_err(|_| bad())?;
        // CPU numbers beyond what a CPU set can hold are surely typos.
        if lo > hi || hi >= 4096 {
            return Err(bad());
        }
        for c in lo..=hi {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    Ok(CpuAffinity::List(cpus))
}

/// Parses `HOST:PORT[=WEIGHT]`.
pub fn parse_backend(entry: &str) -> Result<BackendSpec, ConfigError> {
    let bad = |why| ConfigError::Backend {
        entry: entry.to_string(),
        why,
    };
    let entry_t = entry.trim();
    let (addr, weight) = match entry_t.rsplit_once('=') {
        Some((a, w)) => (
            a,
            w.parse::<u32>()
                .map_err(|_| bad("the weight is not a whole number"))?,
        ),
        None => (entry_t, 1),
    };
    if weight == 0 {
        return Err(bad("the weight must be at least 1"));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains(['/', ' ', '?', '#', '@']) {
        return Err(bad("the host has characters a host cannot have"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("IPv6 addresses need brackets, as [::1]:8080"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port is not a number from 1 to 65535")),
    }
    // The authority must be usable in a URI.
    if addr.parse::<http::uri::Authority>().is_err() {
        return Err(bad("not a valid host:port"));
    }
    Ok(BackendSpec {
        addr: addr.to_string(),
        weight,
        draining: false,
    })
}

/// Parses a comma-separated backend list.
pub fn parse_backends(list: &[String]) -> Result<Vec<BackendSpec>, ConfigError> {
    list.iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(parse_backend)
        .collect()
}

/// Parses `500ms`, `5s`, `2m`, or plain seconds.
/// Every time flag of the dispatcher takes shoal's one duration syntax.
pub use shoal_core::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn backends() {
        let b =
            parse_backends(&["127.0.0.1:8081=3, localhost:80".into(), "[::1]:9".into()]).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].addr.as_str(), b[0].weight), ("127.0.0.1:8081", 3));
        assert_eq!((b[1].addr.as_str(), b[1].weight), ("localhost:80", 1));
        assert_eq!(b[2].addr, "[::1]:9");
        for bad in [
            "nohost", ":80", "h:0", "h:99999", "h:80=0", "h:80=x", "::1:80", "a/b:80",
        ] {
            let e = parse_backend(bad).unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_affinities() {
        assert_eq!(parse_cpu_affinity("none").unwrap(), CpuAffinity::None);
        assert_eq!(parse_cpu_affinity("auto").unwrap(), CpuAffinity::Auto);
        assert_eq!(
            parse_cpu_affinity("0-2, 6,1").unwrap(),
            CpuAffinity::List(vec![0, 1, 2, 6])
        );
        for bad in ["", "fast", "3-1", "1,", "-1", "0-99999", "1.5"] {
            let e = parse_cpu_affinity(bad).unwrap_err();
            assert!(e.to_string().contains("0-3,6"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
