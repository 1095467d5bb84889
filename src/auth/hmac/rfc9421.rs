//! RFC 9421 HTTP Message Signatures: the wire format of the HMAC scheme's second
//! encoding (the verifier is `auth::hmac`). Pure: parsing `Signature-Input` and
//! `Signature` (RFC 9651 structured fields), choosing the signature to check, the
//! required-components rule, the signature base, and RFC 9530 `Content-Digest`.
//!
//! The profile accepted (docs/design.md):
//! - `alg="hmac-sha256"` or no `alg`; `keyid` = `CALLER` or `CALLER:VERSION`;
//!   `created` required, `expires` honoured, `nonce` and `tag` optional; any other
//!   signature parameter is refused.
//! - covered components: `@method` always; `@target-uri`, or `@path` plus `@query` when
//!   the request has a query; `@authority` accepted; `content-digest` whenever there is
//!   a body; other header fields may be covered. Other derived components and component
//!   parameters (`;sf`, `;key`, `;bs`, `;req`, `;tr`) are refused.
//! - several signatures: the one labelled `coordinator`, else the first whose covered
//!   components pass the rule.

use sfv::{BareItem, Dictionary, FieldType, InnerList, ListEntry, Parser};
use sha2::{Digest, Sha256, Sha512};

pub const HEADER_SIGNATURE: &str = "signature";
pub const HEADER_SIGNATURE_INPUT: &str = "signature-input";
pub const HEADER_CONTENT_DIGEST: &str = "content-digest";
/// The label a client uses to tell the server which of several signatures is its own.
pub const PREFERRED_LABEL: &str = "coordinator";
/// The only algorithm of this profile.
pub const ALG: &str = "hmac-sha256";
const MAX_HEADER_BYTES: usize = 8192;
const MAX_COMPONENTS: usize = 32;
const MAX_NONCE_LEN: usize = 128;

/// A covered component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    Method,
    TargetUri,
    Authority,
    Path,
    Query,
    /// A header field, lower-case.
    Field(String),
}

impl Component {
    fn parse(name: &str) -> Result<Component, &'static str> {
        Ok(match name {
            "@method" => Component::Method,
            "@target-uri" => Component::TargetUri,
            "@authority" => Component::Authority,
            "@path" => Component::Path,
            "@query" => Component::Query,
            n if n.starts_with('@') => return Err("unsupported derived component"),
            n if !n.is_empty()
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
                }) =>
            {
                Component::Field(n.to_owned())
            }
            _ => return Err("malformed component name"),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Component::Method => "@method",
            Component::TargetUri => "@target-uri",
            Component::Authority => "@authority",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::Field(f) => f,
        }
    }
}

/// The chosen signature with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInput {
    pub label: String,
    pub components: Vec<Component>,
    pub created: i64,
    pub expires: Option<i64>,
    pub caller: String,
    pub key_version: Option<i32>,
    pub nonce: Option<String>,
    /// The value of the `@signature-params` line (the inner list, serialized).
    pub params: String,
    /// The signature bytes (an HMAC-SHA256: 32 bytes).
    pub signature: Vec<u8>,
    /// The request's other signatures in this profile (see [`OtherSignature`]).
    pub others: Vec<OtherSignature>,
}

/// A signature of the request besides the chosen one that is in this profile (its
/// parameters parse, 32 bytes): it may be a second valid signature of this service's
/// over the same request, by another caller or secret version. Such a signature, sent
/// alone or under the preferred label, would run the request again, so once the
/// chosen one has verified each of these is recorded as used as well (review,
/// 2026-12-06: swapping the labels of two valid signatures ran a create twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherSignature {
    pub caller: String,
    pub created: i64,
    pub signature: Vec<u8>,
}

/// The most other signatures in this profile a request may carry (each is one more
/// replay record to write).
pub const MAX_OTHER_SIGNATURES: usize = 4;

/// What the request says about itself, for the required-components rule.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub has_body: bool,
    pub has_query: bool,
}

