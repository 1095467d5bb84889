//! `GET /openapi.json` against the app itself: the document lists exactly the routes of
//! `startup::ROUTES` (method + pattern, both directions) with the access each requires,
//! every error response is problem+json, and real responses have the documented shape.

use std::collections::BTreeSet;

use coordinator::auth::Access;
use coordinator::auth::Scope;
use coordinator::startup::ROUTES;
use serde_json::{json, Map, Value};

use crate::backend_tests;
use crate::helpers::{Backend, TestApp};

backend_tests!(
    document_lists_every_registered_route,
    operations_require_the_routes_access,
    error_responses_are_problem_json,
    responses_have_the_documented_fields,
);

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

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

/// (METHOD, path pattern) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
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

fn document_lists_every_registered_route(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let doc = document(&app);
    let registered: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let documented = documented(&doc);
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unregistered: Vec<_> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty(),
        "registered routes missing from the document: {undocumented:?}"
    );
    assert!(
        unregistered.is_empty(),
        "documented operations that no route serves: {unregistered:?}"
    );
    // Operation ids are unique, and every `{param}` of a pattern is a path parameter.
    let mut ids = BTreeSet::new();
    for r in ROUTES {
        let op = operation(&doc, r.method, r.path);
        let id = op["operationId"].as_str().expect("operationId");
        assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
        let params: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| resolve(&doc, p))
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str())
            .collect();
        let in_pattern: BTreeSet<&str> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(
            params, in_pattern,
            "path parameters of {} {}",
            r.method, r.path
        );
    }
}

fn operations_require_the_routes_access(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let doc = document(&app);
    assert!(
        doc.get("security").is_none(),
        "no document-wide requirement"
    );
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    for name in ["hmac", "apiKey", "bearer", "standardWebhooks", "mutualTLS"] {
        assert!(schemes.contains_key(name), "security scheme {name}");
    }
    assert_eq!(schemes["hmac"]["in"], "header");
    assert_eq!(schemes["hmac"]["name"], "X-Coordinator-Signature");
    assert_eq!(schemes["apiKey"]["name"], "X-API-Key");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["standardWebhooks"]["name"], "webhook-signature");
    assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");

    for r in ROUTES {
        let op = operation(&doc, r.method, r.path);
        let requirements = op["security"].as_array().cloned().unwrap_or_default();
        let Access::Scope(scope) = r.access else {
            assert!(
                requirements.is_empty(),
                "open route {} {} lists security",
                r.method,
                r.path
            );
            continue;
        };
        let mut names = BTreeSet::new();
        for req in &requirements {
            let req = req.as_object().expect("requirement");
            assert_eq!(req.len(), 1, "one scheme per alternative: {req:?}");
            for (name, scopes) in req {
                assert!(schemes.contains_key(name), "unknown scheme {name}");
                assert_eq!(
                    scopes,
                    &json!([scope.as_str()]),
                    "{} {} requires {}",
                    r.method,
                    r.path,
                    scope.as_str()
                );
                names.insert(name.as_str());
            }
        }
        assert!(
            names.contains("hmac") && names.contains("apiKey") && names.contains("mutualTLS"),
            "{}",
            r.path
        );
        // Job tokens carry jobs:read / jobs:update only; Standard Webhooks is accepted
        // on the webhook route only.
        if names.contains("bearer") {
            assert!(
                matches!(scope, Scope::JobsRead | Scope::JobsUpdate),
                "{}",
                r.path
            );
        }
        assert_eq!(
            names.contains("standardWebhooks"),
            r.accepts_webhooks(),
            "{}",
            r.path
        );
        let responses = op["responses"].as_object().expect("responses");
        for status in ["401", "403", "429", "503"] {
            assert!(
                responses.contains_key(status),
                "{} {} documents no {status}",
                r.method,
                r.path
            );
        }
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
