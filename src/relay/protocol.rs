//! The wire protocol of `GET /ws`: JSON text frames (DESIGN.md, "Wire
//! protocol"), the error codes of `error` frames and the close codes.
//!
//! Event frames are not built here: the database renders them once per
//! event (`relay.render`) and their bytes are shared by every subscriber.
//! This module only parses what clients send and builds the few control
//! frames the relay itself says.

use serde_json::{json, Map, Value};

use crate::relay::log::Cursor;

/// Close codes; part of the protocol, documented in `docs/protocol.md`.
pub mod close {
    /// The relay is shutting down: reconnect and resume with `since_seq`.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame carried invalid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame was larger than the inbound limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Missing, malformed or wrongly signed token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The token's `exp` has passed (and no fresh one was sent in time).
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// The peer stopped answering pings.
    pub const UNRESPONSIVE: u16 = 4008;
    /// Too many frames per second, or too many connections.
    pub const RATE_LIMITED: u16 = 4029;

    /// Every close code above (a test checks that none is left out; the
    /// SDK's `clients/js/src/codes.js` is checked against it).
    pub const ALL: &[u16] = &[
        GOING_AWAY,
        INVALID_PAYLOAD,
        MESSAGE_TOO_BIG,
        UNAUTHORIZED,
        TOKEN_EXPIRED,
        UNRESPONSIVE,
        RATE_LIMITED,
    ];
}

/// Error codes of `error` frames.
pub mod code {
    pub const BAD_JSON: &str = "bad_json";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNKNOWN_ACTION: &str = "unknown_action";
    pub const BINARY_NOT_SUPPORTED: &str = "binary_not_supported";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// The app's `relay.authorize` raised or ran past its timeout for this
    /// scope: the subscription ends; others go on.
    pub const AUTHORIZE_FAILED: &str = "authorize_failed";
    /// A broadcast payload or a presence state over its limit (G9).
    pub const TOO_LARGE: &str = "too_large";

    /// Every code above (a test checks that none is left out; the SDK's
    /// `clients/js/src/codes.js` is checked against it).
    pub const ALL: &[&str] = &[
        BAD_JSON,
        BAD_REQUEST,
        UNKNOWN_ACTION,
        BINARY_NOT_SUPPORTED,
        FORBIDDEN,
        NOT_SUBSCRIBED,
        TOO_MANY_SUBSCRIPTIONS,
        UNAVAILABLE,
        RATE_LIMITED,
        UNAUTHORIZED,
        TOKEN_EXPIRED,
        AUTHORIZE_FAILED,
        TOO_LARGE,
    ];
}

/// Longest scope (project id) accepted, as in the SQL side.
pub const MAX_SCOPE_LEN: usize = 256;
/// Longest broadcast event name, as `relay.broadcast` takes it.
pub const MAX_EVENT_LEN: usize = 64;
/// Largest broadcast payload, in bytes of its compact JSON text
/// (`relay.max_broadcast_bytes()`): a NOTIFY payload stops at 7,999 bytes,
/// and the envelope (scope, event, sender) needs the rest.
pub const MAX_BROADCAST_BYTES: usize = 6144;
/// Largest presence state of one connection, in bytes of its compact JSON
/// text (`relay.max_presence_bytes()`).
pub const MAX_PRESENCE_BYTES: usize = 1024;
/// Longest client-chosen `id` of a broadcast (asks for an acknowledgement).
pub const MAX_ID_LEN: usize = 64;
/// Most resources one subscription may name (G10).
pub const MAX_RESOURCES: usize = 32;

/// What a client may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe {
        scope: String,
        /// `since_seq`, named by `since_timestamp` when the client sent it.
        since: Option<Cursor>,
        /// `"presence":true`: also receive the scope's presence (a
        /// snapshot, then diffs).
        presence: bool,
        /// `"resources":[..]`: only events of these resources (G10).
        resources: Option<Vec<String>>,
    },
    /// An ephemeral signal to the scope's other subscribers (G9).
    Broadcast(Broadcast),
    /// Join the scope's presence with `state` (compact JSON), or update it.
    Presence {
        scope: String,
        state: String,
    },
    /// Leave the scope's presence, staying subscribed.
    PresenceLeave {
        scope: String,
    },
    Unsubscribe {
        scope: String,
    },
    Ping,
    /// A fresh token for the same user, sent before the current one expires.
    Auth {
        token: String,
    },
}

