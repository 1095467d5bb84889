//! Request extractors that turn actix's rejections into our problem+json errors.

use std::future::Future;
use std::pin::Pin;

use actix_web::http::header::HeaderValue;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The query string's parameters, each named in `known` and given at most once (400
/// naming the parameter otherwise: a hostile or confused client must not get one of
/// two values silently). Returns the value of each known parameter that was given.
pub fn query_params<'k>(
    req: &HttpRequest,
    known: &[&'k str],
) -> Result<Vec<(&'k str, String)>, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("query", format!("malformed query string ({e})")))?
        .into_inner();
    let mut out: Vec<(&'k str, String)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let Some(name) = known.iter().find(|n| **n == k) else {
            let detail = if known.is_empty() {
                "unknown query parameter (this route takes none)".to_owned()
            } else {
                format!("unknown query parameter (known: {})", known.join(", "))
            };
            return Err(ApiError::bad_request(k, detail));
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(ApiError::bad_request(k, "given more than once"));
        }
        out.push((name, v));
    }
    Ok(out)
}

/// A request header given at most once (400 naming it otherwise: two values, from a
/// proxy that appends one, would leave which one counts to chance).
pub fn single_header<'r>(
    req: &'r HttpRequest,
    name: &str,
    field: &'static str,
) -> Result<Option<&'r HeaderValue>, ApiError> {
    let mut values = req.headers().get_all(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(field, "given more than once"));
    }
    Ok(first)
}

/// A JSON body, read up to the configured body limit (413 above it) and deserialized
/// with the path of the failing field, so a 400 names it. An empty body reads as `{}`
/// when `T` allows it.
pub struct JsonBody<T>(pub T);

/// Deserialize JSON bytes, naming the failing field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request("body", "must be UTF-8"));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request("body", "must be a JSON object"));
    }
    // A raw NUL is never valid JSON, and PostgreSQL text cannot hold one: say so plainly.
    // (An escaped `\u0000` is JSON; fields that reach a text column reject it by name.)
    if bytes.contains(&0) {
        return Err(ApiError::bad_request(
            "body",
            "must not contain NUL characters",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let malformed = inner.is_syntax() || inner.is_eof();
        let field = if malformed {
            "body".to_owned()
        } else if path != "." && !path.is_empty() {
            path
        } else if let Some(name) = missing_field(&inner.to_string()) {
            name
        } else {
            "body".to_owned()
        };
        let detail = if malformed {
            "malformed JSON".to_owned()
        } else {
            // serde messages describe the expected shape; strip the trailing position
            // (" at line N column M") only, never text from the client's own keys.
            strip_position(&inner.to_string()).to_owned()
        };
        ApiError::bad_request(field, detail)
    })?;
    // Nothing may follow the object but whitespace.
    de.end().map_err(|e| {
        ApiError::bad_request(
            "body",
            format!("unexpected data after the JSON object ({e})"),
        )
    })?;
    Ok(value)
}

fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i)
            if msg[i + " at line ".len()..]
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            &msg[..i]
        }
        _ => msg,
    }
}

fn missing_field(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("missing field `")
        .or_else(|| msg.strip_prefix("unknown field `"))?;
    rest.split('`').next().map(str::to_owned)
}

/// The raw request body, bounded by the body limit (413 above it).
pub struct RawBody(pub web::Bytes);

impl FromRequest for RawBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            bytes.await.map(RawBody).map_err(|e| {
                if e.as_response_error().status_code()
                    == actix_web::http::StatusCode::PAYLOAD_TOO_LARGE
                {
                    ApiError::TooLarge
                } else {
                    ApiError::bad_request("body", "could not read the request body")
                }
            })
        })
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = RawBody::from_request(req, payload);
        Box::pin(async move { parse_json(&body.await?.0).map(JsonBody) })
    }
}

/// The `{id}` path parameter of the job routes.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
pub struct JobIdParam(
    /// The job id (a UUID).
    #[param(format = "uuid")]
    pub String,
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "the fields exist to be deserialized, never read")]
    struct T {
        a: i32,
        b: Option<String>,
    }

    fn field_of(body: &str) -> String {
        match parse_json::<T>(body.as_bytes()) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn names_the_field() {
        assert_eq!(field_of(r#"{"a":"x"}"#), "a");
        assert_eq!(field_of(r#"{"b":"x"}"#), "a");
        assert_eq!(field_of(r#"{"a":1,"c":2}"#), "c");
        assert_eq!(field_of(r#"{"a":1,"b":7}"#), "b");
        assert_eq!(field_of(r#"{"a":"#), "body");
        assert_eq!(field_of("[1,2]"), "body");
    }

    #[test]
    fn only_the_trailing_position_is_stripped() {
        assert_eq!(
            strip_position("unknown field `a` at line 1 column 5"),
            "unknown field `a`"
        );
        assert_eq!(
            strip_position("unknown field `x at line 9` at line 1 column 14"),
            "unknown field `x at line 9`"
        );
        assert_eq!(strip_position("no position here"), "no position here");
    }

    #[test]
    fn empty_body_is_an_empty_object() {
        assert_eq!(field_of(""), "a");
    }
}
