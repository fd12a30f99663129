//! The edge of the cluster: what a stranger can send before it holds a
//! certificate. A join (token parsing, the token and name decisions of
//! shoal-core, the certificate request) and a discovery probe (the pure
//! responder with its replay guard). None may panic; a probe is answered
//! at most once per nonce, and never without the key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_core::trust::{NameHolder, ProbeGuard, admit_join, admit_name};
use shoal_net::discovery::answer_probe;
use shoal_net::identity::Token;
use shoal_net::wire::JoinRequest;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let now = 1_000_000_000_000u64 + u64::from(ctl) * 1000;
    // Join: the body as the manager decodes it, then its decisions.
    if let Ok(req) = shoal_manager::api::decode::<JoinRequest>(rest) {
        let known = Token::generate([7; 32]);
        let mut tokens = vec![known.record(now - 1, Some(10_000), Some(u32::from(ctl % 3)), vec![])];
        if let Ok(t) = Token::parse(&req.token) {
            let _ = admit_join(&mut tokens, &t.secret_hash(), &req.roles, now);
        }
        let _ = admit_join(&mut tokens, &known.secret_hash(), &req.roles, now);
        let holder = NameHolder {
            alive: ctl & 1 == 1,
            bound_key: (ctl & 2 == 2).then_some(req.name.as_str()),
        };
        let _ = admit_name(&req.name, &holder, &req.csr_pem);
        let _ = shoal_net::identity::validate_node_name(&req.name);
    }
    // Discovery: any datagram, twice; the key is the one a real token has.
    let key = [ctl; 32];
    let key_for = |id: &str| (id.len() == 16).then_some(key);
    let url = || "https://127.0.0.1:7400".to_string();
    let mut guard = ProbeGuard::new(30_000, 8);
    let first = answer_probe(rest, now, &mut guard, &key_for, &url);
    let again = answer_probe(rest, now, &mut guard, &key_for, &url);
    assert!(first.is_none() || again.is_none(), "a probe was answered twice");
    // A probe made with the key is answered once (the guard holds 8
    // nonces; the fuzzed datagram took one at most).
    let (probe, _) = shoal_net::discovery::make_probe("0123456789abcdef", &key, now);
    assert!(answer_probe(&probe, now, &mut guard, &key_for, &url).is_some());
    assert!(answer_probe(&probe, now, &mut guard, &key_for, &url).is_none());
});
