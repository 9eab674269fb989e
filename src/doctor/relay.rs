//! A running relay's own view (`--relay-url`): its `/healthz` says whether
//! it LISTENs, can read the log and has its token keys, and why not.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Check;

const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `/healthz` could not be read.
#[derive(Debug, thiserror::Error)]
enum HealthzError {
    #[error("{0:?} is not a URL like http://host:8080: {1}")]
    Url(String, #[source] hyper::http::uri::InvalidUri),
    #[error("{0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error("reading the answer: {0}")]
    Body(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn get(url: &str) -> Result<(u16, serde_json::Value), HealthzError> {
    let full = format!("{}/healthz", url.trim_end_matches('/'));
    let uri: hyper::Uri = full
        .parse()
        .map_err(|e| HealthzError::Url(url.to_string(), e))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let answer = async {
        let response = client.get(uri).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, HealthzError>((
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        ))
    };
    tokio::time::timeout(HEALTHZ_TIMEOUT, answer)
        .await
        .map_err(|_| HealthzError::Timeout(HEALTHZ_TIMEOUT))?
}

pub(super) async fn check(url: &str) -> Check {
    match get(url).await {
        Ok((200, body)) if body["listening"] == true => Check::ok(
            "relay",
            format!("{url}/healthz: listening, log reads working"),
        ),
        Ok((status, body)) => {
            let reason = body["reason"]
                .as_str()
                .or(body["message"].as_str())
                .unwrap_or("no reason given");
            Check::fail(
                "relay",
                format!("{url}/healthz answers {status}: {reason}"),
                "see the reason above and the relay's log; the checks above name the usual causes",
            )
        }
        Err(e) => Check::fail(
            "relay",
            format!("cannot read {url}/healthz: {e}", e = super::why(&e)),
            "check --relay-url (the relay's PGRELAY_LISTEN address) and that the relay runs",
        ),
    }
}
