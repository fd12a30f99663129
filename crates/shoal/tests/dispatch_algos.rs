//! Each selection algorithm, through the real `shoal dispatch` binary, to real
//! HTTP backends on loopback.

mod dispatch_common;

use dispatch_common::*;
use shoal_core::select::{Failover, HashFn, UrlHash};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

async fn backends(n: usize) -> Vec<TestBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestBackend::start(&format!("b{i}")).await);
    }
    v
}

fn refs(v: &[TestBackend]) -> Vec<&TestBackend> {
    v.iter().collect()
}

/// Starts `n` requests to `path` one at a time, each only once the previous
/// one is in flight at a backend, so the dispatcher sees a known load.
async fn hold(
    c: &Client,
    base: &str,
    paths: &[String],
    bs: &[&TestBackend],
) -> Vec<tokio::task::JoinHandle<Result<Reply, String>>> {
    let before = in_flight(bs);
    let mut hs = Vec::new();
    for (k, p) in paths.iter().enumerate() {
        let c = c.clone();
        let url = format!("{base}{p}");
        hs.push(tokio::spawn(async move { c.get(&url).await }));
        let want = before + k as u64 + 1;
        wait_until("request in flight", Duration::from_secs(10), || {
            in_flight(bs) >= want
        })
        .await;
    }
    hs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rr_cycles_evenly() {
    let bs = backends(3).await;
    let d = Dispatcher::start(&refs(&bs), &["--algo", "rr"]);
    let c = Client::new();
    let mut seq = Vec::new();
    for i in 0..30 {
        let r = c.get(&format!("{}/p{i}", d.url)).await.unwrap();
        assert_eq!(r.status, 200);
        seq.push(r.backend);
    }
    // A cycle through all three, repeated.
    for w in seq.windows(4) {
        assert_eq!(w[0], w[3], "{seq:?}");
    }
    for b in &bs {
        assert_eq!(b.stats.served.load(SeqCst), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrr_is_smooth_and_weighted() {
    let bs = backends(3).await;
    let list = format!("{}=5,{}=1,{}=1", bs[0].spec(), bs[1].spec(), bs[2].spec());
    let d = Dispatcher::start_raw(&list, &["--algo", "wrr"]);
    let c = Client::new();
    let mut seq = String::new();
    for _ in 0..14 {
        let r = c.get(&format!("{}/", d.url)).await.unwrap();
        seq.push_str(&r.backend[1..]);
    }
    // nginx's smooth WRR for 5,1,1: a a b a c a a, twice.
    assert_eq!(seq, "00102000010200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lc_avoids_the_busy_backend() {
    let bs = backends(2).await;
    let d = Dispatcher::start(&refs(&bs), &["--algo", "lc"]);
    let c = Client::new();
    let held = hold(&c, &d.url, &["/sleep/1500".to_string()], &refs(&bs)).await;
    let busy = bs
        .iter()
        .position(|b| b.stats.in_flight.load(SeqCst) == 1)
        .unwrap();
    for i in 0..10 {
        let r = c.get(&format!("{}/q{i}", d.url)).await.unwrap();
        assert_eq!(r.backend, bs[1 - busy].name, "request {i}");
    }
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wlc_holds_connections_in_weight_ratio() {
    let bs = backends(2).await;
    let list = format!("{}=3,{}=1", bs[0].spec(), bs[1].spec());
    let d = Dispatcher::start_raw(&list, &["--algo", "wlc"]);
    let c = Client::new();
    let paths: Vec<String> = (0..8).map(|i| format!("/sleep/1500/{i}")).collect();
    let held = hold(&c, &d.url, &paths, &refs(&bs)).await;
    assert_eq!(bs[0].stats.in_flight.load(SeqCst), 6);
    assert_eq!(bs[1].stats.in_flight.load(SeqCst), 2);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_hash_keeps_every_url_in_its_subset() {
    let bs = backends(5).await;
    let r = 2;
    let d = Dispatcher::start(
        &refs(&bs),
        &["--algo", "url-hash", "--replicas", "2", "--hash", "md5"],
    );
    let c = Client::new();
    let u = UrlHash::new(HashFn::Md5, r, Failover::Skip);
    // Sequentially (idle cluster): always the subset's first member.
    for i in 0..100 {
        let p = format!("/obj/{i}.html");
        let sub = u.sub_namespace(&p, bs.len());
        let got = c.get(&format!("{}{p}?v={}", d.url, i * 7)).await.unwrap();
        assert_eq!(got.backend, bs[sub].name, "{p} sub-namespace {sub}");
    }
    // Under concurrency: any member of the subset of R, never outside it.
    let mut hs = Vec::new();
    for k in 0..8 {
        let c = c.clone();
        let base = d.url.clone();
        hs.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..60 {
                let p = format!("/obj/{}.html", (i * 13 + k) % 40);
                let got = c.get(&format!("{base}/sleep/2/..{p}")).await.unwrap();
                seen.push((p, got.backend));
            }
            seen
        }));
    }
    let mut spread: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for h in hs {
        for (p, b) in h.await.unwrap() {
            // the object is the whole path the dispatcher saw
            let obj = format!("/sleep/2/..{p}");
            let sub = u.sub_namespace(&obj, bs.len());
            let subset: Vec<&str> = (0..r)
                .map(|t| bs[(sub + t) % bs.len()].name.as_str())
                .collect();
            assert!(
                subset.contains(&b.as_str()),
                "{obj} went to {b}, subset {subset:?}"
            );
            spread.entry(obj).or_default().insert(b);
        }
    }
    assert!(spread.values().all(|s| s.len() <= r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_hash_failure_moves_only_the_failed_sub_namespace() {
    let bs = backends(4).await;
    let d = Dispatcher::start(&refs(&bs), &["--algo", "url-hash", "--hash", "xxh3"]);
    let c = Client::new();
    let paths: Vec<String> = (0..200).map(|i| format!("/f/{i}")).collect();
    let mut before = Vec::new();
    for p in &paths {
        before.push(c.get(&format!("{}{p}", d.url)).await.unwrap().backend);
    }
    let killed = bs[1].kill();
    assert_eq!(killed, 0);
    let mut moved_other = 0;
    for (p, b) in paths.iter().zip(&before) {
        let r = c.get(&format!("{}{p}", d.url)).await.unwrap();
        assert_eq!(r.status, 200, "{p}");
        if *b == bs[1].name {
            assert_eq!(
                r.backend, bs[2].name,
                "{p}: the next backend takes b1's share"
            );
        } else if r.backend != *b {
            moved_other += 1;
        }
    }
    assert_eq!(moved_other, 0, "objects of live backends moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lard_keeps_an_object_until_the_thresholds_move_it() {
    let bs = backends(2).await;
    let d = Dispatcher::start(
        &refs(&bs),
        &["--algo", "lard", "--lard-low", "2", "--lard-high", "4"],
    );
    let c = Client::new();
    // Idle: the same object stays on one server.
    let first = c
        .get(&format!("{}/sleep/0/a", d.url))
        .await
        .unwrap()
        .backend;
    for _ in 0..20 {
        assert_eq!(
            c.get(&format!("{}/sleep/0/a", d.url))
                .await
                .unwrap()
                .backend,
            first
        );
    }
    // Hold 5 requests of one object: all on its server (load 0..4 <= T_high).
    let hot: Vec<String> = (0..5).map(|_| "/sleep/1500/hot".to_string()).collect();
    let held = hold(&c, &d.url, &hot, &refs(&bs)).await;
    let home = bs
        .iter()
        .position(|b| b.stats.in_flight.load(SeqCst) == 5)
        .expect("all five on one server");
    // Load 5 > T_high=4 and the other is below T_low=2: the next one moves...
    let moved = hold(&c, &d.url, &["/sleep/1500/hot".to_string()], &refs(&bs)).await;
    assert_eq!(bs[1 - home].stats.in_flight.load(SeqCst), 1);
    // ...and the object stays at its new server.
    let r = c.get(&format!("{}/sleep/0/hot", d.url)).await.unwrap();
    assert_eq!(r.backend, bs[1 - home].name);
    for h in held.into_iter().chain(moved) {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lard_r_adds_a_server_to_a_hot_object() {
    let bs = backends(3).await;
    let d = Dispatcher::start(
        &refs(&bs),
        &["--algo", "lard-r", "--lard-low", "2", "--lard-high", "4"],
    );
    let c = Client::new();
    let hot: Vec<String> = (0..6).map(|_| "/sleep/1500/hot".to_string()).collect();
    let held = hold(&c, &d.url, &hot, &refs(&bs)).await;
    let loads: Vec<u64> = bs.iter().map(|b| b.stats.in_flight.load(SeqCst)).collect();
    let mut sorted = loads.clone();
    sorted.sort();
    // five on the first server, then the set grows by one server
    assert_eq!(sorted, vec![0, 1, 5], "{loads:?}");
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_ch_never_exceeds_its_cap() {
    let bs = backends(4).await;
    let d = Dispatcher::start(
        &refs(&bs),
        &["--algo", "bounded-ch", "--balance-factor", "125"],
    );
    let c = Client::new();
    // Idle: consistent.
    let home = c
        .get(&format!("{}/sleep/0/x", d.url))
        .await
        .unwrap()
        .backend;
    for _ in 0..10 {
        assert_eq!(
            c.get(&format!("{}/sleep/0/x", d.url))
                .await
                .unwrap()
                .backend,
            home
        );
    }
    // 16 concurrent requests for ONE object: a plain consistent hash would
    // put all 16 on one backend; the bound is ceil(1.25 * 16 / 4) = 5.
    let paths: Vec<String> = (0..16).map(|_| "/sleep/1500/x".to_string()).collect();
    let held = hold(&c, &d.url, &paths, &refs(&bs)).await;
    for b in &bs {
        let m = b.stats.max_in_flight.load(SeqCst);
        assert!(m <= 5, "{} had {m} in flight, over the cap 5", b.name);
    }
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    // And with many clients at once (no serialisation), still within the
    // cap for the total in flight: ceil(1.25 * 32 / 4) = 10.
    for b in &bs {
        b.stats.max_in_flight.store(0, SeqCst);
    }
    let mut hs = Vec::new();
    for _ in 0..32 {
        let c = c.clone();
        let u = format!("{}/sleep/300/x", d.url);
        hs.push(tokio::spawn(async move { c.get(&u).await }));
    }
    for h in hs {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    for b in &bs {
        let m = b.stats.max_in_flight.load(SeqCst);
        assert!(m <= 10, "{} had {m} in flight, over the cap 10", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_backend_gets_no_new_requests() {
    let bs = backends(3).await;
    let d = Dispatcher::start(&refs(&bs), &["--algo", "rr", "--drain-timeout", "60s"]);
    let c = Client::new();
    c.put_backends(
        &d.admin,
        serde_json::json!([
            {"addr": bs[0].spec()},
            {"addr": bs[1].spec(), "draining": true},
            {"addr": bs[2].spec()},
        ]),
    )
    .await;
    let before = bs[1].stats.served.load(SeqCst);
    for i in 0..30 {
        let r = c.get(&format!("{}/d{i}", d.url)).await.unwrap();
        assert_ne!(r.backend, bs[1].name);
    }
    assert_eq!(bs[1].stats.served.load(SeqCst), before);
    // It has no connections, so it leaves the list.
    let admin = d.admin.clone();
    let c2 = c.clone();
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..400 {
        let r = c2.get(&format!("{admin}/backends")).await.unwrap();
        let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if list.as_array().unwrap().len() == 2 {
            gone.store(true, SeqCst);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone.load(SeqCst), "drained backend was not removed");
}

/// `shoal route --dispatcher ADMIN --json URL...`: the running dispatcher's
/// own explanation (blocking call, off the test's event loop).
async fn route_live(admin: &str, urls: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "route".to_string(),
        "--dispatcher".into(),
        admin.to_string(),
        "--json".into(),
    ];
    args.extend(urls.iter().map(|u| u.to_string()));
    tokio::task::spawn_blocking(move || shoal_json(&args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_asks_the_live_dispatcher_and_changes_nothing() {
    let bs = backends(2).await;
    let d = Dispatcher::start(
        &refs(&bs),
        &["--algo", "lard", "--lard-low", "2", "--lard-high", "4"],
    );
    let c = Client::new();
    let addr_of = |name: &str| bs.iter().find(|b| b.name == name).unwrap().spec();
    // LARD's history lives in the dispatcher: an offline `shoal route`
    // cannot know where /hot went, the dispatcher can.
    let home = c
        .get(&format!("{}/sleep/0/hot", d.url))
        .await
        .unwrap()
        .backend;
    for _ in 0..3 {
        let v = route_live(&d.admin, &["/sleep/0/hot"]).await;
        assert_eq!(v[0]["algo"], "lard", "{v}");
        assert_eq!(v[0]["chosen"], addr_of(&home), "{v}");
    }
    // Explaining changed nothing: the object is still at home.
    assert_eq!(
        c.get(&format!("{}/sleep/0/hot", d.url))
            .await
            .unwrap()
            .backend,
        home
    );
    // With five requests of the object held at home (load 5 > T_high = 4,
    // the other server idle, below T_low = 2), the dispatcher explains the
    // move with the live loads, and the next request does move.
    let hot: Vec<String> = (0..5).map(|_| "/sleep/1500/hot".to_string()).collect();
    let held = hold(&c, &d.url, &hot, &refs(&bs)).await;
    let v = route_live(&d.admin, &["/sleep/0/hot"]).await;
    let other = bs.iter().find(|b| b.name != home).unwrap();
    assert_eq!(v[0]["chosen"], other.spec(), "{v}");
    let at_home = v[0]["subset"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| *s == addr_of(&home))
        .expect("home is a candidate");
    assert_eq!(v[0]["loads"][at_home], 5, "{v}");
    let r = c.get(&format!("{}/sleep/0/hot", d.url)).await.unwrap();
    assert_eq!(r.backend, other.name);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    // Round-robin shows that explaining moves no state: the same answer
    // twice, and the next request goes where it said.
    let rr = Dispatcher::start(&refs(&bs), &["--algo", "rr"]);
    for _ in 0..3 {
        let a = route_live(&rr.admin, &["/x"]).await;
        let b = route_live(&rr.admin, &["/x"]).await;
        assert_eq!(a[0]["chosen"], b[0]["chosen"], "{a} {b}");
        let r = c.get(&format!("{}/x", rr.url)).await.unwrap();
        assert_eq!(a[0]["chosen"], addr_of(&r.backend), "{a}");
    }
    // A bad request body to the admin endpoint names the expected shape.
    let req = hyper::Request::post(format!("{}/route", d.admin))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(
        String::from_utf8_lossy(&r.body).contains("JSON list of URLs"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_eject_and_readmit() {
    let bs = backends(2).await;
    let d = Dispatcher::start(
        &refs(&bs),
        &[
            "--algo",
            "rr",
            "--health-path",
            "/healthz",
            "--health-interval",
            "100ms",
            "--eject-for",
            "200ms",
        ],
    );
    let c = Client::new();
    let served_by = |n: usize| {
        let c = c.clone();
        let url = format!("{}/x", d.url);
        async move {
            let mut who = HashMap::new();
            for _ in 0..n {
                let r = c.get(&url).await.unwrap();
                assert_eq!(r.status, 200);
                *who.entry(r.backend).or_insert(0) += 1;
            }
            who
        }
    };
    assert_eq!(served_by(4).await.len(), 2);
    // b1 still accepts connections and serves, but its health check says
    // 503: a TCP check would keep it, the HTTP check ejects it.
    bs[1].stats.failing_health.store(true, SeqCst);
    let c2 = c.clone();
    let admin = d.admin.clone();
    let ejected = move || {
        let c = c2.clone();
        let admin = admin.clone();
        async move {
            let r = c.get(&format!("{admin}/backends")).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v.as_array().unwrap().iter().any(|b| b["healthy"] == false)
        }
    };
    let t = std::time::Instant::now();
    while !ejected().await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b1 was never ejected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let who = served_by(6).await;
    assert_eq!(who.get("b0"), Some(&6), "{who:?}");
    // Healthy again: readmitted after its back-off, and served again.
    bs[1].stats.failing_health.store(false, SeqCst);
    let t = std::time::Instant::now();
    while ejected().await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b1 was never readmitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served_by(4).await.len(), 2);
    // The sweep that ejected b1 checked b0 first, and kept it.
    assert!(bs[0].stats.health_checks.load(SeqCst) >= 1);
}
