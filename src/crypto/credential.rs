//! Credential formats (docs/design.md §3): HMAC secrets, API keys and webhook secrets.
//!
//! Each credential is a newtype over [`SecretString`] (zeroized on drop) with no
//! `Display`/`Serialize` and a `Debug` that prints at most the public prefix. The only
//! constructors are `generate()` and `parse()`; `parse()` rejects malformed input
//! (prefix, then length, then alphabet, then checksum) before any other work, so a
//! caller can run it before touching the database.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use zeroize::Zeroizing;

use super::{ct_eq, is_base62, push_random_base62, random_bytes, sha256_hex};

// Changing any prefix invalidates every credential already issued: `parse()` would
// reject them all. Add a new prefix alongside instead.
/// Prefix of an HMAC request-signing secret.
pub const HMAC_SECRET_PREFIX: &str = "coh_";
/// Prefix of an API key.
pub const API_KEY_PREFIX: &str = "cok_";
/// Prefix of a Standard Webhooks secret.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

/// Length of the base62 CRC-32 checksum suffix.
pub const CHECKSUM_LEN: usize = 6;
/// Random base62 characters in an HMAC secret.
const HMAC_SECRET_BODY_LEN: usize = 43;
/// Random base62 characters in an API key.
const API_KEY_BODY_LEN: usize = 32;
/// Total length of an HMAC secret: `coh_` + 43 + 6.
pub const HMAC_SECRET_LEN: usize = 53;
/// Total length of an API key: `cok_` + 32 + 6.
pub const API_KEY_LEN: usize = 42;
/// Characters of an API key kept as its public display prefix (`cok_` + 4).
pub const API_KEY_DISPLAY_PREFIX_LEN: usize = 8;
/// Random bytes in a generated webhook secret.
const WEBHOOK_SECRET_GENERATED_BYTES: usize = 32;
/// Decoded webhook key sizes accepted by `parse` (other Standard Webhooks tooling
/// issues 24-byte keys, for example).
const WEBHOOK_KEY_MIN_BYTES: usize = 16;
const WEBHOOK_KEY_MAX_BYTES: usize = 64;

/// Why a credential string was rejected. Deliberately coarse: the message never
/// echoes the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum CredentialError {
    #[error("malformed credential: wrong prefix")]
    WrongPrefix,
    #[error("malformed credential: wrong length")]
    WrongLength,
    #[error("malformed credential: bad character")]
    BadCharacter,
    #[error("malformed credential: bad checksum")]
    BadChecksum,
    #[error("malformed credential: bad encoding")]
    BadEncoding,
}

/// CRC-32 (IEEE, as zlib's `crc32`) of the UTF-8 bytes of `text`, as an unsigned
/// integer in base62 (`0-9A-Za-z`), most significant digit first, left-padded with `0`
/// to 6 characters. `u32::MAX` is `4gfFC3`, so 6 digits always suffice.
pub fn checksum(text: &str) -> String {
    checksum_digits(text)
        .iter()
        .map(|&b| char::from(b))
        .collect()
}

/// `checksum` in a stack buffer (no allocation on the verification path).
fn checksum_digits(text: &str) -> [u8; CHECKSUM_LEN] {
    // The `base62` crate's standard alphabet is `0-9A-Z a-z` (digits, upper, lower),
    // which is the docs/design.md §3 order; a unit test pins it with known answers.
    let mut digits = [b'0'; CHECKSUM_LEN];
    // Six digits hold any u32, so this cannot fail; `0` would leave "000000".
    let n = base62::encode_bytes(crc32fast::hash(text.as_bytes()), &mut digits).unwrap_or(0);
    // The digits were written at the front: move them right and pad with '0'.
    let pad = CHECKSUM_LEN.saturating_sub(n);
    digits.rotate_right(pad);
    digits.iter_mut().take(pad).for_each(|d| *d = b'0');
    digits
}

