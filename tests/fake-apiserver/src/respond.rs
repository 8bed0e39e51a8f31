//! JSON responses and `Status` error documents in the shape the API server sends them.

use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use crate::body::ResponseBody;

pub(crate) fn json(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).expect("serde_json::Value always serializes");
    with_json_type(status, ResponseBody::Full(Some(Bytes::from(body))))
}

pub(crate) fn with_json_type(status: StatusCode, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A `metav1.Status` failure document.
pub(crate) fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code.as_u16(),
    })
}

pub(crate) fn error(
    code: StatusCode,
    reason: &str,
    message: impl Into<String>,
) -> Response<ResponseBody> {
    json(code, &status(code, reason, message))
}

pub(crate) fn bad_request(message: impl Into<String>) -> Response<ResponseBody> {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}
