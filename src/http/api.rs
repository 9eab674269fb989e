//! The chat HTTP API under `/v1`: a thin JSON layer over the `chat` SQL
//! functions, for browsers, which cannot write to Postgres.
//!
//! Every rule lives in SQL (membership, idempotency, compare-and-swap,
//! limits); this module only maps requests to function calls and SQLSTATEs
//! to statuses. Rows are rendered by `to_jsonb` in SQL, the same rendering
//! as the `data` of event frames, so a message looks the same over HTTP and
//! over the WebSocket. Writes through here and writes by psql are the same
//! function calls, so subscribers cannot tell them apart.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use crate::auth::{AuthError, Authenticator};
use crate::db::pool::DbError;
use crate::http::request::{percent_decode, token_from_request};
use crate::http::response::{json_error, json_response, Body};
use crate::metrics::Metrics;
use crate::relay::log::EventLog;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest message body accepted over HTTP, in characters (fits the body
/// limit even at four bytes a character).
const MAX_MESSAGE_CHARS: usize = 10_000;
/// Largest page of messages.
const MAX_PAGE: i64 = 200;

/// What the API needs.
pub struct Api {
    pub log: EventLog,
    pub auth: Authenticator,
    /// Requests per second per user (twice that in a burst).
    pub requests_per_second: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// Time for a request body to arrive whole (408 beyond it).
    body_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A request that cannot be served, as a status and a JSON error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
    /// For 405: the methods the route takes.
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            allow: None,
        }
    }

    /// The database is out of reach: retry, nothing is lost.
    fn unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "database unavailable; retry shortly",
        )
    }

    fn field(field: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            field: Some(field),
            allow: None,
        }
    }

    fn into_response(self) -> Response<Body> {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            return json_error(self.status, self.code, &self.message);
        }
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = json!(field);
        }
        let mut response = json_response(self.status, json!({ "error": error }));
        if let Some(allow) = self.allow {
            response.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(allow),
            );
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Expired => "token_expired",
            _ => "unauthorized",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Query(e) => sql_error(e),
            other => {
                tracing::warn!(error = %other, "API could not reach the database");
                ApiError::unavailable()
            }
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        sql_error(e)
    }
}

/// Maps an error of the chat functions by SQLSTATE, never by text. The
/// messages of the functions' own errors are ours and safe to show;
/// anything else is logged and answered with a bare 500.
fn sql_error(e: tokio_postgres::Error) -> ApiError {
    let Some(db) = e.as_db_error() else {
        tracing::warn!(error = %e, "API database connection failed");
        return ApiError::unavailable();
    };
    let code = db.code();
    if *code == SqlState::INVALID_SCHEMA_NAME {
        // The chat app is opt-in on an existing database.
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "chat_not_installed",
            "the chat app is not installed in this database; install it with `pgrelay migrate --chat`",
        );
    }
    let (status, name) = if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        (StatusCode::FORBIDDEN, "forbidden")
    } else if *code == SqlState::NO_DATA_FOUND {
        (StatusCode::NOT_FOUND, "not_found")
    } else if code.code() == "PR409" {
        (StatusCode::CONFLICT, "version_conflict")
    } else if *code == SqlState::INVALID_PARAMETER_VALUE
        || *code == SqlState::CHECK_VIOLATION
        || *code == SqlState::NOT_NULL_VIOLATION
        || *code == SqlState::STRING_DATA_RIGHT_TRUNCATION
        || *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
        || *code == SqlState::UNTRANSLATABLE_CHARACTER
    {
        (StatusCode::BAD_REQUEST, "bad_request")
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        (StatusCode::SERVICE_UNAVAILABLE, "retry")
    } else {
        tracing::error!(sqlstate = code.code(), error = %db.message(), "unexpected database error in the API");
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        );
    };
    ApiError::new(status, name, db.message().to_string())
}

impl Api {
    pub fn new(
        log: EventLog,
        auth: Authenticator,
        requests_per_second: u32,
        body_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Api {
            log,
            auth,
            requests_per_second: requests_per_second.max(1),
            buckets: Mutex::new(HashMap::new()),
            body_timeout,
            metrics,
        }
    }

