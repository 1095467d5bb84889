//! The client-certificate scheme (mutual TLS). The TLS layer has already verified the
//! certificate's chain against `COORDINATOR_TLS_CLIENT_CA` during the handshake (a
//! certificate that does not verify ends the handshake: it never reaches a request),
//! and hands the names in it to each request of the connection as a
//! [`PeerCertificate`]. Here the configured [`ClientIdentity`] turns those names into
//! exactly one caller, which must exist and be enabled; its scopes are the caller's.

use std::borrow::Cow;

use super::audit::AuditRecord;
use super::model::Scheme;
use super::principal::{Held, Principal};
use super::{fail, AuthContext};
use crate::db::now_millis;
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

    /// The one caller the certificate names, or why it names none. DNS names are
    /// case-insensitive (RFC 4343), so a DNS name is matched lower-cased, its caller part
    /// too (`SVC-A.Clients.Example` is `svc-a`); common names and URIs are matched
    /// exactly (a URI's path is case-sensitive, and neither is defined as a host name).
    pub fn caller_of<'a>(&self, cert: &'a PeerCertificate) -> Result<Cow<'a, str>, &'static str> {
        let all = match self {
            ClientIdentity::CommonName => &cert.common_names,
            ClientIdentity::SanDns(_) => &cert.dns_names,
            ClientIdentity::SanUri(_) => &cert.uris,
        };
        // Past the bound a name was dropped, maybe another caller's.
        if all.len() > MAX_NAMES {
            return Err("client certificate has too many names");
        }
        let mut names: Vec<Cow<'a, str>> = match self {
            ClientIdentity::CommonName => cert
                .common_names
                .iter()
                .map(|n| Cow::Borrowed(n.as_str()))
                .collect(),
            ClientIdentity::SanDns(suffix) => cert
                .dns_names
                .iter()
                .filter_map(|n| {
                    // The suffix is stored lower case (`parse`).
                    let cut = n.len().checked_sub(suffix.len())?;
                    let (head, tail) = (n.get(..cut)?, n.get(cut..)?);
                    if !tail.eq_ignore_ascii_case(suffix) {
                        return None;
                    }
                    Some(if head.bytes().any(|b| b.is_ascii_uppercase()) {
                        Cow::Owned(head.to_ascii_lowercase())
                    } else {
                        Cow::Borrowed(head)
                    })
                })
                .collect(),
            ClientIdentity::SanUri(prefix) => cert
                .uris
                .iter()
                .filter_map(|u| u.strip_prefix(prefix.as_str()).map(Cow::Borrowed))
                .collect(),
        };
        // One caller named twice (`svc-a` and `SVC-A`, or anywhere in the list) is one.
        names.sort_unstable();
        names.dedup();
        match <[_; 1]>::try_from(names) {
            Ok([one]) if valid_caller_name(&one) => Ok(one),
            Ok(_) => Err("client certificate names no valid caller"),
            Err(v) if v.is_empty() => Err("client certificate names no caller"),
            Err(_) => Err("client certificate names more than one caller"),
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
    /// When the certificate and the intermediates sent with it are all valid (unix
    /// seconds, both inclusive). The handshake checked it once; a connection kept open,
    /// or a TLS session resumed (rustls restores the first handshake's certificate
    /// without checking it again), outlives that check, so every request checks it.
    pub not_before: i64,
    pub not_after: i64,
}

/// At most this many names of each kind are kept from one certificate; one more is kept
/// to mark a kind that had more, which names no caller (`caller_of`).
const MAX_NAMES: usize = 16;

