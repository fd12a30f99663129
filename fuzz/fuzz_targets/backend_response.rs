//! What a backend sends back: the response head parser and the chunked
//! decoder of the dispatcher's backend side, fed arbitrary bytes in
//! arbitrary pieces. Nothing a backend sends may panic the process, and
//! the decoder never yields more than it was given, nor anything after
//! the trailer fields.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shoal_dispatch::h1::{Chunked, Framing, Step, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let head_request = ctl & 1 == 1;
    let upgrade = ctl & 2 == 2;
    let piece = 1 + (ctl >> 2) as usize;
    let mut buf = BytesMut::new();
    let mut input = rest;
    // The head, fed piece by piece as reads would.
    let head = loop {
        match parse_head(&mut buf, head_request, upgrade) {
            Ok(Some(h)) => break h,
            Ok(None) if !input.is_empty() => {
                let n = piece.min(input.len());
                buf.extend_from_slice(&input[..n]);
                input = &input[n..];
            }
            Ok(None) | Err(_) => return,
        }
    };
    if head.framing != Framing::Chunked {
        return;
    }
    let offered = buf.len() + input.len();
    let mut dec = Chunked::default();
    let mut out = 0usize;
    loop {
        match dec.step(&mut buf) {
            Ok(Step::Data(d)) => out += d.len(),
            // At most one trailer section, then the end.
            Ok(Step::Trailers(t)) => {
                assert!(!t.is_empty());
                assert_eq!(dec.step(&mut buf).ok(), Some(Step::Done));
                break;
            }
            Ok(Step::More) if !input.is_empty() => {
                let n = piece.min(input.len());
                buf.extend_from_slice(&input[..n]);
                input = &input[n..];
            }
            Ok(Step::More) | Ok(Step::Done) | Err(_) => break,
        }
    }
    assert!(out <= offered);
});
