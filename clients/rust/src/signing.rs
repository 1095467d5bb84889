//! Request signers: the `v1` scheme and the RFC 9421 HMAC-SHA256 profile, pure.
//!
//! `v1` (README, "Signing requests"): seven lines joined by `\n` — `v1`, METHOD, the
//! target exactly as sent, caller, timestamp, nonce (may be empty), hex SHA-256 of the
//! body — MACed with HMAC-SHA256 keyed by the UTF-8 bytes of the whole secret.
//!
//! RFC 9421: `@method`, `@target-uri` (or `@path` + `@query`), optionally
//! `@authority`, and `content-digest` (RFC 9530) whenever there is a body;
//! `keyid` = `CALLER` or `CALLER:VERSION`, `alg="hmac-sha256"`, the same key bytes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

pub const HEADER_CALLER: &str = "X-Coordinator-Caller";
pub const HEADER_TIMESTAMP: &str = "X-Coordinator-Timestamp";
pub const HEADER_NONCE: &str = "X-Coordinator-Nonce";
pub const HEADER_KEY_VERSION: &str = "X-Coordinator-Key-Version";
pub const HEADER_SIGNATURE: &str = "X-Coordinator-Signature";

/// A header name and value to send.
pub type Header = (String, String);

pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// 32 random hex characters.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Unix seconds now, as sent in `X-Coordinator-Timestamp`.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- v1 -----------------------------------------------------------------------------

/// The `v1` signed string; `nonce` is `""` when none is sent.
pub fn canonical_v1(
    method: &str,
    target: &str,
    caller: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> String {
    // One allocation, sized up front: this runs once per request.
    let mut out = String::with_capacity(
        3 + method.len() + target.len() + caller.len() + timestamp.len() + nonce.len() + 5 + 64,
    );
    out.push_str("v1\n");
    out.extend(method.chars().map(|c| c.to_ascii_uppercase()));
    for part in [target, caller, timestamp, nonce] {
        out.push('\n');
        out.push_str(part);
    }
    out.push('\n');
    out.push_str(&hex::encode(Sha256::digest(body)));
    out
}

/// Lower-case hex HMAC-SHA256 of `canonical`, keyed by the UTF-8 secret string.
pub fn sign_v1(secret: &str, canonical: &str) -> String {
    hex::encode(hmac_sha256(secret.as_bytes(), canonical.as_bytes()))
}

/// The inputs of one `v1` signature that do not come from the request. Its `Debug`
/// never shows the secret.
#[derive(Clone)]
pub struct V1Params<'a> {
    pub caller: &'a str,
    pub secret: &'a str,
    pub key_version: Option<u32>,
    pub timestamp: &'a str,
    /// `""`: no nonce.
    pub nonce: &'a str,
}

impl std::fmt::Debug for V1Params<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V1Params")
            .field("caller", &self.caller)
            .field("secret", &format_args!(".."))
            .field("key_version", &self.key_version)
            .field("timestamp", &self.timestamp)
            .field("nonce", &self.nonce)
            .finish()
    }
}

/// The names of the `v1` signed string's seven lines, in order (as the server's 401
/// `canonical` lists them).
pub const V1_COMPONENTS: [&str; 7] = [
    "version",
    "method",
    "target",
    "caller",
    "timestamp",
    "nonce",
    "body_sha256",
];

/// One `v1` signature: the headers to send and the string they sign.
#[derive(Clone, Debug)]
pub struct V1Signature {
    /// In the order caller, timestamp, nonce (if any), key version (if any), signature.
    pub headers: Vec<Header>,
    pub canonical: String,
}

impl V1Signature {
    /// `(name, value)` per line of the signed string (see [`V1_COMPONENTS`]).
    pub fn components(&self) -> Vec<(&'static str, &str)> {
        V1_COMPONENTS
            .iter()
            .copied()
            .zip(self.canonical.split('\n'))
            .collect()
    }
}

/// The `X-Coordinator-*` headers for one request, in a fixed order.
pub fn v1_headers(method: &str, target: &str, body: &[u8], p: &V1Params<'_>) -> Vec<Header> {
    v1_sign(method, target, body, p).headers
}

/// Sign one request with `v1`: the headers and the signed string.
pub fn v1_sign(method: &str, target: &str, body: &[u8], p: &V1Params<'_>) -> V1Signature {
    let canonical = canonical_v1(method, target, p.caller, p.timestamp, p.nonce, body);
    let mut h = Vec::with_capacity(5);
    h.push((HEADER_CALLER.to_owned(), p.caller.to_owned()));
    h.push((HEADER_TIMESTAMP.to_owned(), p.timestamp.to_owned()));
    if !p.nonce.is_empty() {
        h.push((HEADER_NONCE.to_owned(), p.nonce.to_owned()));
    }
    if let Some(v) = p.key_version {
        h.push((HEADER_KEY_VERSION.to_owned(), v.to_string()));
    }
    h.push((HEADER_SIGNATURE.to_owned(), sign_v1(p.secret, &canonical)));
    V1Signature {
        headers: h,
        canonical,
    }
}

