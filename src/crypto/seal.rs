//! Sealing secrets at rest: AES-256-GCM under per-purpose HKDF subkeys (docs/design.md §3).
//!
//! - subkey = HKDF-SHA256(salt: none, ikm: master key, info: purpose string)
//! - nonce = 12 fresh bytes from the OS RNG per seal
//! - AAD = `purpose|caller|version`, so a ciphertext moved to another row fails to open
//! - each row records the master key id (first 8 hex of SHA-256 of the key), and `open`
//!   uses the current or previous master key with that id.

use std::fmt;

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{random_bytes, sha256_hex};

/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// Master key and subkey length in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a master key id (hex characters).
pub const KEY_ID_LEN: usize = 8;

/// Errors from sealing and opening. No variant carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed secret names an unknown master key id")]
    UnknownKeyId,
    #[error("sealed secret could not be opened")]
    Decrypt,
    #[error("master key must be 32 bytes of standard base64")]
    BadMasterKey,
    #[error("secret could not be sealed")]
    Encrypt,
}

/// What a sealed secret is for; each purpose gets its own subkey and AAD prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    HmacSecret,
    WebhookSecret,
    TokenSigning,
}

impl Purpose {
    /// The HKDF info string and AAD prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::HmacSecret => "hmac-secret",
            Purpose::WebhookSecret => "webhook-secret",
            Purpose::TokenSigning => "token-signing",
        }
    }
}

/// The 32-byte master key (zeroized on drop). `Debug` shows only the key id.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        Self::from_bytes(Zeroizing::new(*self.bytes))
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Self {
        Self::from_bytes(Zeroizing::new(random_bytes::<KEY_LEN>()))
    }

    /// Standard base64 (with padding) of exactly 32 bytes; surrounding whitespace
    /// (e.g. a key file's trailing newline) is ignored.
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let trimmed = text.trim();
        let mut decoded = Zeroizing::new(Vec::with_capacity(trimmed.len()));
        // The decode error names the offending byte: key material, so dropped.
        if STANDARD.decode_vec(trimmed, &mut decoded).is_err() {
            return Err(SealError::BadMasterKey);
        }
        if decoded.len() != KEY_LEN {
            return Err(SealError::BadMasterKey);
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&decoded);
        Ok(Self::from_bytes(bytes))
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let id = sha256_hex(&*bytes).chars().take(KEY_ID_LEN).collect();
        Self { bytes, id }
    }

    /// Standard base64 with padding, for writing the dev key file.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.bytes.as_slice()))
    }

    /// First 8 lower-case hex characters of SHA-256 of the key bytes. Not secret.
    pub fn key_id(&self) -> String {
        self.id.clone()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id={})", self.id)
    }
}

/// A sealed secret as stored in a row. `ciphertext` ends with the 16-byte GCM tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSecret {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The per-purpose subkeys of one master key; the master key bytes are not kept.
struct KeySlot {
    id: String,
    hmac_secret: Zeroizing<[u8; KEY_LEN]>,
    webhook_secret: Zeroizing<[u8; KEY_LEN]>,
    token_signing: Zeroizing<[u8; KEY_LEN]>,
}

impl KeySlot {
    fn derive(master: &MasterKey) -> Result<Self, SealError> {
        let hkdf = Hkdf::<Sha256>::new(None, &*master.bytes);
        let subkey = |purpose: Purpose| -> Result<Zeroizing<[u8; KEY_LEN]>, SealError> {
            let mut okm = Zeroizing::new([0u8; KEY_LEN]);
            // Only fails for outputs over 255 × 32 bytes; surfaced, never unwrapped.
            match hkdf.expand(purpose.as_str().as_bytes(), &mut *okm) {
                Ok(()) => Ok(okm),
                Err(hkdf::InvalidLength) => Err(SealError::BadMasterKey),
            }
        };
        Ok(Self {
            id: master.key_id(),
            hmac_secret: subkey(Purpose::HmacSecret)?,
            webhook_secret: subkey(Purpose::WebhookSecret)?,
            token_signing: subkey(Purpose::TokenSigning)?,
        })
    }

    fn cipher(&self, purpose: Purpose) -> Aes256Gcm {
        let key: &[u8; KEY_LEN] = match purpose {
            Purpose::HmacSecret => &self.hmac_secret,
            Purpose::WebhookSecret => &self.webhook_secret,
            Purpose::TokenSigning => &self.token_signing,
        };
        Aes256Gcm::new(key.into())
    }
}

/// Seals under the current master key; opens under the current or previous one.
pub struct Sealer {
    current: KeySlot,
    previous: Option<KeySlot>,
}

