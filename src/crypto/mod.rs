//! The one home for hashing, HMAC, constant-time comparison and randomness.
//!
//! Everything here is a thin, tested wrapper over the RustCrypto crates, so the
//! rest of the crate never touches `sha2`, `hmac`, `subtle` or `rand` directly.
//! Randomness comes only from [`OsRng`].

pub mod credential;
pub mod seal;

use hmac::digest::generic_array::GenericArray;
use hmac::digest::typenum::U64;
use hmac::digest::KeyInit;
use hmac::Mac;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<Sha256>;

/// SHA-256 block size in bytes (the HMAC key block).
const SHA256_BLOCK: usize = 64;

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256_hex_buf(data).as_str().to_owned()
}

/// SHA-256 of no bytes: what a body-less signed request (any GET) hashes for its
/// canonical string, given without running the compression function (a few thousand
/// instructions per signed GET).
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Lower-case hex of a 32-byte digest, through a stack buffer: `hex::encode` builds
/// its string one `char` at a time, which showed in the API-key path's profile.
fn digest_hex(digest: &[u8; 32]) -> String {
    HexDigest::of(digest).as_str().to_owned()
}

/// Lower-case hex of a SHA-256 digest, on the stack.
pub struct HexDigest([u8; 64]);

impl HexDigest {
    fn of(digest: &[u8; 32]) -> Self {
        let mut out = [0u8; 64];
        // Cannot fail: the buffer is exactly twice the digest's length.
        let _ = hex::encode_to_slice(digest, &mut out);
        HexDigest(out)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only, so always valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// [`sha256_hex`] without an allocation.
pub fn sha256_hex_buf(data: &[u8]) -> HexDigest {
    if data.is_empty() {
        return HexDigest::of(&EMPTY_SHA256);
    }
    HexDigest::of(&Sha256::digest(data).into())
}

/// Raw SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA256 of `msg` under `key` (any key length, as RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    hmac_sha256_parts(key, &[msg])
}

/// HMAC-SHA256 over the concatenation of `parts`, without copying them together.
pub fn hmac_sha256_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = new_hmac(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Lower-case hex HMAC-SHA256 of `msg` under `key`.
pub fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    digest_hex(&hmac_sha256(key, msg))
}

/// Builds the HMAC state infallibly.
///
/// `Hmac::new_from_slice` never fails but is typed `Result`. RFC 2104 defines the key
/// block as the key zero-padded to the block size (or its hash, when longer than a
/// block), which is exactly what this builds, so `KeyInit::new` on the full block is
/// the same MAC without an unreachable error path. RFC 4231 cases 6 and 7 cover the
/// long-key branch in the tests below.
fn new_hmac(key: &[u8]) -> HmacSha256 {
    let mut block = Zeroizing::new([0u8; SHA256_BLOCK]);
    if key.len() > SHA256_BLOCK {
        let digest = Zeroizing::new(sha256(key));
        for (dst, src) in block.iter_mut().zip(digest.iter()) {
            *dst = *src;
        }
    } else {
        for (dst, src) in block.iter_mut().zip(key.iter()) {
            *dst = *src;
        }
    }
    let key_block: &GenericArray<u8, U64> = (&*block).into();
    <HmacSha256 as KeyInit>::new(key_block)
}

/// Constant-time equality. Slices of different lengths compare unequal (the length
/// itself is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// `N` bytes from the operating system's CSPRNG.
///
/// Panics only if the OS random source itself fails, which `rand` treats as fatal.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    OsRng.fill_bytes(&mut out);
    out
}

/// A uniformly random string of `len` characters from `0-9A-Za-z`.
///
/// The result is a plain `String` (not zeroized); credentials are minted through the
/// types in [`credential`], which build their text in place.
pub fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    push_random_base62(&mut out, len);
    out
}

