//! Standard Webhooks headers and signature verification.
//!
//! Input layout: byte 0 is a presence mask (bits 0-2: id, timestamp, signature), the
//! rest is split on 0xFF into id, timestamp, signature (lossy UTF-8), key and body
//! (raw bytes; the body is everything after the 4th separator).
#![no_main]

use coordinator::auth::webhook::wire::{parse_headers, sign, verify};
use libfuzzer_sys::fuzz_target;

const SEP: u8 = 0xFF;

fuzz_target!(|data: &[u8]| {
    let Some((&mask, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(5, |&b| b == SEP);
    let mut text = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let id = text();
    let ts = text();
    let sig = text();
    let key: &[u8] = parts.next().unwrap_or_default();
    let body: &[u8] = parts.next().unwrap_or_default();
    let opt =
        |bit: u8, s: &str| -> Option<String> { (mask & (1 << bit) != 0).then(|| s.to_owned()) };

    let (i, t, s) = (opt(0, &id), opt(1, &ts), opt(2, &sig));
    match parse_headers(i.as_deref(), t.as_deref(), s.as_deref()) {
        Ok(h) => {
            assert_eq!(h.id, id);
            assert!(!h.id.is_empty() && h.id.len() <= 256);
            assert!(h.id.bytes().all(|b| b.is_ascii_graphic()));
            assert!(h.timestamp >= 0);
            assert_eq!(ts.parse::<i64>().ok(), Some(h.timestamp));
            assert!(!h.signatures.is_empty() && h.signatures.len() <= 20);
            let _ = verify(key, &h, &ts, body);

            // Our own signature, added to the list, always verifies; it does not
            // verify for a different body.
            let good = sign(key, &id, &ts, body);
            let list = format!("{good} {sig}");
            if let Ok(h2) = parse_headers(Some(&id), Some(&ts), Some(&list)) {
                assert!(
                    verify(key, &h2, &ts, body),
                    "own signature rejected: {list:?}"
                );
            }
            let only =
                parse_headers(Some(&id), Some(&ts), Some(&good)).expect("own signature parses");
            assert!(verify(key, &only, &ts, body));
            let mut other = body.to_vec();
            other.push(b'!');
            assert!(!verify(key, &only, &ts, &other));
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
