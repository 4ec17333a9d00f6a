//! The control client: JSON-RPC 2.0 over the server's Unix socket (SPDK's
//! rpc.py in Rust).
//!
//! ```no_run
//! let mut client = clients::control::Client::connect("/var/tmp/claudefs.sock".as_ref(), std::time::Duration::from_secs(60)).unwrap();
//! let bdevs = client.call("bdev_get_bdevs", None).unwrap();
//! println!("{bdevs:#}");
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pmd::rpc::{FrameReader, request};
use serde_json::{Map, Value, json};

/// Why a call did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot connect to the control socket {path}: {source} (is `claudefs server` running? -s selects another socket)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed during the call.
    #[error("control connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("no response within {0:?} (-t sets the timeout)")]
    Timeout(Duration),
    /// The answer is not a JSON-RPC response.
    #[error("malformed response from the server: {0}")]
    Protocol(String),
    /// The server answered with an error.
    #[error("error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// The server's message.
        message: String,
    },
    /// The command-line parameters do not fit the method.
    #[error("{0}")]
    Usage(String),
}

/// A connection to a server.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    frames: FrameReader,
    next_id: u64,
    timeout: Duration,
}

/// Responses larger than this are refused.
const MAX_RESPONSE: usize = 256 << 20;

impl Client {
    /// Connects to the socket at `path`; calls wait at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self { stream, frames: FrameReader::new(MAX_RESPONSE), next_id: 1, timeout })
    }

    /// Calls `method` and returns its result.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes =
            serde_json::to_vec(&request(id, method, params)).map_err(|e| ClientError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.stream.write_all(&bytes)?;
        let response = self.read_value()?;
        let Value::Object(mut obj) = response else {
            return Err(ClientError::Protocol(format!("expected an object, got {response}")));
        };
        if obj.get("id") != Some(&json!(id)) && obj.get("id") != Some(&Value::Null) {
            return Err(ClientError::Protocol(format!(
                "response id {:?} does not match request id {id}",
                obj.get("id")
            )));
        }
        if let Some(err) = obj.remove("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let message = err.get("message").and_then(Value::as_str).unwrap_or("(no message)").to_string();
            return Err(ClientError::Rpc { code, message });
        }
        obj.remove("result").ok_or_else(|| ClientError::Protocol("response has neither result nor error".into()))
    }

    fn read_value(&mut self) -> Result<Value, ClientError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(v) = self.frames.next_value().map_err(|e| ClientError::Protocol(e.to_string()))? {
                return Ok(v);
            }
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(ClientError::Protocol("the server closed the connection".into()));
            }
            self.frames.push(&buf[..n]);
        }
    }

    /// The description and parameter schema of `method` (from `rpc_get_methods`).
    pub fn describe(&mut self, method: &str) -> Result<Value, ClientError> {
        let all = self.call("rpc_get_methods", Some(json!({"detail": true})))?;
        all.as_array().and_then(|a| a.iter().find(|m| m["name"] == method)).cloned().ok_or_else(|| {
            ClientError::Usage(format!("the server has no method {method:?} (rpc_get_methods lists them)"))
        })
    }
}

/// A parameter's JSON type, read from its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamType {
    Integer,
    Number,
    Boolean,
    String,
    Json,
}

/// Follows `$ref` into the schema's `$defs` and picks the non-null branch of
/// an optional, returning the type and the node holding the description.
fn param_type<'a>(root: &'a Value, mut node: &'a Value) -> (ParamType, &'a Value) {
    let described = node;
    for _ in 0..8 {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or_default();
            match root.get("$defs").and_then(|d| d.get(name)) {
                Some(target) => node = target,
                None => break,
            }
            continue;
        }
        if let Some(alts) = node.get("anyOf").or_else(|| node.get("oneOf")).and_then(Value::as_array) {
            let non_null: Vec<&Value> = alts.iter().filter(|a| a.get("type") != Some(&json!("null"))).collect();
            if non_null.iter().all(|a| a.get("const").is_some_and(Value::is_string) || a.get("enum").is_some()) {
                return (ParamType::String, described);
            }
            if let Some(first) = non_null.first() {
                node = first;
                continue;
            }
        }
        break;
    }
    let ty = match node.get("type") {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    };
    let ty = match ty {
        Some("integer") => ParamType::Integer,
        Some("number") => ParamType::Number,
        Some("boolean") => ParamType::Boolean,
        Some("string") => ParamType::String,
        _ if node.get("enum").is_some() || node.get("const").is_some_and(Value::is_string) => ParamType::String,
        _ => ParamType::Json,
    };
    (ty, described)
}

