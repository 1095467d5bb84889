//! Credential formats: `coh_` HMAC secrets, `cok_` API keys, `whsec_` webhook secrets.
//!
//! The input is the candidate string (UTF-8 only). Besides parsing it as-is, the target
//! appends the correct checksum to it, so the success path is reached without the
//! fuzzer having to guess a CRC-32.
#![no_main]

use coordinator::crypto::credential::{
    checksum, ApiKey, CredentialError, HmacSecret, WebhookSecret, API_KEY_LEN, API_KEY_PREFIX,
    CHECKSUM_LEN, HMAC_SECRET_LEN, HMAC_SECRET_PREFIX, WEBHOOK_SECRET_PREFIX,
};
use libfuzzer_sys::fuzz_target;

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn check_api_key(text: &str) -> Result<(), CredentialError> {
    let key = ApiKey::parse(text)?;
    assert_eq!(key.expose_secret(), text);
    assert_eq!(text.len(), API_KEY_LEN);
    let again = ApiKey::parse(key.expose_secret()).expect("checksum round trip (ApiKey)");
    assert_eq!(again.expose_secret(), text);
    let hash = key.hash();
    assert_eq!(hash.as_str().len(), 64, "hash {:?}", hash.as_str());
    assert!(hash
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert!(again.hash() == hash);
    let prefix = key.display_prefix();
    assert_eq!(prefix, text[..8]);
    let debug = format!("{key:?} {hash:?}");
    assert!(!debug.contains(&text[8..]), "Debug leaks the key: {debug}");
    Ok(())
}

fn check_hmac_secret(text: &str) -> Result<(), CredentialError> {
    let s = HmacSecret::parse(text)?;
    assert_eq!(s.expose_secret(), text);
    assert_eq!(text.len(), HMAC_SECRET_LEN);
    let again = HmacSecret::parse(s.expose_secret()).expect("checksum round trip (HmacSecret)");
    assert_eq!(again.expose_secret(), text);
    let debug = format!("{s:?}");
    assert!(!debug.contains(&text[HMAC_SECRET_PREFIX.len()..]));
    Ok(())
}

fn check_webhook_secret(text: &str) -> Result<(), CredentialError> {
    let w = WebhookSecret::parse(text)?;
    assert_eq!(w.expose_secret(), text);
    let key = w.key_bytes();
    assert!((16..=64).contains(&key.len()), "key of {} bytes", key.len());
    let again = WebhookSecret::parse(w.expose_secret()).expect("round trip (WebhookSecret)");
    assert_eq!(*again.key_bytes(), *key);
    let debug = format!("{w:?}");
    assert!(!debug.contains(&text[WEBHOOK_SECRET_PREFIX.len()..]));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    // As given.
    let _ = check_api_key(text);
    let _ = check_hmac_secret(text);
    let _ = check_webhook_secret(text);
    for p in [API_KEY_PREFIX, HMAC_SECRET_PREFIX, WEBHOOK_SECRET_PREFIX] {
        let _ = check_api_key(&format!("{p}{text}"));
        let _ = check_hmac_secret(&format!("{p}{text}"));
        let _ = check_webhook_secret(&format!("{p}{text}"));
    }

    // With the right checksum appended: accepted exactly when the body is the right
    // length of base62.
    let cs = checksum(text);
    assert_eq!(cs.len(), CHECKSUM_LEN);
    assert!(is_base62(&cs));
    for (prefix, body_len) in [(API_KEY_PREFIX, 32usize), (HMAC_SECRET_PREFIX, 43usize)] {
        let body = text.strip_prefix(prefix).unwrap_or(text);
        let signed = format!("{prefix}{body}");
        let full = format!("{signed}{}", checksum(&signed));
        let expect_ok = body.len() == body_len && is_base62(body);
        let got = if prefix == API_KEY_PREFIX {
            check_api_key(&full)
        } else {
            check_hmac_secret(&full)
        };
        assert_eq!(got.is_ok(), expect_ok, "{full:?}: {got:?}");
        // A wrong checksum never passes.
        if expect_ok {
            let mut bad = full.clone().into_bytes();
            let last = bad.len() - 1;
            bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
            let bad = String::from_utf8(bad).expect("ascii");
            let got = if prefix == API_KEY_PREFIX {
                check_api_key(&bad)
            } else {
                check_hmac_secret(&bad)
            };
            assert_eq!(got.err(), Some(CredentialError::BadChecksum), "{bad:?}");
        }
    }
});