impl PeerCertificate {
    /// The leaf's names ([`Self::from_der`]), valid only while the leaf and the
    /// intermediates sent with it are. An intermediate not valid at `now` (the
    /// handshake's moment), or that this reader cannot read, cannot be on the path the
    /// handshake verified (clients may send stale extras) and is left out. An
    /// unreadable leaf gives no names (so no caller).
    pub fn from_chain<'a>(chain: impl IntoIterator<Item = &'a [u8]>, now: i64) -> PeerCertificate {
        let mut chain = chain.into_iter();
        let Some(mut out) = chain.next().and_then(PeerCertificate::from_der) else {
            return PeerCertificate::default();
        };
        for (from, until) in chain.filter_map(validity_of) {
            if from <= now && now <= until {
                out.not_before = out.not_before.max(from);
                out.not_after = out.not_after.min(until);
            }
        }
        out
    }

    /// Whether the certificate is valid at `now` (unix seconds), as the handshake
    /// decided it for its own moment.
    pub fn valid_at(&self, now: i64) -> Result<(), &'static str> {
        if now < self.not_before {
            Err("client certificate not yet valid")
        } else if now > self.not_after {
            Err("client certificate expired")
        } else {
            Ok(())
        }
    }

    /// The subject common names and the DNS / URI subject-alternative names of a DER
    /// certificate. Only called on certificates the handshake has verified; anything
    /// this reader does not understand yields no name (so no caller), never a panic.
    pub fn from_der(der: &[u8]) -> Option<PeerCertificate> {
        let ((not_before, not_after), rest) = validity_and_rest(der)?;
        let (_, subject, rest) = der::tlv(rest, der::SEQUENCE)?;
        let mut out = PeerCertificate {
            common_names: der::common_names(subject),
            not_before,
            not_after,
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
        out.common_names.truncate(MAX_NAMES + 1);
        out.dns_names.truncate(MAX_NAMES + 1);
        out.uris.truncate(MAX_NAMES + 1);
        Some(out)
    }
}

/// A DER certificate's validity (notBefore, notAfter), unix seconds.
pub fn validity_of(der: &[u8]) -> Option<(i64, i64)> {
    validity_and_rest(der).map(|(validity, _)| validity)
}

/// A DER certificate's validity, and the rest of its `tbsCertificate` from the subject
/// on.
fn validity_and_rest(der: &[u8]) -> Option<((i64, i64), &[u8])> {
    let (_, cert, _) = der::tlv(der, der::SEQUENCE)?;
    let (_, mut tbs, _) = der::tlv(cert, der::SEQUENCE)?;
    if tbs.first() == Some(&der::VERSION) {
        tbs = der::skip(tbs)?;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        tbs = der::skip(tbs)?;
    }
    let (_, validity, rest) = der::tlv(tbs, der::SEQUENCE)?;
    Some((der::validity(validity)?, rest))
}

/// A minimal DER reader for the few certificate fields above.
mod der {
    use super::{PeerCertificate, MAX_NAMES};

    pub const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const OCTET_STRING: u8 = 0x04;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
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

    /// `Validity ::= SEQUENCE { notBefore Time, notAfter Time }`, unix seconds.
    pub fn validity(content: &[u8]) -> Option<(i64, i64)> {
        let (tag, from, rest) = any(content)?;
        let not_before = time(tag, from)?;
        let (tag, until, _) = any(rest)?;
        Some((not_before, time(tag, until)?))
    }

    /// UTCTime `YYMMDDHHMMSSZ` (RFC 5280: 50-99 are 19xx) or GeneralizedTime
    /// `YYYYMMDDHHMMSSZ`, as unix seconds.
    fn time(tag: u8, text: &[u8]) -> Option<i64> {
        let (year, rest) = match (tag, text.len()) {
            (UTC_TIME, 13) => {
                let yy = digits(text.get(..2)?)?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
            }
            (GENERALIZED_TIME, 15) => (digits(text.get(..4)?)?, text.get(4..)?),
            _ => return None,
        };
        if rest.last() != Some(&b'Z') {
            return None;
        }
        let field = |i: usize| digits(rest.get(i..i + 2)?);
        let (month, day) = (field(0)?, field(2)?);
        let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
    }

