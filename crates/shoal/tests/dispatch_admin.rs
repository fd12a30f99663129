//! The dispatcher's admin listener refuses what a web page could send
//! (finding 3 of the trust review) and bounds what one call may ask for
//! (finding 8), through the real `shoal dispatch`.

mod dispatch_common;

use bytes::Bytes;
use dispatch_common::*;
use http_body_util::Full;
use hyper::Request;

fn req(
    method: &str,
    url: String,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut r = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(body.into())).unwrap()
}

/// Finding 3: without --admin-token-file, a cross-site form post (POST,
/// text/plain or form-encoded, with an Origin) re-pointed all traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_take_only_put_json_and_refuse_browser_requests() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let d = Dispatcher::start(&[&a], &[]);
    let c = Client::new();
    let list = serde_json::json!([{"addr": b.spec()}]).to_string();
    let url = || format!("{}/backends", d.admin);
    let json = ("content-type", "application/json");
    let cases: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
        // What an HTML form can send: POST with a form or text/plain body.
        (
            req(
                "POST",
                url(),
                &[("content-type", "text/plain")],
                list.clone(),
            ),
            405,
            "takes PUT",
        ),
        (req("POST", url(), &[json], list.clone()), 405, "takes PUT"),
        (
            req(
                "PUT",
                url(),
                &[("content-type", "application/x-www-form-urlencoded")],
                list.clone(),
            ),
            415,
            "Content-Type: application/json",
        ),
        (
            req("PUT", url(), &[], list.clone()),
            415,
            "application/json",
        ),
        // A page's fetch: it carries Origin and Sec-Fetch-Site.
        (
            req(
                "PUT",
                url(),
                &[json, ("origin", "http://evil.example")],
                list.clone(),
            ),
            403,
            "Origin",
        ),
        (
            req(
                "PUT",
                url(),
                &[json, ("sec-fetch-site", "cross-site")],
                list.clone(),
            ),
            403,
            "Sec-Fetch-Site",
        ),
        // Bodies are bounded: 300 KiB of backends is refused as too large.
        (
            req("PUT", url(), &[json], vec![b' '; 300 << 10]),
            413,
            "larger than",
        ),
    ];
    for (r, code, why) in cases {
        let what = format!("{} {:?}", r.method(), r.headers());
        let got = c.send(r).await.unwrap();
        let body = String::from_utf8_lossy(&got.body).into_owned();
        assert_eq!(got.status.as_u16(), code, "{what}: {body}");
        assert!(body.contains(why), "{what}: {body}");
    }
    // Nothing of that changed the list: traffic still goes to a.
    let r = c.get(&format!("{}/x", d.url)).await.unwrap();
    assert_eq!(r.backend, "a");
    // The plain PUT with JSON does, as before.
    let r = c.send(req("PUT", url(), &[json], list)).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c.get(&format!("{}/x", d.url)).await.unwrap();
    assert_eq!(r.backend, "b");
}

/// Finding 8: `POST /route` turned 1 MB of request into 20.7 MB of answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_explanations_are_capped_per_call() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &[]);
    let c = Client::new();
    let url = format!("{}/route", d.admin);
    let json = ("content-type", "application/json");
    // 1 MB of short URLs: refused before any is explained.
    let many: Vec<String> = (0..100_000).map(|i| format!("/{i}")).collect();
    let body = serde_json::to_vec(&many).unwrap();
    assert!(body.len() > 600_000);
    let r = c
        .send(req("POST", url.clone(), &[json], body))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{:?}", r.body);
    // Under the byte limit but over the URL cap: refused, naming the cap.
    let over: Vec<String> = (0..1000).map(|i| format!("/{i}")).collect();
    let r = c
        .send(req(
            "POST",
            url.clone(),
            &[json],
            serde_json::to_vec(&over).unwrap(),
        ))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 413, "{text}");
    assert!(text.contains("at most 256"), "{text}");
    // Within the cap it answers as before; a form post does not reach it.
    let ok: Vec<String> = (0..256).map(|i| format!("/{i}")).collect();
    let r = c
        .send(req(
            "POST",
            url.clone(),
            &[json],
            serde_json::to_vec(&ok).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 256);
    let r = c
        .send(req(
            "POST",
            url,
            &[("content-type", "text/plain")],
            "[\"/x\"]",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 415);
}
