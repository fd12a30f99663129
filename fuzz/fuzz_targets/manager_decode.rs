//! Everything the manager decodes from a peer or a file: JSON bodies of
//! every endpoint, service definitions in TOML, join tokens. None may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_manager::api::decode;
use shoal_net::wire::*;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<JoinRequest>(data);
    let _ = decode::<Registration>(data);
    let _ = decode::<RenewRequest>(data);
    let _ = decode::<AssignRequest>(data);
    let _ = decode::<ServiceSpec>(data);
    let _ = decode::<DispatchReport>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = shoal_manager::services::parse_toml(text);
        let _ = shoal_net::identity::Token::parse(text);
        if let Ok(a) = decode::<AssignRequest>(data) {
            for app in &a.apps {
                let _ = check_params(&app.adaptor, &app.params);
            }
        }
    }
});