/// `{"action":"broadcast",..}` as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    pub scope: String,
    pub event: String,
    /// The payload's compact JSON text (`null` when absent).
    pub payload: String,
    /// `"self":true`: the sender receives it too.
    pub echo: bool,
    /// A client-chosen id: the relay acknowledges the broadcast once the
    /// database took it, and names the id in any error about it.
    pub id: Option<String>,
}

/// Why a client frame was refused: becomes an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: &'static str,
    pub message: String,
    /// The action the frame asked for, when it could be read.
    pub action: Option<String>,
    /// The project a refused `subscribe` or `unsubscribe` named, when it
    /// could be read (a string or an integer, even one refused as a
    /// scope): the client ends exactly that subscription.
    pub scope: Option<String>,
    /// The `id` of a refused broadcast, when it could be read.
    pub id: Option<String>,
}

impl ProtocolError {
    fn new(code: &'static str, message: impl Into<String>, action: Option<&str>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            action: action.map(str::to_string),
            scope: None,
            id: None,
        }
    }

    pub fn to_frame(&self) -> String {
        match (&self.action, &self.scope, &self.id) {
            (Some(action), Some(scope), Some(id)) => {
                signal_error_frame(self.code, &self.message, action, scope, Some(id))
            }
            _ => error_frame(
                self.code,
                &self.message,
                self.action.as_deref(),
                self.scope.as_deref(),
            ),
        }
    }
}

/// Parses one text frame. Never panics; every refusal names its reason.
pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(code::BAD_JSON, format!("not valid JSON: {e}"), None))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::new(
            code::BAD_REQUEST,
            "expected a JSON object with an \"action\"",
            None,
        ));
    };
    let action = match obj.get("action") {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => {
            return Err(ProtocolError::new(
                code::BAD_REQUEST,
                "\"action\" must be a string",
                None,
            ))
        }
        None => {
            return Err(ProtocolError::new(
                code::BAD_REQUEST,
                "missing \"action\"",
                None,
            ))
        }
    };
    let request = request(&obj, action);
    // A refused request about a project names it, so that the client can
    // end that subscription (and only that one) or fail that broadcast.
    if matches!(
        action,
        "subscribe" | "unsubscribe" | "broadcast" | "presence" | "presence_leave"
    ) {
        return request.map_err(|e| ProtocolError {
            scope: named_scope(&obj),
            id: match obj.get("id") {
                Some(Value::String(id)) if action == "broadcast" && id.len() <= MAX_ID_LEN => {
                    Some(id.clone())
                }
                _ => None,
            },
            ..e
        });
    }
    request
}