/// `prefix` + `body_len` random base62 + checksum, built in one exact-size buffer so
/// no unzeroized copy is left behind by reallocation.
fn generate_checked(prefix: &str, body_len: usize) -> SecretString {
    let mut text = String::with_capacity(prefix.len() + body_len + CHECKSUM_LEN);
    text.push_str(prefix);
    push_random_base62(&mut text, body_len);
    let sum = checksum(&text);
    text.push_str(&sum);
    SecretString::from(text)
}

/// Prefix, exact length, alphabet, checksum — in that order.
fn validate_checked(text: &str, prefix: &str, body_len: usize) -> Result<(), CredentialError> {
    let rest = text
        .strip_prefix(prefix)
        .ok_or(CredentialError::WrongPrefix)?;
    if rest.len() != body_len + CHECKSUM_LEN {
        return Err(CredentialError::WrongLength);
    }
    if !rest.bytes().all(is_base62) {
        return Err(CredentialError::BadCharacter);
    }
    // All ASCII from here, so the split is on a char boundary.
    let (signed, sum) = text
        .split_at_checked(prefix.len() + body_len)
        .ok_or(CredentialError::WrongLength)?;
    if !ct_eq(&checksum_digits(signed), sum.as_bytes()) {
        return Err(CredentialError::BadChecksum);
    }
    Ok(())
}

/// An HMAC request-signing secret: `coh_` + 43 base62 + 6 base62 checksum.
pub struct HmacSecret(SecretString);

impl HmacSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        Self(generate_checked(HMAC_SECRET_PREFIX, HMAC_SECRET_BODY_LEN))
    }

    /// Validates `text` (prefix, length, alphabet, checksum) and wraps it.
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        validate_checked(text, HMAC_SECRET_PREFIX, HMAC_SECRET_BODY_LEN)?;
        Ok(Self(SecretString::from(text)))
    }

    /// The whole secret string (the HMAC key is its UTF-8 bytes).
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for HmacSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HmacSecret({HMAC_SECRET_PREFIX}…)")
    }
}

/// An API key: `cok_` + 32 base62 + 6 base62 checksum. Stored only as its hash.
pub struct ApiKey(SecretString);

impl ApiKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(generate_checked(API_KEY_PREFIX, API_KEY_BODY_LEN))
    }

    /// Validates `text` (prefix, length, alphabet, checksum) and wraps it.
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        Self::validate(text)?;
        Ok(Self(SecretString::from(text)))
    }

    /// The checks of [`ApiKey::parse`] (prefix, length, alphabet, checksum), without
    /// keeping a copy of the key.
    pub fn validate(text: &str) -> Result<(), CredentialError> {
        validate_checked(text, API_KEY_PREFIX, API_KEY_BODY_LEN)
    }

    /// The whole key string.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// Lower-case hex SHA-256 of the whole key string: the stored form.
    pub fn hash(&self) -> ApiKeyHash {
        ApiKeyHash(sha256_hex(self.expose_secret().as_bytes()))
    }

    /// The first 8 characters (`cok_` + 4), safe to store and show.
    pub fn display_prefix(&self) -> String {
        self.expose_secret()
            .chars()
            .take(API_KEY_DISPLAY_PREFIX_LEN)
            .collect()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.display_prefix())
    }
}

/// Lower-case hex SHA-256 of an API key, as stored in the database.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKeyHash(String);

impl ApiKeyHash {
    /// Wraps a hash read back from the database.
    pub fn from_hex_db(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short: String = self.0.chars().take(8).collect();
        write!(f, "ApiKeyHash({short}…)")
    }
}

/// A Standard Webhooks secret: `whsec_` + standard base64 (with padding) of the key.
pub struct WebhookSecret {
    text: SecretString,
    key: SecretSlice<u8>,
}

impl WebhookSecret {
    /// A fresh secret over 32 random bytes (44 base64 characters).
    pub fn generate() -> Self {
        let key = Zeroizing::new(random_bytes::<WEBHOOK_SECRET_GENERATED_BYTES>());
        let encoded_len = WEBHOOK_SECRET_GENERATED_BYTES.div_ceil(3) * 4;
        let mut text = String::with_capacity(WEBHOOK_SECRET_PREFIX.len() + encoded_len);
        text.push_str(WEBHOOK_SECRET_PREFIX);
        STANDARD.encode_string(key.as_slice(), &mut text);
        Self {
            text: SecretString::from(text),
            key: SecretSlice::from(key.to_vec()),
        }
    }