fn dictionary(value: &str, what: &'static str) -> Result<Dictionary, &'static str> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(what);
    }
    Parser::new(value).parse::<Dictionary>().map_err(|e| {
        // sfv's error is a message and a position, never the header's text.
        log::debug!("{what}: {e}");
        what
    })
}

fn covered(list: &InnerList) -> Result<Vec<Component>, &'static str> {
    if list.items.len() > MAX_COMPONENTS {
        return Err("too many covered components");
    }
    let mut out: Vec<Component> = Vec::with_capacity(list.items.len());
    for item in &list.items {
        let BareItem::String(name) = &item.bare_item else {
            return Err("malformed component name");
        };
        if !item.params.is_empty() {
            return Err("component parameters are not supported");
        }
        let c = Component::parse(name.as_str())?;
        if out.contains(&c) {
            return Err("duplicate covered component");
        }
        out.push(c);
    }
    Ok(out)
}

/// The required-components rule.
pub fn check_required(components: &[Component], shape: Shape) -> Result<(), &'static str> {
    let has = |c: &Component| components.contains(c);
    if !has(&Component::Method) {
        return Err("@method must be covered");
    }
    let target = has(&Component::TargetUri)
        || (has(&Component::Path) && (!shape.has_query || has(&Component::Query)));
    if !target {
        return Err("@target-uri, or @path with @query, must be covered");
    }
    if shape.has_body && !has(&Component::Field(HEADER_CONTENT_DIGEST.to_owned())) {
        return Err("content-digest must be covered when there is a body");
    }
    Ok(())
}

fn keyid(raw: &str) -> Result<(String, Option<i32>), &'static str> {
    let (caller, version) = match raw.rsplit_once(':') {
        Some((c, v)) => {
            let digits = v.strip_prefix('v').unwrap_or(v);
            let version = (!digits.is_empty() && digits.len() <= 9)
                .then(|| digits.parse::<i32>().ok())
                .flatten()
                .filter(|v| *v > 0)
                .ok_or("malformed keyid")?;
            (c, Some(version))
        }
        None => (raw, None),
    };
    if !super::wire::is_valid_caller_name(caller) {
        return Err("malformed keyid");
    }
    Ok((caller.to_owned(), version))
}

fn integer(v: &BareItem) -> Option<i64> {
    v.as_integer().map(i64::from)
}

fn parameters(list: &InnerList) -> Result<SignatureInput, &'static str> {
    let mut created = None;
    let mut expires = None;
    let mut key = None;
    let mut nonce = None;
    for (name, value) in &list.params {
        match name.as_str() {
            "created" => created = Some(integer(value).ok_or("malformed created")?),
            "expires" => expires = Some(integer(value).ok_or("malformed expires")?),
            "keyid" => {
                let s = value.as_string().ok_or("malformed keyid")?;
                key = Some(keyid(s.as_str())?);
            }
            "alg" => {
                let s = value.as_string().ok_or("unsupported alg")?;
                if s.as_str() != ALG {
                    return Err("unsupported alg");
                }
            }
            "nonce" => {
                let s = value.as_string().ok_or("malformed nonce")?;
                if s.as_str().is_empty() || s.as_str().len() > MAX_NONCE_LEN {
                    return Err("malformed nonce");
                }
                nonce = Some(s.as_str().to_owned());
            }
            "tag" => {
                value.as_string().ok_or("malformed tag")?;
            }
            _ => return Err("unknown signature parameter"),
        }
    }
    let (caller, key_version) = key.ok_or("keyid missing")?;
    let params = FieldType::serialize(&vec![ListEntry::InnerList(list.clone())])
        .ok_or("malformed signature-input")?;
    Ok(SignatureInput {
        label: String::new(),
        components: covered(list)?,
        created: created.ok_or("created missing")?,
        expires,
        caller,
        key_version,
        nonce,
        params,
        signature: Vec::new(),
        others: Vec::new(),
    })
}