/// The `project_id` a frame names, as the client wrote it: a string (even
/// one refused as a scope) or an integer's decimal text.
fn named_scope(obj: &Map<String, Value>) -> Option<String> {
    match obj.get("project_id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// The request a JSON object with a string `action` asks for.
fn request(obj: &Map<String, Value>, action: &str) -> Result<ClientMessage, ProtocolError> {
    let scope = || -> Result<String, ProtocolError> {
        match obj.get("project_id") {
            Some(Value::String(s))
                if !s.is_empty()
                    && s.len() <= MAX_SCOPE_LEN
                    && !s.chars().any(char::is_control) =>
            {
                Ok(s.clone())
            }
            Some(Value::String(_)) => Err(ProtocolError::new(
                code::BAD_REQUEST,
                format!(
                    "\"project_id\" must be 1 to {MAX_SCOPE_LEN} bytes without control characters"
                ),
                Some(action),
            )),
            // Apps with integer keys send them as numbers; the scope is
            // their decimal text, the same text a trigger's `::text` makes.
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            Some(_) => Err(ProtocolError::new(
                code::BAD_REQUEST,
                "\"project_id\" must be a string or an integer",
                Some(action),
            )),
            None => Err(ProtocolError::new(
                code::BAD_REQUEST,
                "missing \"project_id\"",
                Some(action),
            )),
        }
    };
    match action {
        "subscribe" => {
            let since_seq = match obj.get("since_seq") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    ProtocolError::new(
                        code::BAD_REQUEST,
                        "\"since_seq\" must be a non-negative integer",
                        Some(action),
                    )
                })?),
            };
            let since_time = match obj.get("since_timestamp") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(parse_timestamp(t).ok_or_else(|| {
                    ProtocolError::new(
                        code::BAD_REQUEST,
                        "\"since_timestamp\" must be the \"timestamp\" of the event at since_seq, as the relay sent it",
                        Some(action),
                    )
                })?),
                Some(_) => {
                    return Err(ProtocolError::new(
                        code::BAD_REQUEST,
                        "\"since_timestamp\" must be a string",
                        Some(action),
                    ))
                }
            };
            if since_time.is_some() && since_seq.is_none() {
                return Err(ProtocolError::new(
                    code::BAD_REQUEST,
                    "\"since_timestamp\" names the event at \"since_seq\"; send both",
                    Some(action),
                ));
            }
            let presence = match obj.get("presence") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ProtocolError::new(
                        code::BAD_REQUEST,
                        "\"presence\" must be true or false",
                        Some(action),
                    ))
                }
            };
            let resources = match obj.get("resources") {
                None | Some(Value::Null) => None,
                Some(Value::Array(list)) => Some(resources(list)?),
                Some(_) => return Err(bad_resources()),
            };
            Ok(ClientMessage::Subscribe {
                scope: scope()?,
                since: since_seq.map(|seq| Cursor::new(seq, since_time)),
                presence,
                resources,
            })
        }
        "broadcast" => parse_broadcast(obj, scope()?).map(ClientMessage::Broadcast),
        "presence" => {
            let scope = scope()?;
            let state = match obj.get("state") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(state @ Value::Object(_)) => state.to_string(),
                Some(_) => {
                    return Err(ProtocolError::new(
                        code::BAD_REQUEST,
                        "\"state\" must be a JSON object",
                        Some(action),
                    ))
                }
            };
            if state.len() > MAX_PRESENCE_BYTES {
                return Err(ProtocolError::new(
                    code::TOO_LARGE,
                    format!(
                        "\"state\" is {} bytes as compact JSON; presence holds at most {MAX_PRESENCE_BYTES}",
                        state.len()
                    ),
                    Some(action),
                ));
            }
            Ok(ClientMessage::Presence { scope, state })
        }
        "presence_leave" => Ok(ClientMessage::PresenceLeave { scope: scope()? }),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe { scope: scope()? }),
        "ping" => Ok(ClientMessage::Ping),
        "auth" => match obj.get("token") {
            Some(Value::String(t)) if !t.is_empty() => Ok(ClientMessage::Auth { token: t.clone() }),
            _ => Err(ProtocolError::new(
                code::BAD_REQUEST,
                "\"token\" must be a non-empty string",
                Some(action),
            )),
        },
        other => Err(ProtocolError::new(
            code::UNKNOWN_ACTION,
            "unknown action; expected subscribe, unsubscribe, ping, auth, broadcast, presence or presence_leave",
            Some(truncate(other, 64)),
        )),
    }
}

fn bad_resources() -> ProtocolError {
    ProtocolError::new(
        code::BAD_REQUEST,
        format!(
            "\"resources\" must be an array of 1 to {MAX_RESOURCES} resource names \
             (a letter or _, then letters, digits, _ . -; at most 64)"
        ),
        Some("subscribe"),
    )
}

/// A subscription's resources, as `relay.enable` names them; duplicates
/// are dropped.
fn resources(list: &[Value]) -> Result<Vec<String>, ProtocolError> {
    if list.is_empty() || list.len() > MAX_RESOURCES {
        return Err(bad_resources());
    }
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        let Value::String(name) = item else {
            return Err(bad_resources());
        };
        if !is_resource_name(name) {
            return Err(bad_resources());
        }
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    Ok(names)
}