    /// Validates `text` and decodes its key. Accepts decoded keys of 16..=64 bytes so
    /// secrets issued by other Standard Webhooks tooling work.
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        let body = text
            .strip_prefix(WEBHOOK_SECRET_PREFIX)
            .ok_or(CredentialError::WrongPrefix)?;
        let min = WEBHOOK_KEY_MIN_BYTES.div_ceil(3) * 4;
        let max = WEBHOOK_KEY_MAX_BYTES.div_ceil(3) * 4;
        if body.len() % 4 != 0 || !(min..=max).contains(&body.len()) {
            return Err(CredentialError::WrongLength);
        }
        let unpadded = body.trim_end_matches('=');
        let padding = body.len() - unpadded.len();
        let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
        if padding > 2 || !unpadded.bytes().all(is_b64) {
            return Err(CredentialError::BadCharacter);
        }
        let mut key = Zeroizing::new(Vec::with_capacity(body.len()));
        // The decode error names the offending byte: part of the secret, so dropped.
        if STANDARD.decode_vec(body, &mut key).is_err() {
            return Err(CredentialError::BadEncoding);
        }
        if !(WEBHOOK_KEY_MIN_BYTES..=WEBHOOK_KEY_MAX_BYTES).contains(&key.len()) {
            return Err(CredentialError::WrongLength);
        }
        Ok(Self {
            text: SecretString::from(text),
            key: SecretSlice::from(key.to_vec()),
        })
    }

    /// The whole secret string, `whsec_…`.
    pub fn expose_secret(&self) -> &str {
        self.text.expose_secret()
    }

    /// The HMAC key: the base64-decoded bytes after `whsec_`.
    pub fn key_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.key.expose_secret().to_vec())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({WEBHOOK_SECRET_PREFIX}…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

    // Expected values computed independently with Python:
    // zlib.crc32(s) then a hand-written base62 conversion, zero-padded to 6.
    #[test]
    fn checksum_known_answers() {
        assert_eq!(checksum(""), "000000");
        assert_eq!(checksum("coh_"), "0XgwZ4"); // 497853990
        assert_eq!(checksum("cok_"), "0zt5mP"); // 914486757
        assert_eq!(
            checksum("The quick brown fox jumps over the lazy dog"),
            "1C9bYH" // 1095738169 = 0x414fa339
        );
        assert_eq!(checksum("cok_00000000000000000000000000000000"), "2QgJwP");
        assert_eq!(
            checksum("coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg"),
            "1rvF0S"
        );
    }

    #[test]
    fn base62_crate_alphabet_is_digits_upper_lower() {
        assert_eq!(base62::encode(61u32), "z");
        assert_eq!(base62::encode(35u32), "Z");
        assert_eq!(base62::encode(10u32), "A");
        assert_eq!(base62::encode(62u32), "10");
        assert_eq!(base62::encode(u32::MAX), "4gfFC3");
    }

    #[test]
    fn known_credentials_parse() {
        let key = ApiKey::parse("cok_000000000000000000000000000000002QgJwP").unwrap();
        assert_eq!(key.display_prefix(), "cok_0000");
        let secret =
            HmacSecret::parse("coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S").unwrap();
        assert_eq!(secret.expose_secret().len(), HMAC_SECRET_LEN);
    }

    #[test]
    fn hmac_secret_round_trip() {
        let s = HmacSecret::generate();
        assert_eq!(s.expose_secret().len(), HMAC_SECRET_LEN);
        assert!(s.expose_secret().starts_with(HMAC_SECRET_PREFIX));
        let again = HmacSecret::parse(s.expose_secret()).unwrap();
        assert_eq!(again.expose_secret(), s.expose_secret());
        assert_ne!(HmacSecret::generate().expose_secret(), s.expose_secret());
    }

    #[test]
    fn api_key_round_trip_hash_and_prefix() {
        let k = ApiKey::generate();
        assert_eq!(k.expose_secret().len(), API_KEY_LEN);
        let again = ApiKey::parse(k.expose_secret()).unwrap();
        assert_eq!(again.hash(), k.hash());
        assert_eq!(k.hash().as_str(), sha256_hex(k.expose_secret().as_bytes()));
        assert_eq!(k.hash().as_str().len(), 64);
        assert_eq!(k.display_prefix(), k.expose_secret()[..8]);
        let stored = ApiKeyHash::from_hex_db(k.hash().into_string());
        assert_eq!(stored, k.hash());
    }

    #[test]
    fn webhook_secret_round_trip() {
        let w = WebhookSecret::generate();
        assert_eq!(w.expose_secret().len(), WEBHOOK_SECRET_PREFIX.len() + 44);
        assert_eq!(w.key_bytes().len(), 32);
        let again = WebhookSecret::parse(w.expose_secret()).unwrap();
        assert_eq!(*again.key_bytes(), *w.key_bytes());
        assert_eq!(
            STANDARD.encode(&*w.key_bytes()),
            w.expose_secret()[WEBHOOK_SECRET_PREFIX.len()..]
        );
    }

    #[test]
    fn webhook_secret_from_standard_webhooks_tooling() {
        let w = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(w.key_bytes().len(), 24);
    }

    #[test]
    fn webhook_secret_rejections() {
        use CredentialError::*;
        let ok = STANDARD.encode([7u8; 32]);
        assert_eq!(
            WebhookSecret::parse(&format!("whsek_{ok}")).unwrap_err(),
            WrongPrefix
        );
        assert_eq!(WebhookSecret::parse(&ok).unwrap_err(), WrongPrefix);
        let short = STANDARD.encode([7u8; 15]); // 20 chars
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{short}")).unwrap_err(),
            WrongLength
        );
        let unpadded = ok.trim_end_matches('=');
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{unpadded}")).unwrap_err(),
            WrongLength
        );
        let long = STANDARD.encode([7u8; 66]); // 88 chars, decodes to 66 bytes
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{long}")).unwrap_err(),
            WrongLength
        );
        let bad_char = format!("whsec_{}-{}", &ok[..10], &ok[11..]);
        assert_eq!(WebhookSecret::parse(&bad_char).unwrap_err(), BadCharacter);
        let inner_pad = format!("whsec_{}={}", &ok[..10], &ok[11..]);
        assert_eq!(WebhookSecret::parse(&inner_pad).unwrap_err(), BadCharacter);
        // 32 bytes end in one padding char; the last data char carries 2 unused bits.
        // "A" → "B" sets one of them: non-canonical, rejected.
        let canonical = STANDARD.encode([0u8; 32]);
        assert!(canonical.ends_with("A="));
        let non_canonical = format!("whsec_{}B=", &canonical[..canonical.len() - 2]);
        assert_eq!(
            WebhookSecret::parse(&non_canonical).unwrap_err(),
            BadEncoding
        );
        assert!(WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 16]))).is_ok());
        assert!(WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 64]))).is_ok());
    }

    fn single_char_changes_all_fail(text: &str, parse: fn(&str) -> bool) {
        let replacements: Vec<char> = BASE62.chars().chain(['_', '-', ' ', 'é']).collect();
        for (i, original) in text.char_indices() {
            for &r in &replacements {
                if r == original {
                    continue;
                }
                let mut changed = String::with_capacity(text.len() + 1);
                changed.push_str(&text[..i]);
                changed.push(r);
                changed.push_str(&text[i + original.len_utf8()..]);
                assert!(!parse(&changed), "change at {i} to {r:?} was accepted");
            }
        }
    }

    #[test]
    fn every_single_character_change_fails() {
        let k = ApiKey::generate();
        single_char_changes_all_fail(k.expose_secret(), |t| ApiKey::parse(t).is_ok());
        let s = HmacSecret::generate();
        single_char_changes_all_fail(s.expose_secret(), |t| HmacSecret::parse(t).is_ok());
    }

    #[test]
    fn api_key_rejections_in_order() {
        use CredentialError::*;
        let good = ApiKey::generate();
        let good = good.expose_secret();
        assert_eq!(
            ApiKey::parse(&good.replacen("cok_", "coh_", 1)).unwrap_err(),
            WrongPrefix
        );
        assert_eq!(ApiKey::parse("").unwrap_err(), WrongPrefix);
        assert_eq!(ApiKey::parse(&good[..41]).unwrap_err(), WrongLength);
        assert_eq!(ApiKey::parse(&format!("{good}0")).unwrap_err(), WrongLength);
        let bad_char = format!("{}_{}", &good[..10], &good[11..]);
        assert_eq!(ApiKey::parse(&bad_char).unwrap_err(), BadCharacter);
        // Multi-byte character at the right byte length: alphabet, not a panic.
        let non_ascii = format!("{}é{}", &good[..10], &good[12..]);
        assert_eq!(non_ascii.len(), API_KEY_LEN);
        assert_eq!(ApiKey::parse(&non_ascii).unwrap_err(), BadCharacter);
        let wrong_sum = if good.ends_with('0') { "1" } else { "0" };
        let bad_sum = format!("{}{wrong_sum}", &good[..API_KEY_LEN - 1]);
        assert_eq!(ApiKey::parse(&bad_sum).unwrap_err(), BadChecksum);
        // Order: prefix before length, length before alphabet, alphabet before checksum.
        assert_eq!(ApiKey::parse("coh_!").unwrap_err(), WrongPrefix);
        assert_eq!(ApiKey::parse("cok_!").unwrap_err(), WrongLength);
        assert_eq!(
            ApiKey::parse(&format!("{}!", &good[..41])).unwrap_err(),
            BadCharacter
        );
    }

    #[test]
    fn hmac_secret_rejections() {
        use CredentialError::*;
        let good = HmacSecret::generate();
        let good = good.expose_secret();
        assert_eq!(
            HmacSecret::parse(&good.replacen("coh_", "cok_", 1)).unwrap_err(),
            WrongPrefix
        );
        assert_eq!(HmacSecret::parse(&good[..52]).unwrap_err(), WrongLength);
        assert_eq!(
            HmacSecret::parse(&format!("{good}a")).unwrap_err(),
            WrongLength
        );
        let bad_char = format!("{}+{}", &good[..20], &good[21..]);
        assert_eq!(HmacSecret::parse(&bad_char).unwrap_err(), BadCharacter);
        let mut swapped: Vec<u8> = good.as_bytes().to_vec();
        swapped.swap(5, 6);
        let swapped = String::from_utf8(swapped).unwrap();
        if swapped != good {
            assert_eq!(HmacSecret::parse(&swapped).unwrap_err(), BadChecksum);
        }
        // An API key is not an HMAC secret, and vice versa.
        assert!(HmacSecret::parse(ApiKey::generate().expose_secret()).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret_body() {
        let k = ApiKey::generate();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, format!("ApiKey({}…)", k.display_prefix()));
        assert!(!dbg.contains(&k.expose_secret()[8..]));

        let s = HmacSecret::generate();
        let dbg = format!("{s:?} {s:#?}");
        assert!(!dbg.contains(&s.expose_secret()[4..12]));
        assert_eq!(format!("{s:?}"), "HmacSecret(coh_…)");

        let w = WebhookSecret::generate();
        let dbg = format!("{w:?} {w:#?}");
        assert!(!dbg.contains(&w.expose_secret()[6..14]));
        assert_eq!(format!("{w:?}"), "WebhookSecret(whsec_…)");

        let h = k.hash();
        assert_eq!(
            format!("{h:?}"),
            format!("ApiKeyHash({}…)", &h.as_str()[..8])
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            CredentialError::WrongPrefix.to_string(),
            "malformed credential: wrong prefix"
        );
        assert_eq!(
            CredentialError::BadChecksum.to_string(),
            "malformed credential: bad checksum"
        );
    }
}
