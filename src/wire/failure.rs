//! Remote failures: oslo's six-field failure (`class`, `module`, `message`, `tb`, `args`,
//! `kwargs`), sent as a JSON string in a reply's `failure` field.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, RemoteDetails};
use crate::wire::oslo_json;

/// The error a handler returns, as the caller will see it.
///
/// A handler's error type only needs `Into<Failure>`. The fields are oslo's, so a Python
/// client rebuilds the exception: `builtins` classes become the Python builtin
/// (`Failure::new("ValueError", "builtins", "bad value")` raises `ValueError` in Python),
/// other modules become `RemoteError` unless the client allows the module.
///
/// ```
/// use warren::Failure;
///
/// #[derive(Debug)]
/// enum ComputeError { NotFound(String), Busy }
///
/// impl From<ComputeError> for Failure {
///     fn from(e: ComputeError) -> Failure {
///         match e {
///             ComputeError::NotFound(id) => {
///                 Failure::new("InstanceNotFound", "nova.exception", format!("Instance {id} could not be found."))
///                     .with_kwargs([("instance_id".to_string(), id.into())].into_iter().collect())
///                     .expected()
///             }
///             ComputeError::Busy => Failure::new("RuntimeError", "builtins", "busy"),
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Failure(Box<Fields>);

/// Boxed so that `Result<T, Failure>` stays small.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    class: String,
    module: String,
    message: String,
    traceback: Vec<String>,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    expected: bool,
}

impl Failure {
    /// A failure of exception `class` from `module` with `message`. Its `args` are
    /// `[message]`, like a Python exception built from a message.
    pub fn new(
        class: impl Into<String>,
        module: impl Into<String>,
        message: impl Into<String>,
    ) -> Failure {
        let message = message.into();
        Failure(Box::new(Fields {
            class: class.into(),
            module: module.into(),
            args: vec![Value::String(message.clone())],
            message,
            traceback: Vec::new(),
            kwargs: Map::new(),
            expected: false,
        }))
    }

    /// A failure describing any Rust error: the class is the error type's name, the module its
    /// Rust path with `.` separators, the message its `Display`, and the traceback its chain of
    /// sources.
    ///
    /// ```
    /// use warren::Failure;
    ///
    /// let err = "ten".parse::<u32>().unwrap_err();
    /// let failure = Failure::from_error(&err);
    /// assert_eq!(failure.class(), "ParseIntError");
    /// assert_eq!(failure.message(), "invalid digit found in string");
    /// ```
    pub fn from_error<E: std::error::Error + ?Sized>(error: &E) -> Failure {
        let type_name = std::any::type_name::<E>();
        let (module, class) = split_type_name(type_name);
        let mut failure = Failure::new(class, module, error.to_string());
        let mut source = error.source();
        while let Some(cause) = source {
            failure.0.traceback.push(format!("Caused by: {cause}\n"));
            source = cause.source();
        }
        failure
    }

    /// Sets the traceback lines (oslo's `tb`).
    pub fn with_traceback(mut self, lines: Vec<String>) -> Failure {
        self.0.traceback = lines;
        self
    }

    /// Sets the positional arguments (Python `exc.args`), replacing `[message]`.
    pub fn with_args(mut self, args: Vec<Value>) -> Failure {
        self.0.args = args;
        self
    }

    /// Sets the keyword arguments (nova-style `exc.kwargs`).
    pub fn with_kwargs(mut self, kwargs: Map<String, Value>) -> Failure {
        self.0.kwargs = kwargs;
        self
    }

    /// Marks the failure as expected (oslo's `@expected_exceptions`): the server logs it at
    /// debug level instead of error. The caller sees no difference.
    pub fn expected(mut self) -> Failure {
        self.0.expected = true;
        self
    }

    /// Exception class name.
    pub fn class(&self) -> &str {
        &self.0.class
    }

    /// Module of the exception class.
    pub fn module(&self) -> &str {
        &self.0.module
    }

    /// Message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Traceback lines.
    pub fn traceback(&self) -> &[String] {
        &self.0.traceback
    }

    /// Positional arguments.
    pub fn args(&self) -> &[Value] {
        &self.0.args
    }

    /// Keyword arguments.
    pub fn kwargs(&self) -> &Map<String, Value> {
        &self.0.kwargs
    }

    /// Whether the failure was marked [`expected`](Self::expected).
    pub fn is_expected(&self) -> bool {
        self.0.expected
    }

