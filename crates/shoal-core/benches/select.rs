//! Selection cost per request at 4, 64 and 1024 backends, and LARD's memory
//! per remembered object with 1,000,000 distinct objects.
//!
//! cargo bench -p shoal-core --bench select
//! (LARD memory is printed first, as "lard_memory: ... bytes/object".)

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shoal_core::select::{
    Algo, BackendSpec, HashFn, LardParams, Pool, RequestKey, SelectorConfig, build,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

/// Counts live heap bytes, to measure LARD's history.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn urls() -> Vec<String> {
    // World-Cup-like object names with query strings.
    (0..4096)
        .map(|i| format!("/english/images/team_{}/photo_{i}.jpg?lang=en", i % 32))
        .collect()
}

fn specs(n: usize) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| {
            BackendSpec::new(format!(
                "10.{}.{}.{}:8080",
                i / 65536,
                (i / 256) % 256,
                i % 256
            ))
        })
        .collect()
}

fn selection(c: &mut Criterion) {
    let urls = urls();
    let mut cases: Vec<(String, SelectorConfig)> = Vec::new();
    for algo in Algo::ALL {
        cases.push((
            algo.to_string(),
            SelectorConfig {
                algo,
                replicas: 2,
                ..SelectorConfig::default()
            },
        ));
    }
    for hash in [HashFn::Charsum, HashFn::Md5, HashFn::Sha1] {
        cases.push((
            format!("url-hash/{hash}"),
            SelectorConfig {
                algo: Algo::UrlHash,
                replicas: 2,
                hash,
                ..SelectorConfig::default()
            },
        ));
    }
    for n in [4usize, 64, 1024] {
        let mut g = c.benchmark_group(format!("select/{n}"));
        g.throughput(Throughput::Elements(1));
        let set = Pool::new().update(&specs(n)).unwrap();
        for (name, cfg) in &cases {
            let s = build(cfg).unwrap();
            let mut i = 0usize;
            // acquire + release: what the dispatcher pays per request.
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    let l = s.acquire(&RequestKey::new(black_box(&urls[i])), &set);
                    black_box(l)
                })
            });
        }
        g.finish();
    }
}

fn lard_memory() {
    const OBJECTS: usize = 1_000_000;
    let set = Pool::new().update(&specs(16)).unwrap();
    for algo in [Algo::Lard, Algo::LardR] {
        let before = LIVE.load(Relaxed);
        let s = build(&SelectorConfig {
            algo,
            lard: LardParams {
                max_objects: OBJECTS,
                ..LardParams::default()
            },
            ..SelectorConfig::default()
        })
        .unwrap();
        let mut path = String::new();
        for i in 0..OBJECTS {
            use std::fmt::Write;
            path.clear();
            let _ = write!(path, "/objects/{i}.html");
            black_box(s.select(&RequestKey::new(&path), &set));
        }
        let after = LIVE.load(Relaxed);
        println!(
            "lard_memory: {algo}: {OBJECTS} objects, {} bytes live, {:.1} bytes/object",
            after - before,
            (after - before) as f64 / OBJECTS as f64
        );
        drop(s);
    }
}

fn benches(c: &mut Criterion) {
    lard_memory();
    selection(c);
}

criterion_group!(select_benches, benches);
criterion_main!(select_benches);
