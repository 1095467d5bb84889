//! The client-certificate scheme (mutual TLS). The TLS layer has already verified the
//! certificate's chain against `COORDINATOR_TLS_CLIENT_CA` during the handshake (a
//! certificate that does not verify ends the handshake: it never reaches a request),
//! and hands the names in it to each request of the connection as a
//! [`PeerCertificate`]. Here the configured [`ClientIdentity`] turns those names into
//! exactly one caller, which must exist and be enabled; its scopes are the caller's.

use super::audit::AuditRecord;
use super::model::Scheme;
use super::principal::{Held, Principal};
use super::{fail, AuthContext};
use crate::error::ApiError;

/// Which name in a verified client certificate names the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// The subject's common name is the caller name.
    CommonName,
    /// A DNS subject-alternative name `<caller><suffix>`, e.g. suffix
    /// `.clients.example.org` for `billing.clients.example.org`.
    SanDns(String),
    /// A URI subject-alternative name `<prefix><caller>`, e.g. prefix
    /// `spiffe://example.org/coordinator/` for `spiffe://example.org/coordinator/billing`.
    SanUri(String),
}

impl ClientIdentity {
    /// `cn`, `san-dns:SUFFIX` or `san-uri:PREFIX`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.split_once(':') {
            None if raw == "cn" => Ok(ClientIdentity::CommonName),
            Some(("san-dns", suffix)) if suffix.starts_with('.') && suffix.len() > 1 => {
                Ok(ClientIdentity::SanDns(suffix.to_ascii_lowercase()))
            }
            Some(("san-dns", _)) => Err("san-dns needs a suffix starting with '.', e.g. san-dns:.clients.example.org".into()),
            Some(("san-uri", prefix)) if !prefix.is_empty() => {
                Ok(ClientIdentity::SanUri(prefix.to_owned()))
            }
            _ => Err(
                "expected cn, san-dns:SUFFIX or san-uri:PREFIX (e.g. san-uri:spiffe://example.org/ns/)"
                    .into(),
            ),
        }
    }

    /// The one caller the certificate names, or why it names none.
    pub fn caller_of<'a>(&self, cert: &'a PeerCertificate) -> Result<&'a str, &'static str> {
        let mut names: Vec<&str> = match self {
            ClientIdentity::CommonName => cert.common_names.iter().map(String::as_str).collect(),
            ClientIdentity::SanDns(suffix) => cert
                .dns_names
                .iter()
                .filter_map(|n| {
                    // DNS names compare case-insensitively; caller names are lower case.
                    let cut = n.len().checked_sub(suffix.len())?;
                    let (head, tail) = (n.get(..cut)?, n.get(cut..)?);
                    tail.eq_ignore_ascii_case(suffix).then_some(head)
                })
                .collect(),
            ClientIdentity::SanUri(prefix) => cert
                .uris
                .iter()
                .filter_map(|u| u.strip_prefix(prefix.as_str()))
                .collect(),
        };
        names.dedup();
        match names.as_slice() {
            [] => Err("client certificate names no caller"),
            [one] if valid_caller_name(one) => Ok(one),
            [_] => Err("client certificate names no valid caller"),
            _ => Err("client certificate names more than one caller"),
        }
    }
}

/// `^[a-z][a-z0-9_-]{0,31}$`, the rule `caller add` enforces.
fn valid_caller_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The names in a client certificate that the handshake verified; attached to every
/// request of its connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    pub common_names: Vec<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
}

/// At most this many names of each kind are kept from one certificate.
const MAX_NAMES: usize = 16;