    /// The JSON string oslo puts in a reply's `failure` field (keys in oslo's order, Python
    /// formatting).
    pub(crate) fn to_wire(&self) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            class: &'a str,
            module: &'a str,
            message: &'a str,
            tb: &'a [String],
            args: &'a [Value],
            kwargs: &'a Map<String, Value>,
        }
        let wire = Wire {
            class: &self.0.class,
            module: &self.0.module,
            message: &self.0.message,
            tb: &self.0.traceback,
            args: &self.0.args,
            kwargs: &self.0.kwargs,
        };
        // Serializing borrowed strings and JSON values cannot fail.
        oslo_json::to_python_json(&wire).unwrap_or_default()
    }

    /// Parses a reply's `failure` string. Missing fields are tolerated (older peers).
    pub(crate) fn from_wire(text: &str) -> Result<Failure, String> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            class: Option<String>,
            #[serde(default)]
            module: Option<String>,
            #[serde(default)]
            message: Option<String>,
            #[serde(default)]
            tb: Option<Vec<String>>,
            #[serde(default)]
            args: Option<Vec<Value>>,
            #[serde(default)]
            kwargs: Option<Map<String, Value>>,
        }
        let text = crate::wire::oslo_json::python_literals_as_null(text.as_bytes().to_vec());
        let wire: Wire =
            serde_json::from_slice(&text).map_err(|e| format!("invalid failure field: {e}"))?;
        Ok(Failure(Box::new(Fields {
            class: wire.class.unwrap_or_else(|| "Exception".into()),
            module: wire.module.unwrap_or_else(|| "builtins".into()),
            message: wire.message.unwrap_or_default(),
            traceback: wire.tb.unwrap_or_default(),
            args: wire.args.unwrap_or_default(),
            kwargs: wire.kwargs.unwrap_or_default(),
            expected: false,
        })))
    }

    /// The caller-side error for this failure.
    pub(crate) fn into_error(self) -> Error {
        let f = *self.0;
        Error::Remote {
            class: f.class,
            module: f.module,
            message: f.message,
            traceback: f.traceback,
            details: Box::new(RemoteDetails {
                args: f.args,
                kwargs: f.kwargs,
            }),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}: {}", self.0.module, self.0.class, self.0.message)
    }
}

/// A plain message becomes a Python `RuntimeError`.
impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new("RuntimeError", "builtins", message)
    }
}

/// A plain message becomes a Python `RuntimeError`.
impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::from(message.to_string())
    }
}

/// Any boxed error becomes a Python `RuntimeError` carrying its message and source chain, so
/// handlers returning `Result<T, Box<dyn Error + Send + Sync>>` can use `?` on anything.
impl From<Box<dyn std::error::Error + Send + Sync>> for Failure {
    fn from(error: Box<dyn std::error::Error + Send + Sync>) -> Failure {
        let mut failure = Failure::from(error.to_string());
        let mut source = error.source();
        while let Some(cause) = source {
            failure.0.traceback.push(format!("Caused by: {cause}\n"));
            source = cause.source();
        }
        failure
    }
}

fn split_type_name(type_name: &str) -> (String, String) {
    // Drop generic parameters: `a::B<c::D>` -> `a::B`.
    let base = type_name.split('<').next().unwrap_or(type_name);
    match base.rsplit_once("::") {
        Some((module, class)) => (module.replace("::", "."), class.to_string()),
        None => ("builtins".to_string(), base.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_give_back_what_was_built() {
        let kwargs: Map<String, Value> = [("code".to_string(), Value::from(42))]
            .into_iter()
            .collect();
        let failure = Failure::new("ValueError", "builtins", "bad").with_kwargs(kwargs.clone());
        assert_eq!(failure.kwargs(), &kwargs);
        assert!(
            !failure.is_expected(),
            "a failure is unexpected unless marked"
        );
        assert!(failure.expected().is_expected());
    }

    #[test]
    fn wire_round_trip_keeps_six_fields_in_oslo_order() {
        let failure = Failure::new("ValueError", "builtins", "bad \"value\"")
            .with_traceback(vec!["Traceback (most recent call last):\n".into()])
            .with_kwargs(
                [("code".to_string(), Value::from(42))]
                    .into_iter()
                    .collect(),
            );
        let wire = failure.to_wire();
        assert_eq!(
            wire,
            r#"{"class": "ValueError", "module": "builtins", "message": "bad \"value\"", "tb": ["Traceback (most recent call last):\n"], "args": ["bad \"value\""], "kwargs": {"code": 42}}"#
        );
        assert_eq!(Failure::from_wire(&wire).unwrap(), failure);
    }

    #[test]
    fn from_error_names_the_type_and_chain() {
        let err = "x".parse::<u32>().unwrap_err();
        let failure = Failure::from_error(&err);
        assert_eq!(failure.class(), "ParseIntError");
        assert_eq!(failure.module(), "core.num.error");
        assert_eq!(failure.message(), "invalid digit found in string");
    }

    #[test]
    fn tolerant_parsing() {
        let f = Failure::from_wire(r#"{"class": "X", "message": "m"}"#).unwrap();
        assert_eq!((f.class(), f.module(), f.message()), ("X", "builtins", "m"));
        assert!(Failure::from_wire("not json").is_err());
    }
}