/// Turns command-line arguments into a method's parameters: either one JSON
/// object, or `--name value` pairs typed by `schema` (hyphens in names become
/// underscores; a boolean flag alone means true).
pub fn params_from_args(method: &str, schema: &Value, args: &[String]) -> Result<Option<Value>, ClientError> {
    if args.is_empty() {
        return Ok(None);
    }
    if args.len() == 1 && args[0].trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(&args[0])
            .map_err(|e| ClientError::Usage(format!("parameters are not valid JSON: {e}")))?;
        return Ok(Some(v));
    }
    let props = schema.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut out = Map::new();
    let mut i = 0;
    while i < args.len() {
        let flag = &args[i];
        let Some(name) = flag.strip_prefix("--") else {
            return Err(ClientError::Usage(format!("{method}: expected --<param> or one JSON object, got {flag:?}")));
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n.replace('-', "_"), Some(v.to_string())),
            None => (name.replace('-', "_"), None),
        };
        let Some(prop) = props.get(&name) else {
            let known: Vec<String> = props.keys().map(|k| format!("--{}", k.replace('_', "-"))).collect();
            return Err(ClientError::Usage(format!(
                "{method} has no parameter --{}; it takes: {}",
                name.replace('_', "-"),
                if known.is_empty() { "none".into() } else { known.join(" ") }
            )));
        };
        let (ty, _) = param_type(schema, prop);
        let next_is_value = args.get(i + 1).is_some_and(|a| !a.starts_with("--"));
        let raw = match (inline, ty) {
            (Some(v), _) => v,
            (None, ParamType::Boolean) if !next_is_value => "true".to_string(),
            (None, _) if next_is_value => {
                i += 1;
                args[i].clone()
            }
            (None, _) => {
                return Err(ClientError::Usage(format!("{method}: --{} needs a value", name.replace('_', "-"))));
            }
        };
        let bad = |what: &str| {
            ClientError::Usage(format!("{method}: --{} expects {what}, got {raw:?}", name.replace('_', "-")))
        };
        let value = match ty {
            ParamType::Integer => raw
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| raw.parse::<u64>().map(Value::from))
                .map_err(|_| bad("an integer"))?,
            ParamType::Number => {
                serde_json::from_str::<Value>(&raw).ok().filter(Value::is_number).ok_or_else(|| bad("a number"))?
            }
            ParamType::Boolean => match raw.as_str() {
                "true" | "yes" | "1" => Value::Bool(true),
                "false" | "no" | "0" => Value::Bool(false),
                _ => return Err(bad("true or false")),
            },
            ParamType::String => Value::String(raw),
            ParamType::Json => serde_json::from_str(&raw).map_err(|_| bad("a JSON value"))?,
        };
        out.insert(name, value);
        i += 1;
    }
    Ok(Some(Value::Object(out)))
}

/// One parameter of a method, as help and reference show it.
struct ParamDoc {
    name: String,
    ty: &'static str,
    required: bool,
    /// Description, choices and default in one sentence or more.
    text: String,
}

fn param_docs(schema: &Value) -> Vec<ParamDoc> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return Vec::new() };
    props
        .iter()
        .map(|(name, prop)| {
            let (ty, described) = param_type(schema, prop);
            let ty = match ty {
                ParamType::Integer => "integer",
                ParamType::Number => "number",
                ParamType::Boolean => "bool",
                ParamType::String => "string",
                ParamType::Json => "json",
            };
            let desc = described.get("description").and_then(Value::as_str).unwrap_or("").replace('\n', " ");
            let choices = enum_choices(schema, prop).map(|c| format!(" One of: {}.", c.join(", "))).unwrap_or_default();
            let default = prop.get("default").map(|d| format!(" Default: {d}.")).unwrap_or_default();
            ParamDoc {
                name: name.clone(),
                ty,
                required: required.contains(&name.as_str()),
                text: format!("{desc}{choices}{default}"),
            }
        })
        .collect()
}

fn when(detail: &Value) -> &'static str {
    match detail["allowed"].as_str() {
        Some("startup") => "Only before framework_start_init (server started with --wait-for-rpc).",
        Some("runtime") => "Only after framework_start_init.",
        _ => "",
    }
}

/// Renders `rpc_get_methods` detail for one method as help text.
pub fn render_help(detail: &Value) -> String {
    let name = detail["name"].as_str().unwrap_or("?");
    let mut text = format!("{name}\n\n{}\n", detail["description"].as_str().unwrap_or(""));
    let w = when(detail);
    if !w.is_empty() {
        text.push_str(&format!("\n{w}\n"));
    }
    let params = param_docs(&detail["params"]);
    if params.is_empty() {
        text.push_str("\nNo parameters.\n");
    } else {
        text.push_str("\nParameters (as --flag value, or one JSON object):\n");
        for p in params {
            let req = if p.required { " (required)" } else { "" };
            text.push_str(&format!("  --{:<22} {:<8} {}{}\n", p.name.replace('_', "-"), p.ty, p.text, req));
        }
    }
    text
}

