//! oslo's `NotificationFilter`: regular expressions on a notification's fields, matched at the
//! start of the value like Python's `re.match`.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::notify::Notification;

/// Which notifications an endpoint wants. Every pattern given must match the start of its
/// field (Python's `re.match`); a context or metadata key that is missing or not a string
/// does not match.
///
/// ```
/// use warren::NotificationFilter;
///
/// let filter = NotificationFilter::new()
///     .event_type(r"compute\.instance\..*")?
///     .publisher_id("compute")?
///     .context("project_id", "^p1$")?;
/// # let _ = filter;
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct NotificationFilter {
    event_type: Option<Regex>,
    publisher_id: Option<Regex>,
    context: BTreeMap<String, Regex>,
    metadata: BTreeMap<String, Regex>,
}

fn anchored(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})")).map_err(|e| Error::InvalidOption {
        name: format!("notification filter on {field}"),
        reason: e.to_string(),
    })
}

impl NotificationFilter {
    /// A filter that lets everything through.
    pub fn new() -> NotificationFilter {
        NotificationFilter::default()
    }

    /// Requires the event type to match `pattern`.
    pub fn event_type(mut self, pattern: &str) -> Result<NotificationFilter> {
        self.event_type = Some(anchored("event_type", pattern)?);
        Ok(self)
    }

    /// Requires the publisher id to match `pattern`.
    pub fn publisher_id(mut self, pattern: &str) -> Result<NotificationFilter> {
        self.publisher_id = Some(anchored("publisher_id", pattern)?);
        Ok(self)
    }

    /// Requires context key `key` to be a string matching `pattern`.
    pub fn context(mut self, key: &str, pattern: &str) -> Result<NotificationFilter> {
        self.context
            .insert(key.to_string(), anchored(key, pattern)?);
        Ok(self)
    }

    /// Requires metadata key `key` (`message_id` or `timestamp`) to match `pattern`.
    pub fn metadata(mut self, key: &str, pattern: &str) -> Result<NotificationFilter> {
        self.metadata
            .insert(key.to_string(), anchored(key, pattern)?);
        Ok(self)
    }

    /// Whether `notification` passes.
    pub fn matches(&self, notification: &Notification) -> bool {
        let field = |pattern: &Option<Regex>, value: &str| {
            pattern.as_ref().is_none_or(|p| p.is_match(value))
        };
        field(&self.event_type, &notification.event_type)
            && field(&self.publisher_id, &notification.publisher_id)
            && self.context.iter().all(|(key, pattern)| {
                matches!(notification.ctxt.get(key), Some(Value::String(v)) if pattern.is_match(v))
            })
            && self.metadata.iter().all(|(key, pattern)| {
                let value = match key.as_str() {
                    "message_id" => Some(notification.metadata.message_id.as_str()),
                    "timestamp" => Some(notification.metadata.timestamp.as_str()),
                    _ => None,
                };
                value.is_some_and(|v| pattern.is_match(v))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{NotificationMetadata, Priority};
    use crate::RequestContext;
    use serde_json::json;

    fn notification() -> Notification {
        Notification {
            priority: Priority::Info,
            ctxt: RequestContext::new()
                .with("project_id", "p1")
                .with("roles", json!(["a"])),
            publisher_id: "compute.host-1".into(),
            event_type: "compute.instance.create.end".into(),
            payload: json!({}),
            metadata: NotificationMetadata {
                message_id: "6486382a-903e-4921-a07f-666e0f0f3687".into(),
                timestamp: "2026-11-25 12:37:22.404495".into(),
            },
        }
    }

    #[test]
    fn patterns_match_at_the_start_like_re_match() {
        let n = notification();
        assert!(NotificationFilter::new().matches(&n));
        assert!(NotificationFilter::new()
            .event_type("compute")
            .unwrap()
            .matches(&n));
        assert!(
            !NotificationFilter::new()
                .event_type("instance")
                .unwrap()
                .matches(&n),
            "anchored at the start"
        );
        assert!(NotificationFilter::new()
            .event_type(r"compute\.instance\..*\.end$")
            .unwrap()
            .matches(&n));
        assert!(
            NotificationFilter::new()
                .event_type("a|compute")
                .unwrap()
                .matches(&n),
            "the group keeps | anchored"
        );
        assert!(!NotificationFilter::new()
            .publisher_id("network")
            .unwrap()
            .matches(&n));
        assert!(NotificationFilter::new()
            .context("project_id", "p1")
            .unwrap()
            .matches(&n));
        assert!(!NotificationFilter::new()
            .context("project_id", "p2")
            .unwrap()
            .matches(&n));
        assert!(
            !NotificationFilter::new()
                .context("user_id", ".*")
                .unwrap()
                .matches(&n),
            "missing key"
        );
        assert!(
            !NotificationFilter::new()
                .context("roles", ".*")
                .unwrap()
                .matches(&n),
            "not a string"
        );
        assert!(NotificationFilter::new()
            .metadata("timestamp", "2026-11")
            .unwrap()
            .matches(&n));
        assert!(!NotificationFilter::new()
            .metadata("nope", ".*")
            .unwrap()
            .matches(&n));
        assert!(NotificationFilter::new().event_type("(").is_err());
    }

    #[test]
    fn metadata_filters_read_the_message_id_and_the_timestamp() {
        let n = notification();
        let on = |key: &str, pattern: &str| {
            NotificationFilter::new()
                .metadata(key, pattern)
                .unwrap()
                .matches(&n)
        };
        assert!(on("message_id", "6486382a"));
        assert!(!on("message_id", "ffff"));
        assert!(on("timestamp", "2026-11-25"));
        assert!(!on("timestamp", "2025"));
        assert!(!on("priority", ".*"), "other metadata keys match nothing");
    }
}