// ---- RFC 9421 -----------------------------------------------------------------------

/// The RFC 9530 digest algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DigestAlg {
    #[default]
    Sha256,
    Sha512,
}

impl DigestAlg {
    pub fn name(self) -> &'static str {
        match self {
            DigestAlg::Sha256 => "sha-256",
            DigestAlg::Sha512 => "sha-512",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha-256" => Some(DigestAlg::Sha256),
            "sha-512" => Some(DigestAlg::Sha512),
            _ => None,
        }
    }
}

/// A `Content-Digest` value, e.g. `sha-256=:base64:`.
pub fn content_digest(body: &[u8], alg: DigestAlg) -> String {
    let digest = match alg {
        DigestAlg::Sha256 => STANDARD.encode(Sha256::digest(body)),
        DigestAlg::Sha512 => STANDARD.encode(Sha512::digest(body)),
    };
    format!("{}=:{digest}:", alg.name())
}

/// Why a component could not be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningError(pub String);

impl std::fmt::Display for SigningError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SigningError {}

fn sf_string(s: &str) -> Result<String, SigningError> {
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(SigningError(format!(
            "not a structured-field string: {s:?}"
        )));
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// The parts of an absolute `http(s)://authority/path?query` URL, as spelled.
struct UrlParts<'a> {
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

fn split_url(url: &str) -> Result<UrlParts<'_>, SigningError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| SigningError(format!("not an absolute URL: {url}")))?;
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_query) = rest.split_at(end);
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    Ok(UrlParts {
        scheme,
        authority,
        path: if path.is_empty() { "/" } else { path },
        query,
    })
}

/// The value of one covered component (RFC 9421 section 2). `headers` are the request's
/// header fields (name matched case-insensitively).
pub fn component_value(
    name: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<String, SigningError> {
    let u = split_url(url)?;
    Ok(match name {
        "@method" => method.to_ascii_uppercase(),
        "@target-uri" => {
            let query = u.query.map(|q| format!("?{q}")).unwrap_or_default();
            format!("{}://{}{}{query}", u.scheme, u.authority, u.path)
        }
        "@authority" => {
            let hostport = u.authority.rsplit('@').next().unwrap_or(u.authority);
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, Some(p)),
                _ => (hostport, None),
            };
            let default = match u.scheme.to_ascii_lowercase().as_str() {
                "http" => Some("80"),
                "https" => Some("443"),
                _ => None,
            };
            match port {
                Some(p) if Some(p) != default && !p.is_empty() => {
                    format!("{}:{p}", host.to_ascii_lowercase())
                }
                _ => host.to_ascii_lowercase(),
            }
        }
        "@path" => u.path.to_owned(),
        "@query" => format!("?{}", u.query.unwrap_or_default()),
        n if n.starts_with('@') => {
            return Err(SigningError(format!("unsupported derived component {n}")))
        }
        n => headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.trim().to_owned())
            .ok_or_else(|| SigningError(format!("covered header {n} is not in the request")))?,
    })
}

/// The `@signature-params` inputs.
#[derive(Clone, Debug, Default)]
pub struct SignatureParams<'a> {
    pub created: i64,
    pub keyid: &'a str,
    /// `Some("hmac-sha256")` normally; `None` leaves `alg` out.
    pub alg: Option<&'a str>,
    pub expires: Option<i64>,
    pub nonce: Option<&'a str>,
}

/// `("c1" "c2");created=…;keyid="…";alg="…";expires=…;nonce="…"`.
pub fn signature_params(
    components: &[&str],
    p: &SignatureParams<'_>,
) -> Result<String, SigningError> {
    let list: Result<Vec<String>, _> = components.iter().map(|c| sf_string(c)).collect();
    let mut out = format!(
        "({});created={};keyid={}",
        list?.join(" "),
        p.created,
        sf_string(p.keyid)?
    );
    if let Some(alg) = p.alg {
        out.push_str(&format!(";alg={}", sf_string(alg)?));
    }
    if let Some(e) = p.expires {
        out.push_str(&format!(";expires={e}"));
    }
    if let Some(n) = p.nonce {
        out.push_str(&format!(";nonce={}", sf_string(n)?));
    }
    Ok(out)
}

/// The signature base: a `"name": value` line per component, then
/// `"@signature-params"`; no trailing newline.
pub fn signature_base(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    components: &[&str],
    params: &str,
) -> Result<String, SigningError> {
    let mut lines = Vec::with_capacity(components.len() + 1);
    for c in components {
        lines.push(format!(
            "{}: {}",
            sf_string(c)?,
            component_value(c, method, url, headers)?
        ));
    }
    lines.push(format!("\"@signature-params\": {params}"));
    Ok(lines.join("\n"))
}

/// Base64 HMAC-SHA256 of the signature base.
pub fn sign_rfc9421(key: &[u8], base: &str) -> String {
    STANDARD.encode(hmac_sha256(key, base.as_bytes()))
}

