//! JSON-RPC 2.0 messages: splitting a byte stream into JSON values, checking
//! requests, and building responses. Everything here is pure (no I/O), so the
//! fuzz target and the server share it.

use serde_json::{Map, Value, json};

/// Standard and ClaudeFS error codes.
pub mod codes {
    /// The bytes are not JSON.
    pub const PARSE_ERROR: i32 = -32700;
    /// JSON, but not a valid request object.
    pub const INVALID_REQUEST: i32 = -32600;
    /// No method of that name.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Parameters missing, of the wrong type, or unknown.
    pub const INVALID_PARAMS: i32 = -32602;
    /// A fault in the server.
    pub const INTERNAL_ERROR: i32 = -32603;
    /// The method is not allowed in the current framework state (before or
    /// after `framework_start_init`); the errno EPERM, as SPDK reports it.
    pub const INVALID_STATE: i32 = -1;
}

/// An error as sent in a JSON-RPC response: a code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// JSON-RPC error code: one of [`codes`], or a negative errno for
    /// operational failures (as SPDK does: -2 no such device, -17 exists, -16 busy).
    pub code: i32,
    /// Human-readable description naming the failing object.
    pub message: String,
}

impl RpcError {
    /// An error with any code.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// -32700.
    pub fn parse(message: impl Into<String>) -> Self {
        Self::new(codes::PARSE_ERROR, message)
    }

