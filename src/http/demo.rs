//! The demo chat page served at `/`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::Response;

use crate::http::response::Body;

/// The demo chat page: a complete client in one file (history over HTTP,
/// live events over the WebSocket, resume with since_seq; who is online
/// and who is typing, with presence and broadcasts).
pub fn page() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(include_bytes!("demo.html"))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
