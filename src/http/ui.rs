//! `GET /ui/`: the operator dashboard. Three hand-written static files (`ui/` at the
//! repository root) compiled into the binary; no build step, no framework, nothing
//! fetched at run time. The page is open but holds no data: the operator pastes an API
//! key, which the page keeps in `sessionStorage` and sends as `X-API-Key` (no cookies,
//! so no CSRF). Every response carries a strict CSP: no inline script or style, and
//! `connect-src 'self'` so the key can only go back to this origin.

use actix_web::http::header::{self, HeaderValue};
use actix_web::HttpResponse;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// The `Content-Security-Policy` of every `/ui/` response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'none'";

/// A static file with the strict headers.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static(content_type)))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .insert_header((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .insert_header((
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .body(body)
}

/// `GET /ui`: a permanent redirect to `/ui/`, whose relative links the page needs. The
/// `Location` is relative (`ui/`), so it holds behind a proxy that adds a path prefix.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "ui",
    operation_id = "uiRedirect",
    summary = "Redirect to the dashboard",
    responses(
        (status = 308, description = "`Location: ui/`, which resolves to `/ui/`."),
    ),
)]
pub async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, HeaderValue::from_static("ui/")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .finish()
}

/// `GET /ui/`: the dashboard page.
#[utoipa::path(
    get,
    path = "/ui/",
    tag = "ui",
    operation_id = "uiIndex",
    summary = "The operator dashboard (HTML)",
    description = "A static page compiled into the binary; it holds no data. The \
        operator pastes an API key, kept in `sessionStorage` and sent as `X-API-Key` to \
        the API routes; its scopes decide what the page shows and offers.",
    responses(
        (status = 200, description = "The page.", body = String,
            content_type = "text/html; charset=utf-8"),
    ),
)]
pub async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`: the dashboard's script.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "ui",
    operation_id = "uiScript",
    summary = "The dashboard's script",
    responses(
        (status = 200, description = "JavaScript.", body = String,
            content_type = "text/javascript; charset=utf-8"),
    ),
)]
pub async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`: the dashboard's style sheet.
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "ui",
    operation_id = "uiStyle",
    summary = "The dashboard's style sheet",
    responses(
        (status = 200, description = "CSS.", body = String,
            content_type = "text/css; charset=utf-8"),
    ),
)]
pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_inline_script_or_style() {
        assert!(INDEX_HTML.contains(r#"<script src="app.js" defer></script>"#));
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("<style"));
        assert!(!INDEX_HTML.contains("style="));
        // No inline event handler attributes (`onclick=` and the like).
        for word in INDEX_HTML.split(|c: char| c.is_whitespace() || c == '<') {
            assert!(!(word.starts_with("on") && word.contains('=')), "{word}");
        }
        // The script builds DOM nodes; it never parses strings as HTML.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(sink), "{sink}");
        }
    }
}
