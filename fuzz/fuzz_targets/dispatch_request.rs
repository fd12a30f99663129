//! The dispatcher's own code on the request path: the request target and
//! headers a client sends (after hyper's parsing), through object naming,
//! hashing and every selection algorithm, and hop-by-hop header removal.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_core::select::{Algo, BackendSpec, Pool, RequestKey, SelectorConfig, build};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (target, headers) = text.split_once('\n').unwrap_or((text, ""));
    let mut pool = Pool::new();
    let n = 1 + data.first().copied().unwrap_or(0) as usize % 7;
    let specs: Vec<BackendSpec> = (0..n)
        .map(|i| BackendSpec {
            addr: format!("127.0.0.1:{}", 1000 + i),
            weight: 1 + (i as u32 % 3),
            draining: i == 2,
        })
        .collect();
    let Ok(set) = pool.update(&specs) else {
        return;
    };
    let key = RequestKey::new(target);
    for algo in Algo::ALL {
        let cfg = SelectorConfig {
            algo,
            replicas: 1 + n / 2,
            ..Default::default()
        };
        if let Ok(sel) = build(&cfg) {
            if let Some(i) = sel.select(&key, &set) {
                assert!(i < n);
            }
            let _ = sel.explain(&key, &set);
        }
    }
    let mut h = http::HeaderMap::new();
    for line in headers.lines() {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            h.append(k, v);
        }
    }
    shoal_dispatch::proxy::strip_hop_by_hop(&mut h);
    assert!(!h.contains_key(http::header::CONNECTION));
});
