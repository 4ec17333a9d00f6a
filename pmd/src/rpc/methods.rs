//! The method table: typed handlers, their parameter schemas, and the
//! framework state that decides which methods may run.
//!
//! A method is registered with a parameter type that derives `Deserialize` and
//! `JsonSchema`. Its doc comments become the help text that
//! `claudefs rpc METHOD --help` prints, and its field types tell the client how
//! to turn `--flag value` into JSON. A wrong or missing parameter is answered
//! with -32602 and the path of the offending field.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::protocol::{Request, RpcError, codes, parse_request, response_err, response_ok};

/// When a method may be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Only before `framework_start_init` (options that initialisation consumes).
    Startup,
    /// Only after initialisation.
    Runtime,
    /// In both states.
    Always,
}

impl Allowed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Runtime => "runtime",
            Self::Always => "always",
        }
    }
}

/// The framework's state: before or after `framework_start_init`.
#[derive(Debug, Default)]
pub struct FrameworkState {
    initialized: AtomicBool,
}

impl FrameworkState {
    /// Whether initialisation has happened.
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    /// Marks initialisation done. Returns false if it already was.
    pub fn set_initialized(&self) -> bool {
        !self.initialized.swap(true, Ordering::AcqRel)
    }
}

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
type Handler = Arc<dyn Fn(Value) -> HandlerFuture + Send + Sync>;

struct Method {
    description: &'static str,
    allowed: Allowed,
    params: Value,
    handler: Handler,
}

/// Parameters of a method that takes none. Unknown members are refused.
#[derive(Debug, Default, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The method table and the dispatcher of requests.
pub struct Methods {
    table: BTreeMap<String, Method>,
    state: Arc<FrameworkState>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Methods").field("methods", &self.table.keys().collect::<Vec<_>>()).finish()
    }
}

/// Deserializes `params` (absent means `{}`) into `P`, naming the failing field.
pub fn decode_params<P: DeserializeOwned>(method: &str, params: Value) -> Result<P, RpcError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            RpcError::invalid_params(format!("{method}: {inner}"))
        } else {
            RpcError::invalid_params(format!("{method}: parameter `{path}`: {inner}"))
        }
    })
}

impl Methods {
    /// An empty table bound to a framework state. `rpc_get_methods` is built in.
    pub fn new(state: Arc<FrameworkState>) -> Self {
        Self { table: BTreeMap::new(), state }
    }

    /// The framework state the table checks.
    pub fn state(&self) -> &Arc<FrameworkState> {
        &self.state
    }

