//! JSON arguments given inline, from a file (`@FILE`) or from standard input (`-`), as curl
//! does. A JSON text never starts with `@`, so the prefix is unambiguous.

use std::io::Read;

use serde_json::{Map, Value};

use crate::Failure;

/// Reads the JSON arguments of one command; standard input can be read by one of them only.
#[derive(Default)]
pub struct Inputs {
    /// Which argument took standard input.
    stdin_taken_by: Option<String>,
}

impl Inputs {
    /// The text of argument `what`: `@FILE` is the content of FILE, `-` (or `@-`) standard
    /// input, anything else the argument itself.
    pub fn text(&mut self, what: &str, value: Option<&str>) -> Result<Option<String>, Failure> {
        let Some(value) = value else {
            return Ok(None);
        };
        let bytes = match value {
            "-" | "@-" => {
                if let Some(first) = &self.stdin_taken_by {
                    return Err(Failure::usage(format!(
                        "{first} and {what} cannot both read standard input"
                    )));
                }
                self.stdin_taken_by = Some(what.to_string());
                let mut bytes = Vec::new();
                std::io::stdin()
                    .lock()
                    .read_to_end(&mut bytes)
                    .map_err(|e| {
                        Failure::usage(format!("cannot read {what} from standard input: {e}"))
                    })?;
                bytes
            }
            _ => match value.strip_prefix('@') {
                Some("") => {
                    return Err(Failure::usage(format!(
                        "{what}: `@` must be followed by a file name (or `-` for standard input)"
                    )))
                }
                Some(path) => std::fs::read(path).map_err(|e| {
                    Failure::usage(format!("cannot read {what} from file {path:?}: {e}"))
                })?,
                None => return Ok(Some(value.to_string())),
            },
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Failure::usage(format!("{what} is not UTF-8 text")))
    }

    /// A JSON object (`{}` when absent).
    pub fn object(
        &mut self,
        what: &str,
        value: Option<&str>,
    ) -> Result<Map<String, Value>, Failure> {
        match self.value(what, value)? {
            None => Ok(Map::new()),
            Some(Value::Object(map)) => Ok(map),
            Some(_) => Err(Failure::usage(format!("{what} must be a JSON object"))),
        }
    }

    /// Any JSON value (`None` when absent).
    pub fn value(&mut self, what: &str, value: Option<&str>) -> Result<Option<Value>, Failure> {
        let Some(text) = self.text(what, value)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Failure::usage(format!("{what} is not valid JSON: {e}")))
    }
}