/// Parse both headers and pick the signature to verify.
pub fn parse(
    signature_input: &str,
    signature: &str,
    shape: Shape,
) -> Result<SignatureInput, &'static str> {
    let inputs = dictionary(signature_input, "malformed signature-input")?;
    let signatures = dictionary(signature, "malformed signature")?;
    let as_list = |entry: &ListEntry| match entry {
        ListEntry::InnerList(l) => Ok(l.clone()),
        ListEntry::Item(_) => Err("malformed signature-input"),
    };
    let chosen: Result<(String, InnerList), &'static str> =
        match inputs.iter().find(|(k, _)| k.as_str() == PREFERRED_LABEL) {
            Some((k, v)) => Ok((k.as_str().to_owned(), as_list(v)?)),
            None => {
                let mut first_err = None;
                let mut found = None;
                for (k, v) in &inputs {
                    let rule = as_list(v).and_then(|l| {
                        check_required(&covered(&l)?, shape)?;
                        Ok(l)
                    });
                    match rule {
                        Ok(l) => {
                            found = Some((k.as_str().to_owned(), l));
                            break;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                found.ok_or(first_err.unwrap_or("signature-input has no signature"))
            }
        };
    let (label, list) = chosen?;
    let mut input = parameters(&list)?;
    check_required(&input.components, shape)?;
    let sig = signatures
        .iter()
        .find(|(k, _)| k.as_str() == label)
        .map(|(_, v)| v)
        .ok_or("no signature for the chosen label")?;
    let bytes = match sig {
        ListEntry::Item(item) => item.bare_item.as_byte_sequence(),
        ListEntry::InnerList(_) => None,
    }
    .ok_or("malformed signature")?;
    if bytes.len() != 32 {
        return Err("malformed signature");
    }
    input.label = label;
    input.signature = bytes.to_vec();
    input.others = others(&inputs, &signatures, &input)?;
    Ok(input)
}

/// The request's signatures besides `chosen` that are in this profile, each (caller,
/// signature) once and not the chosen one's.
fn others(
    inputs: &Dictionary,
    signatures: &Dictionary,
    chosen: &SignatureInput,
) -> Result<Vec<OtherSignature>, &'static str> {
    let mut found: Vec<OtherSignature> = Vec::new();
    for (label, entry) in inputs {
        if label.as_str() == chosen.label {
            continue;
        }
        let (ListEntry::InnerList(list), Some((_, ListEntry::Item(sig)))) =
            (entry, signatures.iter().find(|(k, _)| *k == label))
        else {
            continue;
        };
        let (Ok(params), Some(bytes)) = (parameters(list), sig.bare_item.as_byte_sequence()) else {
            continue;
        };
        let other = OtherSignature {
            caller: params.caller,
            created: params.created,
            signature: bytes.to_vec(),
        };
        let same_as_chosen = other.caller == chosen.caller && other.signature == chosen.signature;
        if bytes.len() != 32 || same_as_chosen || found.contains(&other) {
            continue;
        }
        if found.len() == MAX_OTHER_SIGNATURES {
            return Err("too many signatures");
        }
        found.push(other);
    }
    Ok(found)
}

/// The signature base (RFC 9421 §2.5). `value` gives each covered component's value
/// (`None`: the request lacks it).
pub fn signature_base(
    input: &SignatureInput,
    mut value: impl FnMut(&Component) -> Option<String>,
) -> Result<String, &'static str> {
    let mut base = String::new();
    for c in &input.components {
        let v = value(c).ok_or("a covered header is missing from the request")?;
        if v.contains('\n') || v.contains('\r') {
            return Err("a covered value holds a line break");
        }
        base.push('"');
        base.push_str(c.name());
        base.push_str("\": ");
        base.push_str(&v);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(&input.params);
    Ok(base)
}

/// Check `Content-Digest` (RFC 9530) against the body: every `sha-256` / `sha-512`
/// member must match, at least one must be present; other algorithms are ignored.
pub fn check_content_digest(header: &str, body: &[u8]) -> Result<(), &'static str> {
    let dict = dictionary(header, "malformed content-digest")?;
    let mut checked = false;
    for (alg, entry) in &dict {
        let ListEntry::Item(item) = entry else {
            return Err("malformed content-digest");
        };
        let given = item
            .bare_item
            .as_byte_sequence()
            .ok_or("malformed content-digest")?;
        let ok = match alg.as_str() {
            "sha-256" => crate::crypto::ct_eq(&Sha256::digest(body), given),
            "sha-512" => crate::crypto::ct_eq(&Sha512::digest(body), given),
            _ => continue,
        };
        if !ok {
            return Err("content-digest does not match the body");
        }
        checked = true;
    }
    if checked {
        Ok(())
    } else {
        Err("content-digest has no sha-256 or sha-512 member")
    }
}

