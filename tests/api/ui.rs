//! `GET /ui/`: the dashboard's static files are open, hold no data, and come with the
//! strict headers (CSP without inline script or style, nosniff, no referrer, no store).

use crate::backend_tests;
use crate::helpers::Backend;

backend_tests!(ui_is_open_static_and_strict);

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'none'";

fn ui_is_open_static_and_strict(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    // Something a caller supplied, to show it never reaches the page itself.
    let id = app.create_job(&serde_json::json!({"kind": "secret-kind", "queue": "hidden-q"}));
    for (path, content_type) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        // No credentials at all.
        let r = app.raw("GET", path, &[], b"");
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert!(r.header("set-cookie").is_none(), "{path}");
        for data in [id.as_str(), "secret-kind", "hidden-q"] {
            assert!(!r.body.contains(data), "{path} holds data: {data}");
        }
    }
    // The page loads its script and style from files, never inline.
    let page = app.raw("GET", "/ui/", &[], b"").body;
    assert!(page.contains(r#"<script src="app.js" defer></script>"#));
    assert!(page.contains(r#"<link rel="stylesheet" href="app.css">"#));
    assert!(!page.contains("<style") && !page.contains("<script>"));
    // A wrong method is a 405, other paths under /ui/ are not served without a key.
    let r = app.raw("POST", "/ui/", &[], b"");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // HEAD answers the GET's head without its body.
    let r = app.raw("HEAD", "/ui/", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("content-security-policy"), Some(CSP));
    assert!(r.body.is_empty(), "{}", r.body);
    // `/ui` without its slash redirects to the page (a relative `Location`).
    let r = app.raw("GET", "/ui", &[], b"");
    assert_eq!(r.status, 308, "{}", r.body);
    assert_eq!(r.header("location"), Some("ui/"));
    assert_eq!(app.raw("GET", "/ui/secret", &[], b"").status, 401);
}