/// Appends `len` uniformly random base62 characters to `out`.
///
/// Rejection sampling: a byte is used only when it is below 248 (= 4 × 62), so every
/// digit is equally likely. The random buffer is zeroized after use.
pub(crate) fn push_random_base62(out: &mut String, len: usize) {
    const ACCEPT_BELOW: u8 = 248;
    let mut buf = Zeroizing::new([0u8; 64]);
    let mut written = 0;
    while written < len {
        OsRng.fill_bytes(&mut *buf);
        for &b in buf.iter() {
            if written == len {
                break;
            }
            if b < ACCEPT_BELOW {
                out.push(base62_digit(b % 62));
                written += 1;
            }
        }
    }
}

/// The base62 digit for `value` (0..=61): digits, then upper case, then lower case.
fn base62_digit(value: u8) -> char {
    let byte = match value {
        0..=9 => b'0' + value,
        10..=35 => b'A' + (value - 10),
        _ => b'a' + (value.min(61) - 36),
    };
    char::from(byte)
}

/// True when `c` belongs to the base62 alphabet `0-9A-Za-z`.
pub fn is_base62(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_digest_is_sha256_of_nothing() {
        let computed: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(EMPTY_SHA256, computed);
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(sha256_hex_buf(b"abc").as_str(), sha256_hex(b"abc"));
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex::encode(sha256(b"abc")), sha256_hex(b"abc"));
    }

    #[test]
    fn hmac_rfc4231_case_1() {
        let key = [0x0bu8; 20];
        assert_eq!(
            hmac_sha256_hex(&key, b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn hmac_rfc4231_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_rfc4231_case_6_long_key() {
        let key = [0xaau8; 131];
        assert_eq!(
            hmac_sha256_hex(
                &key,
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn hmac_rfc4231_case_7_long_key_long_data() {
        let key = [0xaau8; 131];
        let msg: &[u8] = b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.";
        assert_eq!(
            hmac_sha256_hex(&key, msg),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn hmac_block_sized_and_empty_keys_match_the_hmac_crate() {
        for key in [
            &[][..],
            &[0x42u8; 64][..],
            &[0x42u8; 65][..],
            &[7u8; 63][..],
        ] {
            let mut reference = <HmacSha256 as Mac>::new_from_slice(key).unwrap();
            reference.update(b"message");
            let expected: [u8; 32] = reference.finalize().into_bytes().into();
            assert_eq!(hmac_sha256(key, b"message"), expected);
        }
    }

    #[test]
    fn hmac_parts_equals_concatenation() {
        let key = b"k";
        assert_eq!(
            hmac_sha256_parts(key, &[b"ab", b".", b"", b"cd"]),
            hmac_sha256(key, b"ab.cd")
        );
    }

    #[test]
    fn ct_eq_behaviour() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"", b"a"));
    }

    #[test]
    fn random_bytes_differ() {
        let a = random_bytes::<32>();
        let b = random_bytes::<32>();
        assert_ne!(a, b);
        assert_eq!(random_bytes::<0>().len(), 0);
    }

    #[test]
    fn base62_digits_cover_the_alphabet_in_order() {
        let all: String = (0..62).map(base62_digit).collect();
        assert_eq!(
            all,
            "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        );
    }

    #[test]
    fn random_base62_length_and_alphabet() {
        for len in [0, 1, 43, 64, 65, 200] {
            let s = random_base62(len);
            assert_eq!(s.len(), len);
            assert!(s.bytes().all(is_base62));
        }
        assert_ne!(random_base62(32), random_base62(32));
    }

    #[test]
    fn random_base62_is_roughly_uniform() {
        // 62 000 draws: each digit expects 1000; a biased sampler (e.g. `byte % 62`
        // without rejection) gives the first 8 digits ~1.2x. Bounds are > 6 sigma wide.
        let s = random_base62(62_000);
        let mut counts = [0u32; 256];
        for b in s.bytes() {
            counts[usize::from(b)] += 1;
        }
        for b in s.bytes() {
            let c = counts[usize::from(b)];
            assert!(
                (800..=1200).contains(&c),
                "digit {} seen {c} times",
                char::from(b)
            );
        }
        assert_eq!(counts.iter().filter(|&&c| c > 0).count(), 62);
    }
}