    /// -32600.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(codes::INVALID_REQUEST, message)
    }

    /// -32601 for `method`.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(codes::METHOD_NOT_FOUND, format!("method {method:?} not found (rpc_get_methods lists them)"))
    }

    /// -32602.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(codes::INVALID_PARAMS, message)
    }

    /// -32603.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL_ERROR, message)
    }

    /// An operational failure reported as `-errno`.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno.abs(), message)
    }
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None` for a notification (no response is sent).
    pub id: Option<Value>,
    /// Method name.
    pub method: String,
    /// Named parameters; `None` when absent.
    pub params: Option<Value>,
}

/// Checks one request object. On failure returns the id to answer with (if
/// one could be read) and the error.
pub fn parse_request(value: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut obj) = value else {
        return Err((
            Value::Null,
            RpcError::invalid_request(format!("a request must be a JSON object, not {}", kind(&value))),
        ));
    };
    let id = obj.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    match &id {
        None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
        Some(other) => {
            return Err((
                Value::Null,
                RpcError::invalid_request(format!("id must be a string, number or null, not {}", kind(other))),
            ));
        }
    }
    match obj.get("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        Some(other) => {
            return Err((reply_id, RpcError::invalid_request(format!("jsonrpc must be \"2.0\", not {other}"))));
        }
        None => return Err((reply_id, RpcError::invalid_request("missing member \"jsonrpc\": \"2.0\""))),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(other) => {
            return Err((
                reply_id,
                RpcError::invalid_request(format!("method must be a string, not {}", kind(&other))),
            ));
        }
        None => return Err((reply_id, RpcError::invalid_request("missing member \"method\""))),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p),
        Some(Value::Array(_)) => {
            return Err((
                reply_id,
                RpcError::invalid_params(format!(
                    "{method}: positional (array) params are not supported; pass an object"
                )),
            ));
        }
        Some(other) => {
            return Err((
                reply_id,
                RpcError::invalid_params(format!("{method}: params must be an object, not {}", kind(&other))),
            ));
        }
    };
    Ok(Request { id, method, params })
}

/// The JSON type name of a value, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A success response.
pub fn response_ok(id: Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// An error response.
pub fn response_err(id: Value, error: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": error.code, "message": error.message } })
}

/// A request object, as the client sends it.
pub fn request(id: u64, method: &str, params: Option<Value>) -> Value {
    let mut obj = Map::new();
    obj.insert("jsonrpc".into(), "2.0".into());
    obj.insert("method".into(), method.into());
    if let Some(p) = params {
        obj.insert("params".into(), p);
    }
    obj.insert("id".into(), id.into());
    Value::Object(obj)
}

/// Why the byte stream of a connection cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not JSON.
    #[error("malformed JSON at byte {offset}: {message}")]
    Syntax {
        /// Offset within the pending bytes.
        offset: usize,
        /// serde_json's description.
        message: String,
    },
    /// A value grew beyond the limit before it was complete.
    #[error("request larger than the {limit}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

/// Splits a stream of bytes into JSON values. Values may be concatenated or
/// separated by whitespace (SPDK's clients send no separator; ours send a
/// newline). A value that is not complete waits for more bytes, up to `limit`.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    limit: usize,
}

impl FrameReader {
    /// A reader refusing values larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), limit }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet part of a complete value (ignoring whitespace).
    pub fn pending(&self) -> usize {
        self.buf.iter().filter(|b| !b.is_ascii_whitespace()).count()
    }

    /// The next complete value, `Ok(None)` if more bytes are needed.
    pub fn next_value(&mut self) -> Result<Option<Value>, FrameError> {
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match stream.next() {
            None => {
                self.buf.clear(); // only whitespace
                Ok(None)
            }
            Some(Ok(value)) => {
                let used = stream.byte_offset();
                if used > self.limit {
                    return Err(FrameError::TooLarge { limit: self.limit });
                }
                self.buf.drain(..used);
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > self.limit {
                    Err(FrameError::TooLarge { limit: self.limit })
                } else {
                    Ok(None)
                }
            }
            Some(Err(e)) => Err(FrameError::Syntax { offset: stream.byte_offset(), message: e.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_well_formed_requests_and_notifications() {
        let r = parse_request(json!({"jsonrpc": "2.0", "method": "m", "id": 7, "params": {"a": 1}})).unwrap();
        assert_eq!(r, Request { id: Some(json!(7)), method: "m".into(), params: Some(json!({"a": 1})) });
        let n = parse_request(json!({"jsonrpc": "2.0", "method": "m"})).unwrap();
        assert_eq!(n.id, None);
    }

    #[test]
    fn rejects_bad_requests_naming_the_problem() {
        let cases = [
            (json!([1]), codes::INVALID_REQUEST, "must be a JSON object"),
            (json!({"jsonrpc": "1.0", "method": "m", "id": 1}), codes::INVALID_REQUEST, "jsonrpc must be \"2.0\""),
            (json!({"method": "m", "id": 1}), codes::INVALID_REQUEST, "missing member \"jsonrpc\""),
            (json!({"jsonrpc": "2.0", "id": 1}), codes::INVALID_REQUEST, "missing member \"method\""),
            (json!({"jsonrpc": "2.0", "method": 3, "id": 1}), codes::INVALID_REQUEST, "method must be a string"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": {}}), codes::INVALID_REQUEST, "id must be"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": 1, "params": [1]}), codes::INVALID_PARAMS, "positional"),
            (
                json!({"jsonrpc": "2.0", "method": "m", "id": 1, "params": 5}),
                codes::INVALID_PARAMS,
                "must be an object",
            ),
        ];
        for (value, code, text) in cases {
            let (_, err) = parse_request(value.clone()).unwrap_err();
            assert_eq!(err.code, code, "{value}");
            assert!(err.message.contains(text), "{value}: {}", err.message);
        }
        let (id, _) = parse_request(json!({"jsonrpc": "1.0", "method": "m", "id": "x"})).unwrap_err();
        assert_eq!(id, json!("x"), "the reply keeps the id when it is readable");
    }

    #[test]
    fn frames_split_concatenated_values_and_wait_for_more() {
        let mut f = FrameReader::new(1024);
        f.push(br#"{"a":1}{"b":"#);
        assert_eq!(f.next_value().unwrap(), Some(json!({"a": 1})));
        assert_eq!(f.next_value().unwrap(), None);
        f.push(b"2}\n  ");
        assert_eq!(f.next_value().unwrap(), Some(json!({"b": 2})));
        assert_eq!(f.next_value().unwrap(), None);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn frames_reject_garbage_and_oversized_values() {
        let mut f = FrameReader::new(1024);
        f.push(b"{\"a\": nope}");
        assert!(matches!(f.next_value(), Err(FrameError::Syntax { .. })));
        let mut f = FrameReader::new(16);
        f.push(b"{\"a\": \"0123456789012345678\"");
        assert_eq!(f.next_value(), Err(FrameError::TooLarge { limit: 16 }));
        let mut f = FrameReader::new(16);
        f.push(b"{\"a\": \"0123456789012345678\"}");
        assert_eq!(f.next_value(), Err(FrameError::TooLarge { limit: 16 }));
    }

    proptest! {
        #[test]
        fn frame_reader_never_panics_and_splits_at_any_boundary(data in proptest::collection::vec(any::<u8>(), 0..256), cut in 0usize..256) {
            let mut f = FrameReader::new(128);
            let cut = cut.min(data.len());
            f.push(&data[..cut]);
            while let Ok(Some(v)) = f.next_value() { let _ = parse_request(v); }
            f.push(&data[cut..]);
            while let Ok(Some(v)) = f.next_value() { let _ = parse_request(v); }
        }

        #[test]
        fn any_split_of_valid_requests_yields_the_same_values(n in 1usize..5, cut in 0usize..200) {
            let values: Vec<Value> = (0..n).map(|i| request(i as u64, "m", Some(json!({"i": i})))).collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_string().into_bytes()).collect();
            let cut = cut.min(bytes.len());
            let mut f = FrameReader::new(4096);
            let mut got = Vec::new();
            f.push(&bytes[..cut]);
            while let Some(v) = f.next_value().unwrap() { got.push(v); }
            f.push(&bytes[cut..]);
            while let Some(v) = f.next_value().unwrap() { got.push(v); }
            prop_assert_eq!(got, values);
        }
    }
}