/// How an RFC 9421 signature covers a request.
#[derive(Clone, Debug)]
pub struct Rfc9421Options {
    pub label: String,
    /// `@path` (+ `@query` when there is one) instead of `@target-uri`.
    pub use_path: bool,
    /// Cover `@authority` too.
    pub authority: bool,
    pub digest: DigestAlg,
}

impl Default for Rfc9421Options {
    fn default() -> Self {
        Rfc9421Options {
            label: "sig1".to_owned(),
            use_path: false,
            authority: false,
            digest: DigestAlg::Sha256,
        }
    }
}

/// `Content-Digest` (with a body), `Signature-Input` and `Signature` for a request.
pub fn rfc9421_headers(
    method: &str,
    url: &str,
    body: &[u8],
    key: &[u8],
    params: &SignatureParams<'_>,
    opts: &Rfc9421Options,
) -> Result<Vec<Header>, SigningError> {
    let mut components = vec!["@method"];
    if opts.authority {
        components.push("@authority");
    }
    if opts.use_path {
        components.push("@path");
        if split_url(url)?.query.is_some() {
            components.push("@query");
        }
    } else {
        components.push("@target-uri");
    }
    let mut out = Vec::new();
    let digest = (!body.is_empty()).then(|| content_digest(body, opts.digest));
    let mut fields: Vec<(&str, &str)> = Vec::new();
    if let Some(d) = &digest {
        components.push("content-digest");
        fields.push(("content-digest", d));
        out.push(("Content-Digest".to_owned(), d.clone()));
    }
    let sp = signature_params(&components, params)?;
    let base = signature_base(method, url, &fields, &components, &sp)?;
    out.push(("Signature-Input".to_owned(), format!("{}={sp}", opts.label)));
    out.push((
        "Signature".to_owned(),
        format!("{}=:{}:", opts.label, sign_rfc9421(key, &base)),
    ));
    Ok(out)
}

// ---- credentials ----------------------------------------------------------------------

/// `value` when it can be sent as a header value as it is; else an error naming `what`
/// but never showing the value (ureq's own error holds the whole header line: a key
/// read from a file with its trailing newline would be in the message).
fn header_value(what: &str, value: &str) -> Result<String, SigningError> {
    let printable = value
        .bytes()
        .all(|b| b == b'\t' || (0x20..=0x7e).contains(&b));
    if !printable || value.trim_matches([' ', '\t']) != value {
        return Err(SigningError(format!(
            "{what} is not a valid HTTP header value (a line break, a control or \
             non-ASCII character, or surrounding whitespace)"
        )));
    }
    Ok(value.to_owned())
}

/// How a client authenticates.
#[derive(Clone)]
pub enum Credentials {
    /// `v1` signatures.
    V1 {
        caller: String,
        secret: String,
        key_version: Option<u32>,
    },
    /// RFC 9421 HMAC-SHA256 signatures with `Content-Digest`.
    Rfc9421 {
        caller: String,
        secret: String,
        key_version: Option<u32>,
        options: Rfc9421Options,
    },
    /// `X-API-Key`.
    ApiKey(String),
    /// `Authorization: Bearer` with a job token.
    Bearer(String),
    /// Nothing (the open routes).
    None,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::V1 { caller, .. } => write!(f, "V1 {{ caller: {caller:?}, .. }}"),
            Credentials::Rfc9421 { caller, .. } => {
                write!(f, "Rfc9421 {{ caller: {caller:?}, .. }}")
            }
            Credentials::ApiKey(_) => f.write_str("ApiKey(..)"),
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
            Credentials::None => f.write_str("None"),
        }
    }
}

impl Credentials {
    /// The headers that authenticate one request, signed now with a fresh nonce.
    /// `url` is the absolute URL and `target` its path and `?query`, as sent.
    pub fn headers(
        &self,
        method: &str,
        url: &str,
        target: &str,
        body: &[u8],
    ) -> Result<Vec<Header>, SigningError> {
        Ok(match self {
            Credentials::V1 {
                caller,
                secret,
                key_version,
            } => {
                let ts = now_secs().to_string();
                let nonce = new_nonce();
                let p = V1Params {
                    caller,
                    secret,
                    key_version: *key_version,
                    timestamp: &ts,
                    nonce: &nonce,
                };
                v1_headers(method, target, body, &p)
            }
            Credentials::Rfc9421 {
                caller,
                secret,
                key_version,
                options,
            } => {
                let keyid = match key_version {
                    Some(v) => format!("{caller}:{v}"),
                    None => caller.clone(),
                };
                let nonce = new_nonce();
                let p = SignatureParams {
                    created: now_secs(),
                    keyid: &keyid,
                    alg: Some("hmac-sha256"),
                    expires: None,
                    nonce: Some(&nonce),
                };
                rfc9421_headers(method, url, body, secret.as_bytes(), &p, options)?
            }
            Credentials::ApiKey(k) => {
                vec![("X-API-Key".to_owned(), header_value("the API key", k)?)]
            }
            Credentials::Bearer(t) => vec![(
                "Authorization".to_owned(),
                format!("Bearer {}", header_value("the job token", t)?),
            )],
            Credentials::None => Vec::new(),
        })
    }
}
