//! `GET /openapi.json` against the app itself: every error response is problem+json, and
//! real responses have the documented shape. (That the document lists exactly the
//! routes of `http::routes::ROUTES` with the access each requires is checked without a
//! server, by the unit tests in src/http/openapi.rs.)

use std::collections::BTreeSet;

use coordinator::auth::Access;
use coordinator::http::routes::ROUTES;
use serde_json::{json, Map, Value};

use crate::backend_tests;
use crate::helpers::{Backend, TestApp};

// The document's own checks (every route listed with its access, and nothing else)
// need no database: they are unit tests in src/http/openapi.rs.
backend_tests!(
    error_responses_are_problem_json,
    responses_have_the_documented_fields,
);

/// The document, fetched without credentials (it is an open route).
fn document(app: &TestApp) -> Value {
    let r = app.raw("GET", "/openapi.json", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    doc
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    op
}

/// Follow a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling {r}"));
            resolve(doc, target)
        }
        None => v,
    }
}

fn error_responses_are_problem_json(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let doc = document(&app);
    let problem = &doc["components"]["schemas"]["Problem"];
    let mut required: Vec<&str> = problem["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    required.sort_unstable();
    assert_eq!(required, ["detail", "status", "title", "type"]);
    let props = problem["properties"].as_object().expect("properties");
    for optional in ["field", "reason", "server_time", "canonical"] {
        assert!(props.contains_key(optional), "Problem.{optional}");
    }

    for r in ROUTES.iter().filter(|r| r.access != Access::Open) {
        let op = operation(&doc, r.method, r.path);
        for (status, response) in op["responses"].as_object().expect("responses") {
            let code: u16 = status.parse().expect("numeric status");
            let response = resolve(&doc, response);
            let content = response["content"].as_object();
            if code < 400 {
                continue;
            }
            let content = content.unwrap_or_else(|| panic!("{} {status}: no body", r.path));
            assert_eq!(
                content.keys().collect::<Vec<_>>(),
                ["application/problem+json"],
                "{} {} {status}",
                r.method,
                r.path
            );
            assert_eq!(
                content["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem"
            );
        }
    }

    // And the server agrees: a real 401 and 404 read as the Problem schema says.
    let p = app.raw("GET", "/coordinator/health", &[], b"").problem(401);
    assert_fields_documented(&doc, "Problem", p.as_object().expect("object"));
    let path = format!("/coordinator/jobs/{}", uuid::Uuid::now_v7());
    let p = app.get(&path).problem(404);
    assert_fields_documented(&doc, "Problem", p.as_object().expect("object"));
}

/// Every field of `body` is a property of the schema, and every required property is
/// present.
fn assert_fields_documented(doc: &Value, schema: &str, body: &Map<String, Value>) {
    let s = resolve(doc, &doc["components"]["schemas"][schema]);
    let (props, required) = properties(doc, s);
    for key in body.keys() {
        assert!(props.contains(key), "{schema}: undocumented field {key}");
    }
    for key in &required {
        assert!(
            body.contains_key(key),
            "{schema}: required field {key} missing"
        );
    }
}

/// The properties and required properties of an object schema (following `allOf`).
fn properties(doc: &Value, s: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut props = BTreeSet::new();
    let mut required = BTreeSet::new();
    for part in s["allOf"].as_array().into_iter().flatten() {
        let (p, r) = properties(doc, resolve(doc, part));
        props.extend(p);
        required.extend(r);
    }
    if let Some(p) = s["properties"].as_object() {
        props.extend(p.keys().cloned());
    }
    if let Some(r) = s["required"].as_array() {
        required.extend(r.iter().filter_map(Value::as_str).map(str::to_owned));
    }
    (props, required)
}

fn responses_have_the_documented_fields(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let doc = document(&app);
    let obj = |v: &Value| v.as_object().expect("object").clone();

    // Created (PENDING, nulls), then read back with its events.
    let id = app.create_job(&json!({"kind": "build", "queue": "oa"}));
    let job = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_fields_documented(&doc, "JobView", &obj(&job));
    for e in job["events"].as_array().expect("events") {
        assert_fields_documented(&doc, "EventView", &obj(e));
    }

    // Claimed: the job plus its token.
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.post_json("/coordinator/queues/oa/claim", &json!({"worker": "w1"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_documented(&doc, "ClaimedJob", &obj(&r.json()));

    // Dispatched, health, revocation.
    let r = app.post_json(
        "/stitcher/dispatch",
        &json!({"issueNumber": 7, "repository": "octo/widgets"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_fields_documented(&doc, "DispatchResult", &obj(&r.json()));
    let r = app.get("/coordinator/health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_documented(&doc, "HealthReport", &obj(&r.json()));
    assert_fields_documented(&doc, "DatabaseHealth", &obj(&r.json()["database"]));
    let r = app.post_json("/admin/tokens/revoke", &json!({"jti": "some-jti"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_documented(&doc, "TokenRevoked", &obj(&r.json()));

    // The status enum is the one the server writes.
    let statuses = doc["components"]["schemas"]["JobStatus"]["enum"]
        .as_array()
        .expect("enum");
    assert!(statuses.contains(&job["status"]), "{}", job["status"]);
}