/// Whether a `Host` value (or a request's authority) is a `host[:port]` (RFC 9110
/// §7.2: a reg-name, IPv4 address or IP literal, and a port): no user info and nothing
/// of a path, query or fragment. `@target-uri` runs the scheme, the authority and the
/// target together, so a `Host` of `h/coordinator` with the target `/health` would
/// read as the same URI as `h` with `/coordinator/health`: a signature over one
/// request verified for another path.
pub fn is_authority(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// `@authority`: the Host, lower-cased, default port removed.
pub fn authority(host: &str, scheme: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    h.strip_suffix(default).map(str::to_owned).unwrap_or(h)
}

/// The signature a client would send: HMAC-SHA256 of the base (for tests and clients).
pub fn sign(secret: &str, base: &str) -> [u8; 32] {
    crate::crypto::hmac_sha256(secret.as_bytes(), base.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const BODY: Shape = Shape {
        has_body: true,
        has_query: false,
    };
    const NO_BODY: Shape = Shape {
        has_body: false,
        has_query: false,
    };

    fn sig_header(label: &str, bytes: &[u8]) -> String {
        format!(
            "{label}=:{}:",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn parses_the_profile_and_builds_the_base() {
        let input = r#"sig1=("@method" "@target-uri" "content-digest");created=1700000000;keyid="dev:2";alg="hmac-sha256";nonce="n1""#;
        let s = parse(input, &sig_header("sig1", &[7; 32]), BODY).expect("parses");
        assert_eq!(s.caller, "dev");
        assert_eq!(s.key_version, Some(2));
        assert_eq!(s.created, 1_700_000_000);
        assert_eq!(s.nonce.as_deref(), Some("n1"));
        let base = signature_base(&s, |c| {
            Some(match c {
                Component::Method => "POST".into(),
                Component::TargetUri => "http://127.0.0.1:8080/coordinator/jobs".into(),
                _ => "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:".into(),
            })
        })
        .expect("base");
        // RFC 9421 §2.5 layout, the params line being the canonical serialization.
        assert_eq!(
            base,
            "\"@method\": POST\n\
             \"@target-uri\": http://127.0.0.1:8080/coordinator/jobs\n\
             \"content-digest\": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n\
             \"@signature-params\": (\"@method\" \"@target-uri\" \"content-digest\");created=1700000000;keyid=\"dev:2\";alg=\"hmac-sha256\";nonce=\"n1\""
        );
    }

    #[test]
    fn rfc9421_appendix_b_2_5_hmac_vector() {
        // RFC 9421 B.2.5: HMAC-SHA256 over @authority, date, content-type with the
        // shared secret `test-shared-secret` (base64 below).
        let key = base64::engine::general_purpose::STANDARD
            .decode("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")
            .expect("key");
        let input = r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#;
        let signature = "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:";
        // keyid is not a caller name of ours, so parse the pieces by hand.
        let dict = dictionary(input, "x").expect("dict");
        let Some(ListEntry::InnerList(list)) = dict.values().next() else {
            panic!("list")
        };
        let params =
            FieldType::serialize(&vec![ListEntry::InnerList(list.clone())]).expect("serialize");
        let s = SignatureInput {
            label: "sig-b25".into(),
            components: covered(list).expect("components"),
            created: 1618884473,
            expires: None,
            caller: String::new(),
            key_version: None,
            nonce: None,
            params,
            signature: Vec::new(),
            others: Vec::new(),
        };
        let base = signature_base(&s, |c| {
            Some(match c.name() {
                "date" => "Tue, 20 Apr 2021 02:07:55 GMT".into(),
                "@authority" => "example.com".into(),
                "content-type" => "application/json".into(),
                _ => return None,
            })
        })
        .expect("base");
        let mac = crate::crypto::hmac_sha256(&key, base.as_bytes());
        let expected = dictionary(signature, "x").expect("sig");
        let Some(ListEntry::Item(item)) = expected.values().next() else {
            panic!("item")
        };
        assert_eq!(Some(&mac[..]), item.bare_item.as_byte_sequence());
    }

    #[test]
    fn the_required_components_rule() {
        let q = Shape {
            has_body: false,
            has_query: true,
        };
        let c = |names: &[&str]| -> Vec<Component> {
            names
                .iter()
                .map(|n| Component::parse(n).expect("name"))
                .collect()
        };
        assert!(check_required(&c(&["@method", "@target-uri"]), NO_BODY).is_ok());
        assert!(check_required(&c(&["@method", "@path"]), NO_BODY).is_ok());
        assert!(check_required(&c(&["@method", "@path"]), q).is_err());
        assert!(check_required(&c(&["@method", "@path", "@query"]), q).is_ok());
        assert!(check_required(&c(&["@target-uri"]), NO_BODY).is_err());
        assert!(check_required(&c(&["@method", "@target-uri"]), BODY).is_err());
        assert!(check_required(&c(&["@method", "@target-uri", "content-digest"]), BODY).is_ok());
    }

    #[test]
    fn refusals_name_the_rule() {
        let sig = sig_header("a", &[1; 32]);
        let p = |i: &str| parse(i, &sig, NO_BODY).err();
        assert_eq!(
            p(r#"a=("@method" "@target-uri");keyid="dev""#),
            Some("created missing")
        );
        assert_eq!(
            p(r#"a=("@method" "@target-uri");created=1"#),
            Some("keyid missing")
        );
        assert_eq!(
            p(r#"a=("@method" "@target-uri");created=1;keyid="dev";alg="rsa-pss-sha512""#),
            Some("unsupported alg")
        );
        assert_eq!(
            p(r#"a=("@method" "@target-uri");created=1;keyid="dev";foo=1"#),
            Some("unknown signature parameter")
        );
        assert_eq!(
            p(r#"a=("@method" "@request-target");created=1;keyid="dev""#),
            Some("unsupported derived component")
        );
        assert_eq!(
            p(r#"a=("@method" "@target-uri" "x";sf);created=1;keyid="dev""#),
            Some("component parameters are not supported")
        );
        assert_eq!(
            p(r#"a=("@method" "@method" "@target-uri");created=1;keyid="dev""#),
            Some("duplicate covered component")
        );
        assert_eq!(p("a=(((("), Some("malformed signature-input"));
        assert_eq!(
            p(r#"a=("@method" "@target-uri");created=1;keyid="dev:x""#),
            Some("malformed keyid")
        );
        // The signature must exist for the chosen label and be 32 bytes.
        let i = r#"b=("@method" "@target-uri");created=1;keyid="dev""#;
        assert_eq!(
            parse(i, &sig, NO_BODY).err(),
            Some("no signature for the chosen label")
        );
        assert_eq!(
            parse(i, &sig_header("b", &[1; 31]), NO_BODY).err(),
            Some("malformed signature")
        );
    }

    #[test]
    fn the_preferred_label_else_the_first_that_passes() {
        let sigs = format!(
            "{}, {}, {}",
            sig_header("x", &[1; 32]),
            sig_header("y", &[2; 32]),
            sig_header("coordinator", &[3; 32])
        );
        let input =
            r#"x=("@authority");created=1;keyid="a", y=("@method" "@path");created=1;keyid="b""#;
        let s = parse(input, &sigs, NO_BODY).expect("y passes");
        assert_eq!((s.label.as_str(), s.caller.as_str()), ("y", "b"));
        let input =
            format!(r#"{input}, coordinator=("@method" "@target-uri");created=1;keyid="c""#);
        let s = parse(&input, &sigs, NO_BODY).expect("preferred");
        assert_eq!((s.label.as_str(), s.signature[0]), ("coordinator", 3));
    }

    #[test]
    fn content_digest_known_answers_and_tampering() {
        // RFC 9530 §2: {"hello": "world"}
        let body = b"{\"hello\": \"world\"}";
        let h256 = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:";
        let h512 = "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
        assert_eq!(check_content_digest(h256, body), Ok(()));
        assert_eq!(check_content_digest(h512, body), Ok(()));
        assert_eq!(
            check_content_digest(&format!("{h256}, {h512}"), body),
            Ok(())
        );
        assert_eq!(
            check_content_digest(h256, b"{\"hello\": \"world!\"}"),
            Err("content-digest does not match the body")
        );
        assert_eq!(
            check_content_digest("md5=:AAAA:", body),
            Err("content-digest has no sha-256 or sha-512 member")
        );
        assert_eq!(
            check_content_digest("sha-256=abc", body),
            Err("malformed content-digest")
        );
    }

    #[test]
    fn the_other_signatures_in_this_profile_are_listed() {
        let sigs = format!(
            "{}, {}, {}, {}",
            sig_header("coordinator", &[3; 32]),
            sig_header("x", &[1; 32]),
            sig_header("proxy", &[2; 32]),
            sig_header("copy", &[3; 32])
        );
        let input = r#"coordinator=("@method" "@path");created=1;keyid="c", x=("@authority");created=2;keyid="a:2", proxy=("@method");created=1;keyid="p";foo=1, copy=("@method" "@path");created=1;keyid="c""#;
        let s = parse(input, &sigs, NO_BODY).expect("parses");
        // `x` covers too little to be chosen but could be another valid signature; the
        // proxy's has a parameter of another profile; `copy` is the chosen one again.
        assert_eq!(
            s.others,
            vec![OtherSignature {
                caller: "a".into(),
                created: 2,
                signature: vec![1; 32],
            }]
        );
        // At most MAX_OTHER_SIGNATURES of them.
        let labels: Vec<String> = (0..=MAX_OTHER_SIGNATURES)
            .map(|i| format!("o{i}"))
            .collect();
        let mut input = vec![r#"coordinator=("@method" "@path");created=1;keyid="c""#.to_owned()];
        let mut sigs = vec![sig_header("coordinator", &[3; 32])];
        for (i, l) in labels.iter().enumerate() {
            input.push(format!(r#"{l}=("@method");created=1;keyid="c""#));
            sigs.push(sig_header(l, &[u8::try_from(i + 10).expect("small"); 32]));
        }
        assert_eq!(
            parse(&input.join(", "), &sigs.join(", "), NO_BODY).err(),
            Some("too many signatures")
        );
        input.pop();
        sigs.pop();
        let s = parse(&input.join(", "), &sigs.join(", "), NO_BODY).expect("four");
        assert_eq!(s.others.len(), MAX_OTHER_SIGNATURES);
    }

    #[test]
    fn an_authority_holds_no_path_user_or_query() {
        for ok in [
            "example.com",
            "Example.COM:8080",
            "127.0.0.1:80",
            "[::1]:443",
            "a_b-c.d~",
        ] {
            assert!(is_authority(ok), "{ok}");
        }
        for bad in [
            "",
            "h/coordinator",
            "user@h",
            "h?x",
            "h#x",
            "a b",
            "h\\x",
            "h\"x",
        ] {
            assert!(!is_authority(bad), "{bad}");
        }
    }

    #[test]
    fn authority_is_normalised() {
        assert_eq!(authority("Example.COM:80", "http"), "example.com");
        assert_eq!(authority("example.com:443", "https"), "example.com");
        assert_eq!(authority("127.0.0.1:8080", "http"), "127.0.0.1:8080");
    }
}