    /// Reads a JSON object body, bounded in size and in time: a body
    /// trickled in slower than `body_timeout` gets 408.
    async fn read_json(&self, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
        match tokio::time::timeout(self.body_timeout, read_json(req)).await {
            Ok(result) => result,
            Err(_) => {
                self.metrics.timeouts.body.fetch_add(1, Relaxed);
                Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} s",
                        self.body_timeout.as_secs()
                    ),
                ))
            }
        }
    }

    /// Serves one `/v1` request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        match self.route(req).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        let segments: Vec<String> = path
            .trim_start_matches("/v1")
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| percent_decode(s, false))
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();
        let allow = match segments.as_slice() {
            ["projects"] => "GET",
            ["projects", _, "messages"] => "GET, POST",
            ["projects", _, "delivered" | "read"] => "POST",
            ["projects", _, "unread" | "latest_seq"] => "GET",
            ["messages", _] => "PATCH, DELETE",
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route",
                ))
            }
        };
        if !allow.split(", ").any(|m| m == method.as_str()) {
            let mut e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route takes {allow}"),
            );
            e.allow = Some(allow);
            return Err(e);
        }
        let user = self.authenticate(&req).await?;
        self.take_budget(&user)?;
        let query = parse_query(req.uri().query());
        match (method, segments.as_slice()) {
            (Method::GET, ["projects"]) => self.list_projects(&user).await,
            (Method::GET, ["projects", p, "messages"]) => self.page(&user, p, &query).await,
            (Method::POST, ["projects", p, "messages"]) => {
                let body = self.read_json(req).await?;
                self.send(&user, p, &body).await
            }
            (Method::POST, ["projects", p, mark @ ("delivered" | "read")]) => {
                let body = self.read_json(req).await?;
                self.mark(&user, p, mark, &body).await
            }
            (Method::GET, ["projects", p, "unread"]) => {
                let n: i64 = self
                    .one(
                        "SELECT chat.unread_count($1, $2)",
                        &[(p, Type::TEXT), (&user, Type::TEXT)],
                    )
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    json!({"project_id": p, "unread": n}),
                ))
            }
            (Method::GET, ["projects", p, "latest_seq"]) => {
                let n: i64 = self
                    .one(
                        "SELECT chat.latest_seq($1, $2)",
                        &[(p, Type::TEXT), (&user, Type::TEXT)],
                    )
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    json!({"project_id": p, "latest_seq": n}),
                ))
            }
            (Method::PATCH, ["messages", id]) => {
                let body = self.read_json(req).await?;
                self.edit(&user, id, &body).await
            }
            (Method::DELETE, ["messages", id]) => self.delete(&user, id, &query).await,
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            )),
        }
    }

    async fn authenticate<B>(&self, req: &Request<B>) -> Result<String, ApiError> {
        let token = token_from_request(req).ok_or(AuthError::Missing)?;
        Ok(self.auth.verify_fresh(&token).await?.user_id)
    }

    /// A token bucket per user, so one user cannot monopolise the pool.
    fn take_budget(&self, user: &str) -> Result<(), ApiError> {
        let rate = f64::from(self.requests_per_second);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            // Full buckets carry no state worth keeping.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate * 2.0
            });
        }
        let (tokens, at) = buckets.entry(user.to_string()).or_insert((rate * 2.0, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate * 2.0);
        *at = now;
        if *tokens < 1.0 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; slow down",
            ));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// The single row of a statement, within the pool's query timeout.
    async fn row(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<tokio_postgres::Row, ApiError> {
        Ok(self.log.pool().query_one(sql, params).await?)
    }

    /// The single value of a statement.
    async fn one<T>(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<T, ApiError>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        Ok(self.row(sql, params).await?.get(0))
    }

    async fn rows_json(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .log
            .pool()
            .query(sql, params)
            .await?
            .iter()
            .map(|r| r.get::<_, Value>(0))
            .collect())
    }

    async fn list_projects(&self, user: &str) -> Result<Response<Body>, ApiError> {
        let projects = self
            .rows_json(
                "SELECT to_jsonb(p) FROM chat.list_projects($1) p",
                &[(&user, Type::TEXT)],
            )
            .await?;
        Ok(json_response(
            StatusCode::OK,
            json!({ "projects": projects }),
        ))
    }

    async fn page(
        &self,
        user: &str,
        project: &str,
        query: &HashMap<String, String>,
    ) -> Result<Response<Body>, ApiError> {
        let limit = query_int(query, "limit", 1, MAX_PAGE)?.unwrap_or(50);
        let before = query_int(query, "before_seq", 0, i64::MAX)?;
        let limit = limit as i32;
        let messages = self
            .rows_json(
                "SELECT to_jsonb(m) FROM chat.messages_page($1, $2, $3, $4) m",
                &[
                    (&project, Type::TEXT),
                    (&user, Type::TEXT),
                    (&before, Type::INT8),
                    (&limit, Type::INT4),
                ],
            )
            .await?;
        // Full page: is there anything older? Asked through the same
        // function, so the same permission applies.
        let oldest = messages.last().and_then(|m| m["seq"].as_i64());
        let has_more = match oldest {
            Some(seq) if messages.len() == limit as usize => {
                let one = 1i32;
                let next = Some(seq);
                !self
                    .rows_json(
                        "SELECT to_jsonb(m) FROM chat.messages_page($1, $2, $3, $4) m",
                        &[
                            (&project, Type::TEXT),
                            (&user, Type::TEXT),
                            (&next, Type::INT8),
                            (&one, Type::INT4),
                        ],
                    )
                    .await?
                    .is_empty()
            }
            _ => false,
        };
        Ok(json_response(
            StatusCode::OK,
            json!({"messages": messages, "has_more": has_more, "next_before_seq": if has_more { oldest } else { None }}),
        ))
    }

    async fn send(
        &self,
        user: &str,
        project: &str,
        body: &Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        let text = string_field(body, "body", 1, MAX_MESSAGE_CHARS)?;
        let client_id = string_field(body, "client_generated_id", 1, 128)?;
        let row = self
            .row(
                "SELECT to_jsonb(r.message), r.created FROM chat.send_message($1, $2, $3, $4) r",
                &[
                    (&project, Type::TEXT),
                    (&user, Type::TEXT),
                    (&text, Type::TEXT),
                    (&client_id, Type::TEXT),
                ],
            )
            .await?;
        let message: Value = row.get(0);
        let created: bool = row.get(1);
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(json_response(
            status,
            json!({"message": message, "created": created}),
        ))
    }

    async fn edit(
        &self,
        user: &str,
        id: &str,
        body: &Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        let text = string_field(body, "body", 1, MAX_MESSAGE_CHARS)?;
        let version = version_field(body.get("version"), "version")?.ok_or_else(|| {
            ApiError::field("version", "missing \"version\" (the version you edited)")
        })?;
        let message: Value = self
            .one(
                "SELECT to_jsonb(m) FROM chat.edit_message($1, $2, $3, $4) m",
                &[
                    (&id, Type::TEXT),
                    (&user, Type::TEXT),
                    (&text, Type::TEXT),
                    (&version, Type::INT4),
                ],
            )
            .await?;
        Ok(json_response(StatusCode::OK, json!({ "message": message })))
    }

    async fn delete(
        &self,
        user: &str,
        id: &str,
        query: &HashMap<String, String>,
    ) -> Result<Response<Body>, ApiError> {
        let version = query_int(query, "version", 1, i64::from(i32::MAX))?.map(|v| v as i32);
        let message: Value = self
            .one(
                "SELECT to_jsonb(m) FROM chat.delete_message($1, $2, $3) m",
                &[
                    (&id, Type::TEXT),
                    (&user, Type::TEXT),
                    (&version, Type::INT4),
                ],
            )
            .await?;
        Ok(json_response(StatusCode::OK, json!({ "message": message })))
    }

    async fn mark(
        &self,
        user: &str,
        project: &str,
        mark: &str,
        body: &Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        let up_to = match body.get("up_to_seq") {
            Some(Value::Number(n)) => n.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::field("up_to_seq", "up_to_seq must be a non-negative integer")
            })?,
            Some(_) => {
                return Err(ApiError::field(
                    "up_to_seq",
                    "up_to_seq must be a non-negative integer",
                ))
            }
            None => return Err(ApiError::field("up_to_seq", "missing \"up_to_seq\"")),
        };
        let sql = if mark == "read" {
            "SELECT chat.mark_read($1, $2, $3)"
        } else {
            "SELECT chat.mark_delivered($1, $2, $3)"
        };
        let changed: i32 = self
            .one(
                sql,
                &[
                    (&project, Type::TEXT),
                    (&user, Type::TEXT),
                    (&up_to, Type::INT8),
                ],
            )
            .await?;
        Ok(json_response(
            StatusCode::OK,
            json!({"project_id": project, "changed": changed}),
        ))
    }
}