    fn digits(text: &[u8]) -> Option<i64> {
        text.iter().try_fold(0i64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
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
            if out.len() > MAX_NAMES {
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
    audit.caller = Some(name.as_ref().into());
    cert.valid_at(now_millis() / 1000).map_err(fail)?;
    let caller = ctx
        .store
        .caller(&name)
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
        held: Held::ClientCert {
            not_after: cert.not_after,
        },
        client_cert_until: None,
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
            ..PeerCertificate::default()
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
        assert_eq!(
            cn.caller_of(&cert(&["billing"], &[], &[])),
            Ok("billing".into())
        );
        assert!(cn.caller_of(&cert(&[], &["billing"], &[])).is_err());
        assert!(cn.caller_of(&cert(&["a", "b"], &[], &[])).is_err());
        assert!(cn.caller_of(&cert(&["Billing Service"], &[], &[])).is_err());
        let dns = ClientIdentity::SanDns(".c.example".into());
        assert_eq!(
            dns.caller_of(&cert(&["x"], &["billing.C.Example", "other.org"], &[])),
            Ok("billing".into())
        );
        // DNS names compare without case (RFC 4343), the caller part too; one caller
        // spelt two ways is one caller, two callers are two whatever their case.
        assert_eq!(
            dns.caller_of(&cert(&[], &["BILLING.C.EXAMPLE"], &[])),
            Ok("billing".into())
        );
        assert_eq!(
            dns.caller_of(&cert(
                &[],
                &["billing.c.example", "x.org", "Billing.c.example"],
                &[]
            )),
            Ok("billing".into())
        );
        assert_eq!(
            dns.caller_of(&cert(&[], &["Billing.c.example", "ops.c.example"], &[])),
            Err("client certificate names more than one caller")
        );
        // Only DNS names: a common name and a URI are still matched exactly.
        assert!(cn.caller_of(&cert(&["BILLING"], &[], &[])).is_err());
        assert!(dns.caller_of(&cert(&[], &["a.b.c.example"], &[])).is_err());
        assert!(dns.caller_of(&cert(&[], &["c.example"], &[])).is_err());
        let uri = ClientIdentity::SanUri("spiffe://x/ns/".into());
        assert_eq!(
            uri.caller_of(&cert(&[], &[], &["spiffe://x/ns/billing"])),
            Ok("billing".into())
        );
        assert!(uri
            .caller_of(&cert(&[], &[], &["spiffe://x/ns/a", "spiffe://x/ns/b"]))
            .is_err());
        assert!(uri
            .caller_of(&cert(&[], &[], &["spiffe://y/ns/a"]))
            .is_err());
        // A name past the bound may be another caller's: refused, not ignored.
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("h{i}.other.org")).collect();
        let mut many: Vec<&str> = many.iter().map(String::as_str).collect();
        many[0] = "billing.c.example";
        assert_eq!(
            dns.caller_of(&cert(&[], &many, &[])),
            Err("client certificate has too many names")
        );
        assert_eq!(
            dns.caller_of(&cert(&[], &many[..MAX_NAMES], &[])),
            Ok("billing".into())
        );
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
        // rcgen's defaults: 1975-01-01 to 4096-01-01 (UTCTime and GeneralizedTime).
        assert_eq!(
            (got.not_before, got.not_after),
            (157_766_400, 67_090_118_400)
        );
        assert_eq!(
            got.valid_at(157_766_399),
            Err("client certificate not yet valid")
        );
        assert_eq!(
            got.valid_at(67_090_118_401),
            Err("client certificate expired")
        );
        assert_eq!(got.valid_at(1_800_000_000), Ok(()));
        // A chain is valid only while each certificate in it is.
        let mut short = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        short.not_before = rcgen::date_time_ymd(2000, 2, 29);
        short.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let short = short.self_signed(&key).expect("cert");
        let now = 1_800_000_000;
        let chain = PeerCertificate::from_chain([c.der().as_ref(), short.der().as_ref()], now);
        assert_eq!(chain.common_names, vec!["billing".to_owned()]);
        assert_eq!(
            (chain.not_before, chain.not_after),
            (951_782_400, 2_524_521_600)
        );
        // An extra the handshake cannot have used (expired then, unreadable) is left out.
        let later =
            PeerCertificate::from_chain([c.der().as_ref(), short.der().as_ref()], 2_524_521_601);
        assert_eq!(later, got);
        let broken = PeerCertificate::from_chain([c.der().as_ref(), b"\x30\x00".as_slice()], now);
        assert_eq!(broken, got);
        assert_eq!(
            PeerCertificate::from_chain([b"\x30\x00".as_slice()], now),
            PeerCertificate::default()
        );
        // Truncated or garbage input gives no certificate, never a panic.
        for cut in 0..c.der().len() {
            let _ = PeerCertificate::from_der(c.der().get(..cut).unwrap_or_default());
        }
        assert_eq!(PeerCertificate::from_der(b"\x30\x84\xff\xff\xff\xff"), None);
    }
}
