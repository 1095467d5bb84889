//! HMAC request-signature scheme: header syntax, canonical string, verification.
//!
//! Input layout: byte 0 is a presence mask (bit i set = header i present), the rest is
//! split on 0xFF (never valid in UTF-8) into fields, each read as lossy UTF-8:
//! caller, timestamp, signature, key-version, nonce, method, target, secret, body
//! (the body is the raw bytes after the 8th separator).
#![no_main]

use coordinator::auth::hmac::{
    self,
    wire::{parse_headers, timestamp_in_window, CanonicalRequest, SIGNATURE_HEX_LEN},
};
use libfuzzer_sys::fuzz_target;

const SEP: u8 = 0xFF;

fuzz_target!(|data: &[u8]| {
    let Some((&mask, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(9, |&b| b == SEP);
    let mut field = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let caller = field();
    let ts = field();
    let sig = field();
    let key_version = field();
    let nonce = field();
    let method = field();
    let target = field();
    let secret = field();
    let body: &[u8] = parts.next().unwrap_or_default();
    let opt =
        |bit: u8, s: &str| -> Option<String> { (mask & (1 << bit) != 0).then(|| s.to_owned()) };

    // 1. Header syntax: must never panic; what it accepts must meet its documented shape.
    let (c, t, s, k, n) = (
        opt(0, &caller),
        opt(1, &ts),
        opt(2, &sig),
        opt(3, &key_version),
        opt(4, &nonce),
    );
    let parsed = parse_headers(
        c.as_deref(),
        t.as_deref(),
        s.as_deref(),
        k.as_deref(),
        n.as_deref(),
    );
    match &parsed {
        Ok(h) => {
            assert!(
                hmac::wire::is_valid_caller_name(&h.caller),
                "accepted caller {:?}",
                h.caller
            );
            assert_eq!(h.caller, caller);
            assert_eq!(h.timestamp_raw, ts);
            assert!(
                h.timestamp >= 0 && h.timestamp <= 999_999_999_999,
                "timestamp {}",
                h.timestamp
            );
            assert_eq!(h.timestamp_raw.parse::<i64>().ok(), Some(h.timestamp));
            assert_eq!(h.signature.len(), SIGNATURE_HEX_LEN);
            assert!(h
                .signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert_eq!(h.signature, sig.to_ascii_lowercase());
            assert!(h.key_version.map_or(true, |v| v > 0));
            if let Some(nonce) = &h.nonce {
                assert!(!nonce.is_empty() && nonce.len() <= 64);
            }
            // The window check on whatever was accepted, against extreme clocks.
            for now in [0, h.timestamp, i64::MAX, i64::MIN] {
                let _ = timestamp_in_window(h.timestamp, now, 300);
            }
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }

    // 2. Canonical string from arbitrary parts.
    let req = CanonicalRequest::new(&method, &target, &caller, &ts, &nonce, body);
    let signed = req.to_signed_string();
    assert!(signed.starts_with("v1\n"));
    assert!(signed.ends_with(&req.body_sha256_hex));
    assert_eq!(req.body_sha256_hex.len(), 64);
    let joined: Vec<String> = req.components().into_iter().map(|(_, v)| v).collect();
    assert_eq!(joined.join("\n"), signed);
    assert_eq!(
        hmac::wire::canonical(&method, &target, &caller, &ts, &nonce, body),
        signed
    );

    // 3. Verification: arbitrary signature strings never panic; a real signature
    //    verifies in either case; a signature over other content does not.
    let _ = hmac::wire::verify(&secret, &signed, &sig);
    let good = hmac::wire::sign(&secret, &signed);
    assert_eq!(good.len(), SIGNATURE_HEX_LEN);
    assert!(hmac::wire::verify(&secret, &signed, &good));
    assert!(hmac::wire::verify(
        &secret,
        &signed,
        &good.to_ascii_uppercase()
    ));
    let other = format!("{signed}x");
    assert!(!hmac::wire::verify(&secret, &other, &good));
    if let Ok(h) = &parsed {
        assert_eq!(
            hmac::wire::verify(&secret, &signed, &h.signature),
            h.signature == good
        );
    }
    // Any ts/now/skew combination is overflow-free.
    let num = |s: &str| {
        s.bytes().fold(0i64, |acc, b| {
            acc.wrapping_mul(31).wrapping_add(i64::from(b))
        })
    };
    let _ = timestamp_in_window(num(&ts), num(&target), num(&method));
});