/// Reads a JSON object body of at most [`MAX_BODY_BYTES`].
async fn read_json(req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let bytes: Bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "could not read the request body",
                )
            }
        })?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("not valid JSON: {e}"),
        )),
    }
}

fn string_field(
    body: &Map<String, Value>,
    name: &'static str,
    min: usize,
    max: usize,
) -> Result<String, ApiError> {
    match body.get(name) {
        Some(Value::String(s)) if (min..=max).contains(&s.chars().count()) && !s.contains('\0') => {
            Ok(s.clone())
        }
        Some(Value::String(_)) => Err(ApiError::field(
            name,
            format!("\"{name}\" must be {min} to {max} characters, without NUL"),
        )),
        Some(_) => Err(ApiError::field(
            name,
            format!("\"{name}\" must be a string"),
        )),
        None => Err(ApiError::field(name, format!("missing \"{name}\""))),
    }
}

fn version_field(v: Option<&Value>, name: &'static str) -> Result<Option<i32>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or_else(|| ApiError::field(name, format!("\"{name}\" must be a positive integer"))),
        Some(_) => Err(ApiError::field(
            name,
            format!("\"{name}\" must be a positive integer"),
        )),
    }
}

/// An optional integer query parameter within `min..=max`; anything else
/// is a 400 naming the parameter.
fn query_int(
    query: &HashMap<String, String>,
    name: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::field(
                        name,
                        format!("{name} must be an integer from {min} to {max}"),
                    )
                })
        })
        .transpose()
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (!k.is_empty()).then(|| (percent_decode(k, true), percent_decode(v, true)))
        })
        .collect()
}