impl PeerCertificate {
    /// The subject common names and the DNS / URI subject-alternative names of a DER
    /// certificate. Only called on certificates the handshake has verified; anything
    /// this reader does not understand yields no name (so no caller), never a panic.
    pub fn from_der(der: &[u8]) -> Option<PeerCertificate> {
        let (_, cert, _) = der::tlv(der, der::SEQUENCE)?;
        let (_, mut tbs, _) = der::tlv(cert, der::SEQUENCE)?;
        if tbs.first() == Some(&der::VERSION) {
            tbs = der::skip(tbs)?;
        }
        // serialNumber, signature, issuer, validity
        for _ in 0..4 {
            tbs = der::skip(tbs)?;
        }
        let (_, subject, rest) = der::tlv(tbs, der::SEQUENCE)?;
        let mut out = PeerCertificate {
            common_names: der::common_names(subject),
            ..PeerCertificate::default()
        };
        // subjectPublicKeyInfo, then the optional unique ids and [3] extensions
        let mut rest = der::skip(rest)?;
        while let Some((tag, content, after)) = der::any(rest) {
            if tag == der::EXTENSIONS {
                der::subject_alt_names(content, &mut out);
            }
            rest = after;
        }
        out.common_names.truncate(MAX_NAMES);
        out.dns_names.truncate(MAX_NAMES);
        out.uris.truncate(MAX_NAMES);
        Some(out)
    }
}

/// A minimal DER reader for the few certificate fields above.
mod der {
    use super::{PeerCertificate, MAX_NAMES};

    pub const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const OCTET_STRING: u8 = 0x04;
    pub const VERSION: u8 = 0xa0;
    pub const EXTENSIONS: u8 = 0xa3;
    const SAN_DNS: u8 = 0x82;
    const SAN_URI: u8 = 0x86;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

    /// One tag-length-value: (tag, content, what follows).
    pub fn any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, rest) = rest.split_at_checked(n)?;
            let len = bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, rest)
        };
        let (content, after) = rest.split_at_checked(len)?;
        Some((tag, content, after))
    }

    pub fn tlv(input: &[u8], want: u8) -> Option<(u8, &[u8], &[u8])> {
        any(input).filter(|(tag, _, _)| *tag == want)
    }

    pub fn skip(input: &[u8]) -> Option<&[u8]> {
        any(input).map(|(_, _, rest)| rest)
    }

    /// Every CN attribute of a Name (a SEQUENCE OF SET OF AttributeTypeAndValue).
    pub fn common_names(mut name: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((SET, mut rdn, rest)) = any(name) {
            while let Some((SEQUENCE, atv, more)) = any(rdn) {
                if let Some((OID, oid, value)) = any(atv) {
                    if oid == OID_CN {
                        // Any string type (UTF8String, PrintableString, IA5String).
                        if let Some((_, text, _)) = any(value) {
                            if let Ok(s) = std::str::from_utf8(text) {
                                out.push(s.to_owned());
                            }
                        }
                    }
                }
                rdn = more;
            }
            name = rest;
            if out.len() >= MAX_NAMES {
                break;
            }
        }
        out
    }

    /// The DNS and URI names of the subjectAltName extension in `[3] { SEQUENCE OF
    /// Extension }`.
    pub fn subject_alt_names(explicit: &[u8], out: &mut PeerCertificate) {
        let Some((_, mut exts, _)) = tlv(explicit, SEQUENCE) else {
            return;
        };
        while let Some((SEQUENCE, ext, rest)) = any(exts) {
            exts = rest;
            let Some((OID, oid, mut fields)) = any(ext) else {
                continue;
            };
            if oid != OID_SAN {
                continue;
            }
            // Skip the optional `critical` BOOLEAN.
            if fields.first() == Some(&0x01) {
                let Some(after) = skip(fields) else { continue };
                fields = after;
            }
            let Some((OCTET_STRING, value, _)) = any(fields) else {
                continue;
            };
            let Some((_, mut names, _)) = tlv(value, SEQUENCE) else {
                continue;
            };
            while let Some((tag, text, rest)) = any(names) {
                names = rest;
                let Ok(s) = std::str::from_utf8(text) else {
                    continue;
                };
                match tag {
                    SAN_DNS => out.dns_names.push(s.to_owned()),
                    SAN_URI => out.uris.push(s.to_owned()),
                    _ => {}
                }
            }
        }
    }
}

