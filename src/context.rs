//! The request context travelling with every call and cast.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// oslo's request context: a string-keyed map of JSON values, sent as `_context_<key>` fields
/// and handed to the server's handler.
///
/// Keys keep their insertion order on the wire, as oslo's do. On the server side the context
/// also holds `client_timeout` (the request's call-monitor timeout or `null`), as oslo adds it.
///
/// ```
/// use warren::RequestContext;
///
/// let ctx = RequestContext::new()
///     .with("user_id", "alice")
///     .with("roles", vec!["member", "reader"])
///     .with("is_admin", false);
/// assert_eq!(ctx.get_str("user_id"), Some("alice"));
/// assert_eq!(ctx.len(), 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestContext {
    values: Map<String, Value>,
}

impl RequestContext {
    /// An empty context.
    pub fn new() -> RequestContext {
        RequestContext::default()
    }

    /// Adds (or replaces) a value and returns the context, for chaining.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> RequestContext {
        self.insert(key, value);
        self
    }

    /// Adds (or replaces) a value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.values.insert(key.into(), value.into());
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The value of `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.values.get(key).and_then(Value::as_str)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.values.iter()
    }

    /// The underlying map.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.values
    }
}

impl From<Map<String, Value>> for RequestContext {
    fn from(values: Map<String, Value>) -> Self {
        RequestContext { values }
    }
}