/// Renders the detail of every method (`rpc_get_methods {"detail": true}`)
/// as the Markdown reference in docs/rpc.md.
pub fn render_reference(methods: &[Value]) -> String {
    let mut md = String::from(
        "# Control methods\n\nGenerated from the server's method table; do not edit. Regenerate with\n\
         `UPDATE_DOCS=1 cargo test --test server rpc_reference`.\n\n\
         Call any of them with `claudefs rpc METHOD --flag value ...` or `claudefs rpc METHOD '{json}'`;\n\
         `claudefs rpc METHOD --help` prints the same description from a running server.\n\n\
         | Method | Description |\n|---|---|\n",
    );
    for m in methods {
        let name = m["name"].as_str().unwrap_or("?");
        let first = m["description"].as_str().unwrap_or("").split(". ").next().unwrap_or("").trim_end_matches('.');
        md.push_str(&format!("| [`{name}`](#{name}) | {first}. |\n"));
    }
    for m in methods {
        let name = m["name"].as_str().unwrap_or("?");
        md.push_str(&format!("\n## {name}\n\n{}\n", m["description"].as_str().unwrap_or("")));
        let w = when(m);
        if !w.is_empty() {
            md.push_str(&format!("\n{w}\n"));
        }
        let params = param_docs(&m["params"]);
        if params.is_empty() {
            md.push_str("\nNo parameters.\n");
        } else {
            md.push_str("\n| Parameter | Type | Required | Description |\n|---|---|---|---|\n");
            for p in params {
                md.push_str(&format!(
                    "| `{}` | {} | {} | {} |\n",
                    p.name,
                    p.ty,
                    if p.required { "yes" } else { "no" },
                    p.text.replace('|', "\\|")
                ));
            }
        }
    }
    md
}

fn enum_choices(root: &Value, node: &Value) -> Option<Vec<String>> {
    let mut node = node;
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        node = root.get("$defs")?.get(r.rsplit('/').next()?)?;
    }
    if let Some(vals) = node.get("enum").and_then(Value::as_array) {
        return Some(vals.iter().filter_map(Value::as_str).map(String::from).collect());
    }
    let alts = node.get("oneOf").or_else(|| node.get("anyOf"))?.as_array()?;
    let consts: Vec<String> =
        alts.iter().filter_map(|a| a.get("const").and_then(Value::as_str)).map(String::from).collect();
    (!consts.is_empty()).then_some(consts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "Name."},
                "num_blocks": {"type": "integer", "format": "uint64"},
                "direct": {"type": "boolean"},
                "size": {"type": ["integer", "null"]},
                "mode": {"$ref": "#/$defs/Mode"},
                "extra": {"type": "object"}
            },
            "required": ["name"],
            "$defs": {"Mode": {"oneOf": [{"const": "drop", "description": "x"}, {"const": "keep"}]}}
        })
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_become_typed_params() {
        let p = params_from_args(
            "m",
            &schema(),
            &args(&[
                "--name",
                "m0",
                "--num-blocks",
                "64",
                "--direct",
                "--size=4096",
                "--mode",
                "keep",
                "--extra",
                "{\"a\":1}",
            ]),
        )
        .unwrap();
        assert_eq!(
            p,
            Some(
                json!({"name": "m0", "num_blocks": 64, "direct": true, "size": 4096, "mode": "keep", "extra": {"a": 1}})
            )
        );
        let p = params_from_args("m", &schema(), &args(&["--direct", "false"])).unwrap();
        assert_eq!(p, Some(json!({"direct": false})));
        assert_eq!(params_from_args("m", &schema(), &args(&["{\"x\": 1}"])).unwrap(), Some(json!({"x": 1})));
        assert_eq!(params_from_args("m", &schema(), &[]).unwrap(), None);
    }

    #[test]
    fn bad_flags_name_the_parameter() {
        let e = params_from_args("m", &schema(), &args(&["--num-blocks", "x"])).unwrap_err().to_string();
        assert!(e.contains("--num-blocks expects an integer"), "{e}");
        let e = params_from_args("m", &schema(), &args(&["--bogus", "1"])).unwrap_err().to_string();
        assert!(e.contains("no parameter --bogus") && e.contains("--num-blocks"), "{e}");
        let e = params_from_args("m", &schema(), &args(&["--name"])).unwrap_err().to_string();
        assert!(e.contains("--name needs a value"), "{e}");
        let e = params_from_args("m", &schema(), &args(&["name"])).unwrap_err().to_string();
        assert!(e.contains("expected --<param>"), "{e}");
        let e = params_from_args("m", &schema(), &args(&["{bad"])).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn help_lists_parameters_with_types_and_choices() {
        let help =
            render_help(&json!({"name": "m", "description": "Does m.", "allowed": "startup", "params": schema()}));
        assert!(help.contains("--name") && help.contains("(required)"), "{help}");
        assert!(help.contains("--num-blocks") && help.contains("integer"), "{help}");
        assert!(help.contains("One of: drop, keep"), "{help}");
        assert!(help.contains("before framework_start_init"), "{help}");
    }
}