/// Authenticate the connection's verified client certificate as its caller.
pub async fn verify(
    ctx: &AuthContext,
    identity: &ClientIdentity,
    cert: &PeerCertificate,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::ClientCert);
    let name = identity.caller_of(cert).map_err(fail)?;
    audit.caller = Some(name.into());
    let caller = ctx
        .store
        .caller(name)
        .await?
        .ok_or_else(|| fail("unknown caller"))?;
    if caller.disabled {
        return Err(fail("caller disabled"));
    }
    Ok(Principal {
        caller: caller.name.to_string(),
        scheme: Scheme::ClientCert,
        scopes: caller.scopes.clone(),
        key_ref: None,
        job_id: None,
        held: Held::Caller,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &[&str], dns: &[&str], uris: &[&str]) -> PeerCertificate {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect();
        PeerCertificate {
            common_names: s(cn),
            dns_names: s(dns),
            uris: s(uris),
        }
    }

    #[test]
    fn identity_parses() {
        assert_eq!(ClientIdentity::parse("cn"), Ok(ClientIdentity::CommonName));
        assert_eq!(
            ClientIdentity::parse("san-dns:.c.example"),
            Ok(ClientIdentity::SanDns(".c.example".into()))
        );
        assert_eq!(
            ClientIdentity::parse("san-uri:spiffe://x/"),
            Ok(ClientIdentity::SanUri("spiffe://x/".into()))
        );
        for bad in [
            "",
            "CN",
            "san-dns:",
            "san-dns:example",
            "san-uri:",
            "subject",
        ] {
            assert!(ClientIdentity::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_one_valid_caller_is_named() {
        let cn = ClientIdentity::CommonName;
        assert_eq!(cn.caller_of(&cert(&["billing"], &[], &[])), Ok("billing"));
        assert!(cn.caller_of(&cert(&[], &["billing"], &[])).is_err());
        assert!(cn.caller_of(&cert(&["a", "b"], &[], &[])).is_err());
        assert!(cn.caller_of(&cert(&["Billing Service"], &[], &[])).is_err());
        let dns = ClientIdentity::SanDns(".c.example".into());
        assert_eq!(
            dns.caller_of(&cert(&["x"], &["billing.C.Example", "other.org"], &[])),
            Ok("billing")
        );
        assert!(dns.caller_of(&cert(&[], &["a.b.c.example"], &[])).is_err());
        assert!(dns.caller_of(&cert(&[], &["c.example"], &[])).is_err());
        let uri = ClientIdentity::SanUri("spiffe://x/ns/".into());
        assert_eq!(
            uri.caller_of(&cert(&[], &[], &["spiffe://x/ns/billing"])),
            Ok("billing")
        );
        assert!(uri
            .caller_of(&cert(&[], &[], &["spiffe://x/ns/a", "spiffe://x/ns/b"]))
            .is_err());
        assert!(uri
            .caller_of(&cert(&[], &[], &["spiffe://y/ns/a"]))
            .is_err());
    }

    #[test]
    fn names_are_read_from_a_real_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["billing.c.example".into(), "x.org".into()])
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://x/ns/billing").expect("uri"),
        ));
        let key = rcgen::KeyPair::generate().expect("key");
        let c = params.self_signed(&key).expect("cert");
        let got = PeerCertificate::from_der(c.der()).expect("parsed");
        assert_eq!(got.common_names, vec!["billing".to_owned()]);
        assert_eq!(got.dns_names, vec!["billing.c.example", "x.org"]);
        assert_eq!(got.uris, vec!["spiffe://x/ns/billing"]);
        // Truncated or garbage input gives no certificate, never a panic.
        for cut in 0..c.der().len() {
            let _ = PeerCertificate::from_der(c.der().get(..cut).unwrap_or_default());
        }
        assert_eq!(PeerCertificate::from_der(b"\x30\x84\xff\xff\xff\xff"), None);
    }
}