/// `relay.enable`'s rule: `^[A-Za-z_][A-Za-z0-9_.-]{0,63}$`.
fn is_resource_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn parse_broadcast(
    obj: &serde_json::Map<String, Value>,
    scope: String,
) -> Result<Broadcast, ProtocolError> {
    let action = Some("broadcast");
    let bad = |message: &str| ProtocolError::new(code::BAD_REQUEST, message, action);
    let event = match obj.get("event") {
        Some(Value::String(e))
            if !e.is_empty() && e.len() <= MAX_EVENT_LEN && !e.chars().any(char::is_control) =>
        {
            e.clone()
        }
        _ => {
            return Err(bad(&format!(
            "\"event\" must be a string of 1 to {MAX_EVENT_LEN} bytes without control characters"
        )))
        }
    };
    let payload = obj.get("payload").unwrap_or(&Value::Null).to_string();
    if payload.len() > MAX_BROADCAST_BYTES {
        return Err(ProtocolError::new(
            code::TOO_LARGE,
            format!(
                "\"payload\" is {} bytes as compact JSON; a broadcast carries at most {MAX_BROADCAST_BYTES}",
                payload.len()
            ),
            action,
        ));
    }
    let echo = match obj.get("self") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("\"self\" must be true or false")),
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id))
            if !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control) =>
        {
            Some(id.clone())
        }
        Some(_) => {
            return Err(bad(&format!(
                "\"id\" must be a string of 1 to {MAX_ID_LEN} bytes without control characters"
            )))
        }
    };
    Ok(Broadcast {
        scope,
        event,
        payload,
        echo,
        id,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An event's capture time as frames carry it (`relay.wire_time`: RFC 3339,
/// UTC, microseconds), from microseconds since the epoch.
pub fn format_timestamp(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// Microseconds since the epoch from an RFC 3339 timestamp.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// `{"type":"subscribed","project_id":..,"seq":..,"timestamp":..}`: the
/// latest event at subscribe time (its seq and timestamp, the cursor to
/// resume from if nothing arrives); events after it follow. `timestamp`
/// is null when there is no event yet or it was trimmed.
pub fn subscribed_frame(scope: &str, latest: Cursor) -> String {
    json!({"type": "subscribed", "project_id": scope, "seq": latest.seq,
           "timestamp": latest.time_us.and_then(format_timestamp)})
    .to_string()
}

/// The `subscribed` frame of a subscription narrowed to `resources`
/// (G10): also says which of them no table is tracked as (not an error: a
/// table may be tracked later, or events published by `relay.append`).
pub fn subscribed_filtered_frame(
    scope: &str,
    latest: Cursor,
    resources: &[String],
    untracked: &[String],
) -> String {
    json!({"type": "subscribed", "project_id": scope, "seq": latest.seq,
           "timestamp": latest.time_us.and_then(format_timestamp),
           "resources": resources, "untracked": untracked})
    .to_string()
}

/// `{"type":"skipped","project_id":..,"after":A,"seq":S,"timestamp":..}`:
/// for a subscription narrowed to some resources, no event after seq `A`
/// up to `S` (named by its timestamp) is of them. The cursor moves to `S`:
/// every seq is accounted for, by an event or a skipped range, so a gap
/// still means loss (G3, G10).
pub fn skipped_frame(scope: &str, after: u64, through: Cursor) -> String {
    json!({"type": "skipped", "project_id": scope, "after": after, "seq": through.seq,
           "timestamp": through.time_us.and_then(format_timestamp)})
    .to_string()
}

/// `{"type":"unsubscribed","project_id":..}`.
pub fn unsubscribed_frame(scope: &str) -> String {
    json!({"type": "unsubscribed", "project_id": scope}).to_string()
}

/// Why a `reset` is sent.
pub mod reset_reason {
    /// Events after the client's `since_seq` were trimmed from the log.
    pub const HISTORY_TRIMMED: &str = "history_trimmed";
    /// The client's `since_seq` (sent without `since_timestamp`) is beyond
    /// anything the log holds (the database was restored or replaced, or
    /// failed over and lost its last commits).
    pub const SEQ_AHEAD: &str = "seq_ahead";
    /// The log no longer holds the event the client's cursor names (seq and
    /// timestamp): it lost history the client saw (a failover to a standby
    /// that lacked the last commits, a restore from backup). What the
    /// client holds after its last common event may not exist any more.
    pub const HISTORY_DIVERGED: &str = "history_diverged";

    /// Every reason above (a test checks that none is left out; the SDK's
    /// `clients/js/src/codes.js` is checked against it).
    pub const ALL: &[&str] = &[HISTORY_TRIMMED, SEQ_AHEAD, HISTORY_DIVERGED];
}

/// `{"type":"reset",..}`: reload the scope's state; events after the
/// event named by `seq` and `timestamp` follow.
pub fn reset_frame(scope: &str, latest: Cursor, reason: &str) -> String {
    json!({"type": "reset", "project_id": scope, "seq": latest.seq, "reason": reason,
           "timestamp": latest.time_us.and_then(format_timestamp)})
    .to_string()
}

/// `{"type":"broadcast","project_id":..,"event":..,"from":..,"payload":..}`:
/// built once per broadcast on each relay and shared by its subscribers.
/// `payload` is JSON text, spliced in as is.
pub fn broadcast_frame(scope: &str, event: &str, from: Option<&str>, payload: &str) -> String {
    let quote = |s: &str| Value::String(s.to_string()).to_string();
    let from = from.map_or_else(|| "null".to_string(), quote);
    format!(
        r#"{{"type":"broadcast","project_id":{},"event":{},"from":{from},"payload":{payload}}}"#,
        quote(scope),
        quote(event)
    )
}

/// `{"type":"broadcast_ack","project_id":..,"id":..}`: the database took
/// the broadcast with this `id`; every relay is getting it.
pub fn broadcast_ack_frame(scope: &str, id: &str) -> String {
    json!({"type": "broadcast_ack", "project_id": scope, "id": id}).to_string()
}

/// `{"type":"presence_joined","project_id":..,"connection":..}`: this
/// connection's presence (join or update) is stored where every relay sees
/// it; `connection` is how the members lists name it.
pub fn presence_joined_frame(scope: &str, connection: &str) -> String {
    json!({"type": "presence_joined", "project_id": scope, "connection": connection}).to_string()
}

/// `{"type":"presence_left","project_id":..}`.
pub fn presence_left_frame(scope: &str) -> String {
    json!({"type": "presence_left", "project_id": scope}).to_string()
}

pub fn pong_frame() -> String {
    r#"{"type":"pong"}"#.to_string()
}

/// `{"type":"error","code":..,"message":..,"ref":..}`, with the scope when
/// the error concerns one subscription.
pub fn error_frame(code: &str, message: &str, action: Option<&str>, scope: Option<&str>) -> String {
    let mut v = json!({"type": "error", "code": code, "message": message, "ref": action});
    if let Some(scope) = scope {
        v["project_id"] = Value::String(scope.to_string());
    }
    v.to_string()
}

/// An error about a broadcast or presence request of `scope`, naming the
/// broadcast's `id` when it had one.
pub fn signal_error_frame(
    code: &str,
    message: &str,
    action: &str,
    scope: &str,
    id: Option<&str>,
) -> String {
    let mut v = json!({"type": "error", "code": code, "message": message, "ref": action,
                       "project_id": scope});
    if let Some(id) = id {
        v["id"] = Value::String(id.to_string());
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_actions() {
        assert_eq!(
            parse(r#"{"action":"subscribe","project_id":"p","since_seq":42}"#),
            Ok(ClientMessage::Subscribe {
                scope: "p".into(),
                since: Some(Cursor::new(42, None)),
                presence: false,
                resources: None,
            })
        );
        assert_eq!(
            parse(r#"{"action":"subscribe","project_id":"p"}"#),
            Ok(ClientMessage::Subscribe {
                scope: "p".into(),
                since: None,
                presence: false,
                resources: None,
            })
        );
        assert_eq!(
            parse(r#"{"action":"unsubscribe","project_id":"p"}"#),
            Ok(ClientMessage::Unsubscribe { scope: "p".into() })
        );
        assert_eq!(parse(r#"{"action":"ping"}"#), Ok(ClientMessage::Ping));
    }

    #[test]
    fn a_cursor_names_its_event_by_timestamp() {
        let t = "2026-11-24T08:00:00.123456Z";
        let us = parse_timestamp(t).expect("a wire timestamp parses");
        assert_eq!(format_timestamp(us).as_deref(), Some(t), "round trip");
        assert_eq!(
            parse(&format!(
                r#"{{"action":"subscribe","project_id":"p","since_seq":42,"since_timestamp":"{t}"}}"#
            )),
            Ok(ClientMessage::Subscribe {
                scope: "p".into(),
                since: Some(Cursor::new(42, Some(us))),
                presence: false,
                resources: None,
            })
        );
        for bad in [
            r#"{"action":"subscribe","project_id":"p","since_seq":4,"since_timestamp":"yesterday"}"#,
            r#"{"action":"subscribe","project_id":"p","since_seq":4,"since_timestamp":7}"#,
            r#"{"action":"subscribe","project_id":"p","since_timestamp":"2026-11-24T08:00:00Z"}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, code::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn integer_scopes_are_their_decimal_text() {
        assert_eq!(
            parse(r#"{"action":"subscribe","project_id":42}"#),
            Ok(ClientMessage::Subscribe {
                scope: "42".into(),
                since: None,
                presence: false,
                resources: None,
            })
        );
        assert_eq!(
            parse(r#"{"action":"unsubscribe","project_id":-7}"#),
            Ok(ClientMessage::Unsubscribe { scope: "-7".into() })
        );
        for bad in ["1.5", "true", "[1]", "{}"] {
            let text = format!(r#"{{"action":"subscribe","project_id":{bad}}}"#);
            assert_eq!(parse(&text).unwrap_err().code, code::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn refusals_name_their_reason() {
        assert_eq!(parse("not json").unwrap_err().code, code::BAD_JSON);
        assert_eq!(parse("[1]").unwrap_err().code, code::BAD_REQUEST);
        assert_eq!(
            parse(r#"{"action":"subscribe"}"#).unwrap_err().code,
            code::BAD_REQUEST
        );
        assert_eq!(
            parse(r#"{"action":"subscribe","project_id":"p","since_seq":-1}"#)
                .unwrap_err()
                .code,
            code::BAD_REQUEST
        );
        let e = parse(r#"{"action":"explode"}"#).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_ACTION);
        assert_eq!(e.action.as_deref(), Some("explode"));
        let deep = "[".repeat(10_000);
        assert_eq!(parse(&deep).unwrap_err().code, code::BAD_JSON);
        let long = format!(
            r#"{{"action":"subscribe","project_id":"{}"}}"#,
            "x".repeat(300)
        );
        assert_eq!(parse(&long).unwrap_err().code, code::BAD_REQUEST);
    }

    #[test]
    fn broadcasts_and_presence_are_read_with_their_limits() {
        let b = parse(
            r#"{"action":"broadcast","project_id":"p","event":"typing","payload":{"a": [1, 2]},"self":true,"id":"x1"}"#,
        );
        assert_eq!(
            b,
            Ok(ClientMessage::Broadcast(Broadcast {
                scope: "p".into(),
                event: "typing".into(),
                payload: r#"{"a":[1,2]}"#.into(),
                echo: true,
                id: Some("x1".into()),
            }))
        );
        let plain = parse(r#"{"action":"broadcast","project_id":"p","event":"e"}"#);
        assert!(
            matches!(&plain, Ok(ClientMessage::Broadcast(b)) if b.payload == "null" && !b.echo && b.id.is_none()),
            "{plain:?}"
        );
        let big = format!(
            r#"{{"action":"broadcast","project_id":"p","event":"e","payload":"{}"}}"#,
            "x".repeat(MAX_BROADCAST_BYTES)
        );
        assert_eq!(parse(&big).unwrap_err().code, code::TOO_LARGE);
        let fits = format!(
            r#"{{"action":"broadcast","project_id":"p","event":"e","payload":"{}"}}"#,
            "x".repeat(MAX_BROADCAST_BYTES - 2)
        );
        assert!(parse(&fits).is_ok());
        for bad in [
            r#"{"action":"broadcast","project_id":"p"}"#,
            r#"{"action":"broadcast","project_id":"p","event":""}"#,
            r#"{"action":"broadcast","project_id":"p","event":7}"#,
            r#"{"action":"broadcast","project_id":"p","event":"e","self":"yes"}"#,
            r#"{"action":"broadcast","project_id":"p","event":"e","id":5}"#,
            r#"{"action":"broadcast","event":"e"}"#,
            r#"{"action":"presence","project_id":"p","state":[1]}"#,
            r#"{"action":"subscribe","project_id":"p","presence":1}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, code::BAD_REQUEST, "{bad}");
        }
        let long_event = format!(
            r#"{{"action":"broadcast","project_id":"p","event":"{}"}}"#,
            "e".repeat(MAX_EVENT_LEN + 1)
        );
        assert_eq!(parse(&long_event).unwrap_err().code, code::BAD_REQUEST);
        assert_eq!(
            parse(r#"{"action":"presence","project_id":"p","state":{"typing":true}}"#),
            Ok(ClientMessage::Presence {
                scope: "p".into(),
                state: r#"{"typing":true}"#.into()
            })
        );
        assert_eq!(
            parse(r#"{"action":"presence","project_id":"p"}"#),
            Ok(ClientMessage::Presence {
                scope: "p".into(),
                state: "{}".into()
            })
        );
        let big_state = format!(
            r#"{{"action":"presence","project_id":"p","state":{{"s":"{}"}}}}"#,
            "x".repeat(MAX_PRESENCE_BYTES)
        );
        assert_eq!(parse(&big_state).unwrap_err().code, code::TOO_LARGE);
        assert_eq!(
            parse(r#"{"action":"presence_leave","project_id":"p"}"#),
            Ok(ClientMessage::PresenceLeave { scope: "p".into() })
        );
        assert_eq!(
            parse(r#"{"action":"subscribe","project_id":"p","presence":true}"#),
            Ok(ClientMessage::Subscribe {
                scope: "p".into(),
                since: None,
                presence: true,
                resources: None,
            })
        );
    }

    #[test]
    fn a_broadcast_frame_splices_its_payload_and_quotes_the_rest() {
        let f = broadcast_frame("p\"q", "typing", Some("ann"), r#"{"a":1}"#);
        let v: Value = serde_json::from_str(&f).expect("valid JSON");
        assert_eq!(v["project_id"], "p\"q");
        assert_eq!(v["from"], "ann");
        assert_eq!(v["payload"]["a"], 1);
        let server: Value =
            serde_json::from_str(&broadcast_frame("p", "e", None, "null")).expect("valid JSON");
        assert!(server["from"].is_null());
    }

    /// The values of the `pub const`s declared in `pub mod NAME { .. }` of
    /// this file, except `ALL`: what each module's `ALL` must list.
    fn declared(module: &str) -> Vec<String> {
        let src = include_str!("protocol.rs");
        let head = format!("pub mod {module} {{");
        let start = src.find(&head).expect("the module in this file");
        let body = &src[start + head.len()..];
        let body = &body[..body.find("\n}").expect("the module's end")];
        body.split("pub const ")
            .skip(1)
            .filter(|decl| !decl.starts_with("ALL:"))
            .map(|decl| {
                let value = decl.split_once('=').expect("a value").1;
                let value = value.split_once(';').expect("a `;`").0;
                value.trim().trim_matches('"').to_string()
            })
            .collect()
    }

    #[test]
    fn every_code_is_listed_in_all() {
        let mut close: Vec<String> = close::ALL.iter().map(u16::to_string).collect();
        let mut code: Vec<String> = code::ALL.iter().map(|c| c.to_string()).collect();
        let mut reason: Vec<String> = reset_reason::ALL.iter().map(|c| c.to_string()).collect();
        for (module, listed) in [
            ("close", &mut close),
            ("code", &mut code),
            ("reset_reason", &mut reason),
        ] {
            let mut declared = declared(module);
            assert!(declared.len() >= 3, "{module}: read {declared:?}");
            declared.sort();
            listed.sort();
            assert_eq!(
                &declared, listed,
                "{module}::ALL must list every code of {module}"
            );
        }
    }

    /// The error frame a refused text becomes, parsed back.
    fn refusal(text: &str) -> Value {
        let e = parse(text).expect_err(text);
        serde_json::from_str(&e.to_frame()).expect("an error frame is JSON")
    }

    #[test]
    fn a_refused_subscribe_names_the_project_it_asked_for() {
        let long = "x".repeat(300);
        for (text, action, scope) in [
            (
                r#"{"action":"subscribe","project_id":"p","since_seq":-1}"#.to_string(),
                "subscribe",
                "p",
            ),
            (
                r#"{"action":"subscribe","project_id":7,"since_seq":1,"since_timestamp":"yesterday"}"#
                    .to_string(),
                "subscribe",
                "7",
            ),
            (
                r#"{"since_timestamp":"2026-11-24T08:00:00Z","project_id":"q","action":"subscribe"}"#
                    .to_string(),
                "subscribe",
                "q",
            ),
            (
                format!(r#"{{"action":"subscribe","project_id":"{long}"}}"#),
                "subscribe",
                long.as_str(),
            ),
            (
                r#"{"action":"subscribe","project_id":""}"#.to_string(),
                "subscribe",
                "",
            ),
            (
                r#"{"action":"unsubscribe","project_id":"p\u0001"}"#.to_string(),
                "unsubscribe",
                "p\u{1}",
            ),
        ] {
            let frame = refusal(&text);
            assert_eq!(frame["code"], code::BAD_REQUEST, "{text}");
            assert_eq!(frame["ref"], action, "{text}");
            assert_eq!(frame["project_id"], scope, "{text}");
        }
        // No readable project, or an action that is not about one: no scope.
        for text in [
            r#"{"action":"subscribe"}"#,
            r#"{"action":"subscribe","project_id":1.5}"#,
            r#"{"action":"unsubscribe","project_id":["p"]}"#,
            r#"{"action":"auth","project_id":"p"}"#,
            r#"{"action":"explode","project_id":"p"}"#,
            r#"{"project_id":"p"}"#,
        ] {
            assert_eq!(refusal(text).get("project_id"), None, "{text}");
        }
    }

    #[test]
    fn a_subscription_may_name_its_resources() {
        assert_eq!(
            parse(
                r#"{"action":"subscribe","project_id":"p","resources":["message","task.v2","message"]}"#
            ),
            Ok(ClientMessage::Subscribe {
                scope: "p".into(),
                since: None,
                presence: false,
                resources: Some(vec!["message".into(), "task.v2".into()]),
            })
        );
        let many = format!(
            r#"{{"action":"subscribe","project_id":"p","resources":[{}]}}"#,
            (0..=MAX_RESOURCES)
                .map(|i| format!("\"r{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        for bad in [
            r#"{"action":"subscribe","project_id":"p","resources":[]}"#,
            r#"{"action":"subscribe","project_id":"p","resources":"message"}"#,
            r#"{"action":"subscribe","project_id":"p","resources":[1]}"#,
            r#"{"action":"subscribe","project_id":"p","resources":["9lives"]}"#,
            r#"{"action":"subscribe","project_id":"p","resources":["a b"]}"#,
            many.as_str(),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, code::BAD_REQUEST, "{bad}");
            assert_eq!(e.scope.as_deref(), Some("p"), "{bad}");
        }
        let long = format!(
            r#"{{"action":"subscribe","project_id":"p","resources":["{}"]}}"#,
            "r".repeat(65)
        );
        assert_eq!(parse(&long).unwrap_err().code, code::BAD_REQUEST);
    }
}
