//! A scripted fake API server for tests: every request a client makes is
//! taken in order, checked, and answered as a real API server would.

#![allow(dead_code)]

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

/// The server side of a fake API server.
pub struct Fake(Handle<Request<Body>, Response<Body>>);

/// A client talking to a new fake API server, and the server.
pub fn fake_api() -> (Client, Fake) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), Fake(handle))
}

/// One request taken from the client, waiting for its answer.
pub struct Call {
    /// Method, URI and headers.
    pub request: Request<()>,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    /// The query string of the request.
    pub fn query(&self) -> &str {
        self.request.uri().query().unwrap_or_default()
    }

    /// Answers 200 with `body`.
    pub fn reply(self, body: &Value) {
        self.reply_with(200, body);
    }

    /// Answers 200 with the request's own body (what create, apply and
    /// replace return, less server-side fields).
    pub fn echo(self) -> Value {
        let body = self.body.clone();
        self.reply(&body);
        body
    }

    /// Answers `code` with `body`.
    pub fn reply_with(self, code: u16, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(bytes))
                .expect("response"),
        );
    }

    /// Answers 404 Not Found.
    pub fn not_found(self) {
        self.reply_with(
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        );
    }
}

impl Fake {
    /// The next request, checked for method and path (query left out).
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let (request, send) = self.0.next_request().await.expect("a request");
        let (parts, body) = request.into_parts();
        assert_eq!(
            (&parts.method, parts.uri.path()),
            (&method, path),
            "unexpected request {} {}",
            parts.method,
            parts.uri
        );
        let bytes = body.collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        Call {
            request: Request::from_parts(parts, ()),
            body,
            send,
        }
    }

    /// Expects a forced server-side apply of `path` by the operator and
    /// echoes the object back.
    pub async fn expect_apply(&mut self, path: &str) -> Value {
        let call = self.expect(Method::PATCH, path).await;
        let query = call.query().to_owned();
        assert!(
            query.contains("fieldManager=pipewright-operator") && query.contains("force=true"),
            "{path}: not a forced apply: {query}"
        );
        assert_eq!(
            call.request.headers()["content-type"],
            "application/apply-patch+yaml",
            "{path}"
        );
        call.echo()
    }

    /// Expects a GET of `path` and answers with `object`, or 404 for `None`.
    pub async fn expect_get(&mut self, path: &str, object: Option<Value>) {
        let call = self.expect(Method::GET, path).await;
        match object {
            Some(object) => call.reply(&object),
            None => call.not_found(),
        }
    }

    /// Expects a list of `path` selected by `selector` and answers `items`.
    pub async fn expect_list(&mut self, path: &str, selector: &str, kind: &str, items: Vec<Value>) {
        let call = self.expect(Method::GET, path).await;
        let wanted = format!("labelSelector={}", encode(selector));
        assert!(call.query().contains(&wanted), "{path}: {}", call.query());
        call.reply(&json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items}));
    }

    /// Expects a creation at `path` and echoes it; returns the object.
    pub async fn expect_create(&mut self, path: &str) -> Value {
        self.expect(Method::POST, path).await.echo()
    }

    /// Expects a deletion of `path` and answers with a Status.
    pub async fn expect_delete(&mut self, path: &str) -> Value {
        let call = self.expect(Method::DELETE, path).await;
        let body = call.body.clone();
        call.reply(
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
        body
    }

    /// Expects an event about the run and returns (type, reason, note,
    /// name of the related object or "").
    pub async fn expect_event(&mut self) -> (String, String, String, String) {
        let body = self
            .expect_create("/apis/events.k8s.io/v1/namespaces/ml/events")
            .await;
        assert_eq!(body["regarding"]["kind"], "TrainingRun");
        assert_eq!(body["regarding"]["name"], "demo");
        (
            body["type"].as_str().unwrap_or_default().to_owned(),
            body["reason"].as_str().unwrap_or_default().to_owned(),
            body["note"].as_str().unwrap_or_default().to_owned(),
            body["related"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    /// Expects no further request: the client side is gone.
    pub async fn expect_nothing_more(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// `selector` as it appears in a query string.
fn encode(selector: &str) -> String {
    selector
        .replace('/', "%2F")
        .replace('=', "%3D")
        .replace(',', "%2C")
}