    /// Registers an async method. Panics on a duplicate name (a programming error).
    pub fn add<P, R, F, Fut>(&mut self, name: &str, description: &'static str, allowed: Allowed, f: F)
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        R: Serialize + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let method_name = name.to_string();
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |params: Value| {
            let decoded = decode_params::<P>(&method_name, params);
            let f = f.clone();
            Box::pin(async move {
                let result = f(decoded?).await?;
                serde_json::to_value(result)
                    .map_err(|e| RpcError::internal(format!("serializing the result failed: {e}")))
            })
        });
        let mut schema = serde_json::to_value(schemars::schema_for!(P)).unwrap_or(Value::Null);
        if let Some(obj) = schema.as_object_mut() {
            obj.remove("$schema");
        }
        let previous = self.table.insert(name.to_string(), Method { description, allowed, params: schema, handler });
        assert!(previous.is_none(), "RPC method {name} registered twice");
    }

    /// Registers a method whose handler does not await.
    pub fn add_sync<P, R, F>(&mut self, name: &str, description: &'static str, allowed: Allowed, f: F)
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P) -> Result<R, RpcError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.add(name, description, allowed, move |p: P| {
            let f = f.clone();
            async move { f(p) }
        });
    }

    /// Names of the registered methods (plus `rpc_get_methods`), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.table.keys().cloned().collect();
        names.push("rpc_get_methods".into());
        names.sort();
        names
    }

    /// Whether `name` may run now; the error says why not.
    fn check_state(&self, name: &str, allowed: Allowed) -> Result<(), RpcError> {
        let init = self.state.is_initialized();
        match (allowed, init) {
            (Allowed::Startup, true) => Err(RpcError::new(
                codes::INVALID_STATE,
                format!("{name} may only be called before framework_start_init (start the server with --wait-for-rpc)"),
            )),
            (Allowed::Runtime, false) => Err(RpcError::new(
                codes::INVALID_STATE,
                format!(
                    "{name} may only be called after the framework is initialized: call framework_start_init first"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Calls a method by name, as the config loader does.
    pub async fn call(&self, name: &str, params: Option<Value>) -> Result<Value, RpcError> {
        if name == "rpc_get_methods" {
            return self.get_methods(params.unwrap_or(Value::Null));
        }
        let method = self.table.get(name).ok_or_else(|| RpcError::method_not_found(name))?;
        self.check_state(name, method.allowed)?;
        (method.handler)(params.unwrap_or(Value::Null)).await
    }

    /// Whether `name` is allowed before initialisation (for the config loader).
    pub fn allowed_at_startup(&self, name: &str) -> bool {
        name == "rpc_get_methods" || self.table.get(name).is_some_and(|m| m.allowed != Allowed::Runtime)
    }

    /// Answers one parsed JSON value: a request, a notification or a batch.
    /// Returns `None` when nothing is to be sent back.
    pub async fn handle(&self, value: Value) -> Option<Value> {
        match value {
            Value::Array(batch) if batch.is_empty() => {
                Some(response_err(Value::Null, &RpcError::invalid_request("an empty batch is not a request")))
            }
            Value::Array(batch) => {
                let mut out = Vec::new();
                for v in batch {
                    if let Some(r) = self.handle_one(v).await {
                        out.push(r);
                    }
                }
                (!out.is_empty()).then_some(Value::Array(out))
            }
            v => self.handle_one(v).await,
        }
    }

    async fn handle_one(&self, value: Value) -> Option<Value> {
        let Request { id, method, params } = match parse_request(value) {
            Ok(r) => r,
            Err((id, err)) => return Some(response_err(id, &err)),
        };
        let result = self.call(&method, params).await;
        if let Err(e) = &result {
            tracing::debug!(method, code = e.code, "RPC failed: {}", e.message);
        }
        let id = id?; // notifications get no response
        Some(match result {
            Ok(v) => response_ok(id, v),
            Err(e) => response_err(id, &e),
        })
    }

    fn get_methods(&self, params: Value) -> Result<Value, RpcError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            #[serde(default)]
            current: bool,
            #[serde(default)]
            detail: bool,
        }
        let p: P = decode_params("rpc_get_methods", params)?;
        let mut entries: Vec<(String, Value)> = self
            .table
            .iter()
            .filter(|(n, m)| !p.current || self.check_state(n, m.allowed).is_ok())
            .map(|(name, m)| {
                let detail = json!({
                    "name": name,
                    "description": m.description,
                    "allowed": m.allowed.as_str(),
                    "params": m.params,
                });
                (name.clone(), detail)
            })
            .collect();
        entries.push((
            "rpc_get_methods".into(),
            json!({
                "name": "rpc_get_methods",
                "description": "List the methods this server offers. `current`: only those callable now; `detail`: with descriptions and parameter schemas.",
                "allowed": "always",
                "params": {"type": "object", "properties": {
                    "current": {"type": "boolean", "description": "Only methods callable in the current state."},
                    "detail": {"type": "boolean", "description": "Include descriptions and parameter schemas."}}},
            }),
        ));
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(if p.detail {
            Value::Array(entries.into_iter().map(|(_, d)| d).collect())
        } else {
            Value::Array(entries.into_iter().map(|(n, _)| Value::String(n)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters of the test method.
    #[derive(serde::Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct AddParams {
        /// First addend.
        a: i64,
        /// Second addend.
        #[serde(default)]
        b: i64,
    }

    fn table() -> Methods {
        let mut m = Methods::new(Arc::default());
        m.add_sync("math_add", "Adds two numbers.", Allowed::Always, |p: AddParams| Ok(p.a + p.b));
        m.add_sync("opt_set", "Startup only.", Allowed::Startup, |_: NoParams| Ok(true));
        m.add_sync("run_only", "Runtime only.", Allowed::Runtime, |_: NoParams| Ok(true));
        m
    }

    fn block<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn dispatches_and_names_bad_params() {
        let m = table();
        let ok = block(m.handle(json!({"jsonrpc":"2.0","id":1,"method":"math_add","params":{"a":2,"b":3}})));
        assert_eq!(ok, Some(json!({"jsonrpc":"2.0","id":1,"result":5})));
        let err = block(m.call("math_add", Some(json!({"b": 1})))).unwrap_err();
        assert_eq!(err.code, codes::INVALID_PARAMS);
        assert!(err.message.contains("missing field `a`"), "{}", err.message);
        let err = block(m.call("math_add", Some(json!({"a": "x"})))).unwrap_err();
        assert!(err.message.contains("parameter `a`"), "{}", err.message);
        let err = block(m.call("math_add", Some(json!({"a": 1, "c": 2})))).unwrap_err();
        assert!(err.message.contains("unknown field `c`"), "{}", err.message);
        let err = block(m.call("nope", None)).unwrap_err();
        assert_eq!(err.code, codes::METHOD_NOT_FOUND);
    }

    #[test]
    fn notifications_get_no_answer_and_batches_get_arrays() {
        let m = table();
        assert_eq!(block(m.handle(json!({"jsonrpc":"2.0","method":"math_add","params":{"a":1}}))), None);
        let batch = block(m.handle(json!([
            {"jsonrpc":"2.0","id":1,"method":"math_add","params":{"a":1}},
            {"jsonrpc":"2.0","method":"math_add","params":{"a":1}},
            {"jsonrpc":"1.0","id":3,"method":"math_add"}
        ])))
        .unwrap();
        let arr = batch.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[1]["error"]["code"], codes::INVALID_REQUEST);
        assert_eq!(block(m.handle(json!([]))).unwrap()["error"]["code"], codes::INVALID_REQUEST);
    }

    #[test]
    fn state_gates_startup_and_runtime_methods() {
        let m = table();
        assert!(block(m.call("opt_set", None)).is_ok());
        assert_eq!(block(m.call("run_only", None)).unwrap_err().code, codes::INVALID_STATE);
        assert!(m.state().set_initialized());
        assert!(!m.state().set_initialized());
        assert!(block(m.call("run_only", None)).is_ok());
        let err = block(m.call("opt_set", None)).unwrap_err();
        assert!(err.message.contains("before framework_start_init"), "{}", err.message);
    }

    #[test]
    fn get_methods_lists_names_and_schemas() {
        let m = table();
        let names = block(m.call("rpc_get_methods", None)).unwrap();
        assert_eq!(names, json!(["math_add", "opt_set", "rpc_get_methods", "run_only"]));
        let current = block(m.call("rpc_get_methods", Some(json!({"current": true})))).unwrap();
        assert_eq!(current, json!(["math_add", "opt_set", "rpc_get_methods"]));
        let detail = block(m.call("rpc_get_methods", Some(json!({"detail": true})))).unwrap();
        let add = detail.as_array().unwrap().iter().find(|d| d["name"] == "math_add").unwrap();
        assert_eq!(add["params"]["properties"]["a"]["description"], "First addend.");
        assert_eq!(add["params"]["required"], json!(["a"]));
    }
}
