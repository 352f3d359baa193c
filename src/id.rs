//! Message ids (`_msg_id`, `_unique_id`): 32 hex digits, like oslo's `uuid4().hex`.
//!
//! A random per-process prefix and a counter: unique across processes (64 random bits) and
//! within one, and cheap — no random-number system call per message, unlike a uuid4 each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static PREFIX: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new id, never returned before by any process (with overwhelming probability).
pub(crate) fn new_id() -> String {
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!(
        "{prefix:016x}{:016x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_uuid4_hex_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16]);
    }
}