impl Sealer {
    /// Derives every purpose subkey once, up front. The `Result` only reports an HKDF
    /// length error, which cannot happen for 32-byte subkeys.
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Result<Self, SealError> {
        Ok(Self {
            current: KeySlot::derive(&current)?,
            previous: previous.as_ref().map(KeySlot::derive).transpose()?,
        })
    }

    pub fn current_key_id(&self) -> String {
        self.current.id.clone()
    }

    pub fn previous_key_id(&self) -> Option<String> {
        self.previous.as_ref().map(|slot| slot.id.clone())
    }

    /// True when `key_id` is the current or the previous master key id.
    pub fn knows_key_id(&self, key_id: &str) -> bool {
        self.slot(key_id).is_some()
    }

    fn slot(&self, key_id: &str) -> Option<&KeySlot> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|slot| slot.id == key_id)
    }

    /// Seals `plaintext` for the row (`purpose`, `caller`, `version`) with a fresh nonce.
    pub fn seal(
        &self,
        purpose: Purpose,
        caller: &str,
        version: i32,
        plaintext: &[u8],
    ) -> Result<SealedSecret, SealError> {
        let nonce = random_bytes::<NONCE_LEN>();
        self.seal_with_nonce(purpose, caller, version, plaintext, nonce)
    }

    fn seal_with_nonce(
        &self,
        purpose: Purpose,
        caller: &str,
        version: i32,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<SealedSecret, SealError> {
        let aad = aad(purpose, caller, version).ok_or(SealError::Encrypt)?;
        let payload = Payload {
            msg: plaintext,
            aad: aad.as_bytes(),
        };
        // `aead::Error` is deliberately opaque; there is nothing to keep.
        let Ok(ciphertext) = self
            .current
            .cipher(purpose)
            .encrypt(&GenericArray::from(nonce), payload)
        else {
            return Err(SealError::Encrypt);
        };
        Ok(SealedSecret {
            key_id: self.current.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a row sealed for (`purpose`, `caller`, `version`) under the master key the
    /// row names. Any mismatch or tampering is [`SealError::Decrypt`]; never a panic.
    pub fn open(
        &self,
        purpose: Purpose,
        caller: &str,
        version: i32,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let slot = self.slot(&sealed.key_id).ok_or(SealError::UnknownKeyId)?;
        let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(sealed.nonce.as_slice()) else {
            return Err(SealError::Decrypt);
        };
        let aad = aad(purpose, caller, version).ok_or(SealError::Decrypt)?;
        let payload = Payload {
            msg: &sealed.ciphertext,
            aad: aad.as_bytes(),
        };
        // `aead::Error` is deliberately opaque: wrong key, moved row and tampering look
        // the same, by design.
        match slot
            .cipher(purpose)
            .decrypt(&GenericArray::from(nonce), payload)
        {
            Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
            Err(aes_gcm::aead::Error) => Err(SealError::Decrypt),
        }
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("current_key_id", &self.current.id)
            .field("previous_key_id", &self.previous.as_ref().map(|s| &s.id))
            .finish()
    }
}

/// `purpose|caller|version`. A caller containing `|` would make the AAD ambiguous
/// (caller names never do), so it is refused.
fn aad(purpose: Purpose, caller: &str, version: i32) -> Option<String> {
    if caller.contains('|') {
        return None;
    }
    Some(format!("{}|{caller}|{version}", purpose.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S";

    /// 0x01, 0x02, …, 0x20.
    fn fixed_master() -> MasterKey {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        for (b, v) in bytes.iter_mut().zip(1u8..) {
            *b = v;
        }
        MasterKey::from_bytes(bytes)
    }

    fn sealer() -> Sealer {
        Sealer::new(MasterKey::generate(), None).unwrap()
    }

    // Expected values computed independently with Python `cryptography` 48:
    // HKDF(SHA256(), length=32, salt=None, info=purpose).derive(master), then
    // AESGCM(subkey).encrypt(nonce, plaintext, aad); key id via hashlib.sha256.
    #[test]
    fn known_answer() {
        let master = fixed_master();
        assert_eq!(
            master.to_base64().as_str(),
            "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
        );
        assert_eq!(master.key_id(), "ae216c2e");
        let sealer = Sealer::new(master, None).unwrap();
        let nonce: [u8; NONCE_LEN] = hex::decode("a0a1a2a3a4a5a6a7a8a9aaab")
            .unwrap()
            .try_into()
            .unwrap();
        let sealed = sealer
            .seal_with_nonce(Purpose::HmacSecret, "svc", 3, SECRET, nonce)
            .unwrap();
        assert_eq!(sealed.key_id, "ae216c2e");
        assert_eq!(
            hex::encode(&sealed.ciphertext),
            "082a4db20d4a3eadb4faaabf45cde59f1d66e343bff2b43c70f4fbdd40f26ff1\
             5e6d417c7aca12c8cccb128203b290f8859d616cc141d6b772abb327023e7c65\
             96d6c0ea29"
        );
        let empty = sealer
            .seal_with_nonce(Purpose::WebhookSecret, "stitcher", 1, b"", nonce)
            .unwrap();
        assert_eq!(
            hex::encode(&empty.ciphertext),
            "8a6de3faf106f1a6ab30e79f98ebdd8b"
        );
        let opened = sealer.open(Purpose::HmacSecret, "svc", 3, &sealed).unwrap();
        assert_eq!(opened.as_slice(), SECRET);
    }

    #[test]
    fn subkeys_known_answer() {
        let slot = KeySlot::derive(&fixed_master()).unwrap();
        assert_eq!(
            hex::encode(*slot.hmac_secret),
            "b160621013ed82327b62b11e6193ffe876266f9e20581f8abc9c4d35a4a2c4c9"
        );
        assert_eq!(
            hex::encode(*slot.webhook_secret),
            "8bf108f34252e6081707d216f566dbda1ef972631570633649f9bb8b74aa138d"
        );
        assert_eq!(
            hex::encode(*slot.token_signing),
            "91888bf0f66445e21269e7eae12bc925411d308e681d61f72bb9239bfa893edf"
        );
    }

    #[test]
    fn round_trip_each_purpose() {
        let s = sealer();
        for purpose in [
            Purpose::HmacSecret,
            Purpose::WebhookSecret,
            Purpose::TokenSigning,
        ] {
            let sealed = s.seal(purpose, "svc", 1, SECRET).unwrap();
            assert_eq!(sealed.key_id, s.current_key_id());
            assert_eq!(sealed.nonce.len(), NONCE_LEN);
            assert_eq!(sealed.ciphertext.len(), SECRET.len() + 16);
            assert_eq!(
                s.open(purpose, "svc", 1, &sealed).unwrap().as_slice(),
                SECRET
            );
        }
    }

    #[test]
    fn fresh_nonce_each_seal() {
        let s = sealer();
        let a = s.seal(Purpose::HmacSecret, "svc", 1, SECRET).unwrap();
        let b = s.seal(Purpose::HmacSecret, "svc", 1, SECRET).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn wrong_master_key_fails() {
        let sealed = sealer()
            .seal(Purpose::HmacSecret, "svc", 1, SECRET)
            .unwrap();
        let other = sealer();
        assert!(matches!(
            other.open(Purpose::HmacSecret, "svc", 1, &sealed),
            Err(SealError::UnknownKeyId)
        ));
        // Same id claimed but a different key: authentication fails.
        let forged = SealedSecret {
            key_id: other.current_key_id(),
            ..sealed
        };
        assert!(matches!(
            other.open(Purpose::HmacSecret, "svc", 1, &forged),
            Err(SealError::Decrypt)
        ));
    }

    #[test]
    fn moved_row_fails() {
        let s = sealer();
        let sealed = s.seal(Purpose::HmacSecret, "svc", 3, SECRET).unwrap();
        for (purpose, caller, version) in [
            (Purpose::HmacSecret, "other", 3),
            (Purpose::HmacSecret, "svc", 4),
            (Purpose::HmacSecret, "svc", 2),
            (Purpose::WebhookSecret, "svc", 3),
            (Purpose::TokenSigning, "svc", 3),
            (Purpose::HmacSecret, "svc|3", 3),
        ] {
            assert!(
                matches!(
                    s.open(purpose, caller, version, &sealed),
                    Err(SealError::Decrypt)
                ),
                "{purpose:?} {caller} {version} opened"
            );
        }
        assert!(s.open(Purpose::HmacSecret, "svc", 3, &sealed).is_ok());
    }

    #[test]
    fn caller_with_separator_is_refused() {
        let s = sealer();
        assert!(matches!(
            s.seal(Purpose::HmacSecret, "a|b", 1, SECRET),
            Err(SealError::Encrypt)
        ));
    }

    #[test]
    fn tampering_fails() {
        let s = sealer();
        let sealed = s.seal(Purpose::HmacSecret, "svc", 1, SECRET).unwrap();
        let open = |x: &SealedSecret| s.open(Purpose::HmacSecret, "svc", 1, x);
        let tag_start = sealed.ciphertext.len() - 16;
        for i in [0, NONCE_LEN - 1] {
            let mut t = sealed.clone();
            t.nonce[i] ^= 0x01;
            assert!(
                matches!(open(&t), Err(SealError::Decrypt)),
                "nonce byte {i}"
            );
        }
        for i in [
            0,
            10,
            tag_start - 1,
            tag_start,
            tag_start + 7,
            tag_start + 15,
        ] {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 0x80;
            assert!(
                matches!(open(&t), Err(SealError::Decrypt)),
                "ciphertext byte {i}"
            );
        }
        for len in [0, 1, 15, 16, tag_start, sealed.ciphertext.len() - 1] {
            let mut t = sealed.clone();
            t.ciphertext.truncate(len);
            assert!(
                matches!(open(&t), Err(SealError::Decrypt)),
                "truncated to {len}"
            );
        }
        let mut longer = sealed.clone();
        longer.ciphertext.push(0);
        assert!(matches!(open(&longer), Err(SealError::Decrypt)));
        assert!(open(&sealed).is_ok());
    }

    #[test]
    fn wrong_nonce_length_is_an_error_not_a_panic() {
        let s = sealer();
        let sealed = s.seal(Purpose::HmacSecret, "svc", 1, SECRET).unwrap();
        for len in [0, 11, 13, 24] {
            let mut t = sealed.clone();
            t.nonce.resize(len, 0);
            assert!(matches!(
                s.open(Purpose::HmacSecret, "svc", 1, &t),
                Err(SealError::Decrypt)
            ));
        }
    }

    #[test]
    fn previous_key_fallback() {
        let old_b64 = MasterKey::generate().to_base64();
        let old = Sealer::new(MasterKey::from_base64(&old_b64).unwrap(), None).unwrap();
        let old_row = old.seal(Purpose::WebhookSecret, "svc", 2, SECRET).unwrap();

        let new_key = MasterKey::generate();
        let new_id = new_key.key_id();
        let rotated =
            Sealer::new(new_key, Some(MasterKey::from_base64(&old_b64).unwrap())).unwrap();
        assert_eq!(rotated.current_key_id(), new_id);
        assert_eq!(rotated.previous_key_id(), Some(old.current_key_id()));
        assert!(rotated.knows_key_id(&new_id));
        assert!(rotated.knows_key_id(&old_row.key_id));
        assert!(!rotated.knows_key_id("00000000"));

        let opened = rotated
            .open(Purpose::WebhookSecret, "svc", 2, &old_row)
            .unwrap();
        assert_eq!(opened.as_slice(), SECRET);
        // Rewrap: new seals use the current key id and open without the previous key.
        let rewrapped = rotated
            .seal(Purpose::WebhookSecret, "svc", 2, &opened)
            .unwrap();
        assert_eq!(rewrapped.key_id, new_id);
        assert_ne!(rewrapped.key_id, old_row.key_id);
        assert!(old
            .open(Purpose::WebhookSecret, "svc", 2, &rewrapped)
            .is_err());
    }

    #[test]
    fn master_key_base64() {
        let k = MasterKey::generate();
        let b64 = k.to_base64();
        assert_eq!(b64.len(), 44);
        let again = MasterKey::from_base64(&format!("  {}\n", b64.as_str())).unwrap();
        assert_eq!(again.key_id(), k.key_id());
        assert_eq!(
            MasterKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .unwrap()
                .key_id(),
            "66687aad"
        );
        for bad in [
            "",
            "not base64!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", // missing padding
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==", // 31 bytes
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", // too long
        ] {
            assert!(matches!(
                MasterKey::from_base64(bad),
                Err(SealError::BadMasterKey)
            ));
        }
    }

    #[test]
    fn debug_shows_only_key_ids() {
        let k = fixed_master();
        let b64 = k.to_base64();
        assert_eq!(format!("{k:?}"), "MasterKey(id=ae216c2e)");
        let s = Sealer::new(k, Some(MasterKey::generate())).unwrap();
        let dbg = format!("{s:?}");
        assert!(dbg.contains("ae216c2e"));
        assert!(!dbg.contains(&b64[..8]));
        let err = format!("{:?} {}", SealError::BadMasterKey, SealError::BadMasterKey);
        assert!(!err.contains(&b64[..8]));
    }

    #[test]
    fn purpose_strings() {
        assert_eq!(Purpose::HmacSecret.as_str(), "hmac-secret");
        assert_eq!(Purpose::WebhookSecret.as_str(), "webhook-secret");
        assert_eq!(Purpose::TokenSigning.as_str(), "token-signing");
    }
}
