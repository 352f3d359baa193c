//! Limits on what a peer may send, with defaults no honest oslo.messaging peer reaches.
//!
//! A peer on the same vhost can publish anything to any queue warren reads. These bounds keep
//! one hostile or broken message from corrupting frames, pinning memory or exhausting a
//! stack; a message beyond them is refused with a clear reason (see the README's Security
//! section).

/// AMQP 0-9-1 short strings (queue, exchange, routing key, consumer tag) are at most 255
/// bytes: a longer one cannot be written into a frame at all.
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// Longest `_msg_id` / `_unique_id` accepted (oslo's are 32 hex digits). Bounds what the
/// reply map and the duplicate window keep per message.
pub(crate) const MAX_ID_LEN: usize = 255;

/// Deepest nesting of arrays and maps decoded, in either codec (serde_json's own limit).
pub(crate) const MAX_DEPTH: usize = 128;

/// Default largest message body sent or accepted: 16 MiB, RabbitMQ 4.x's default
/// `max_message_size` (3.x allows 128 MiB). Configurable with the `max_message_size` option.
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// `Ok` if `value` can be written as an AMQP short string and logged as it is: at most 255
/// bytes, no control characters. Otherwise says why, naming `what` (`"queue name"`,
/// `"routing key"`...) without echoing more than its escaped start.
pub(crate) fn check_short_string(what: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_SHORT_STRING {
        return Err(format!(
            "{what} {}... is {} bytes long; AMQP allows at most {MAX_SHORT_STRING}",
            preview(value),
            value.len()
        ));
    }
    check_printable(what, value)
}

/// `Ok` if a message id (or method name) is short enough to keep and free of control
/// characters, so that it can be logged as it is.
pub(crate) fn check_id(what: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} {}... is {} bytes long; at most {MAX_ID_LEN} are accepted",
            preview(value),
            value.len()
        ));
    }
    check_printable(what, value)
}

/// No control characters (newlines, escape sequences) that could forge log lines or reach a
/// terminal.
fn check_printable(what: &str, value: &str) -> Result<(), String> {
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{what} {} contains control characters",
            preview(value)
        ));
    }
    Ok(())
}

/// The first characters of a long peer-provided string, quoted and escaped for a log line.
pub(crate) fn preview(value: &str) -> String {
    let end = value
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= 32)
        .last()
        .unwrap_or(0);
    format!("{:?}", &value[..end])
}

/// A decoder's reason for refusing a message, fit for one log line: decoders may quote the
/// peer's data, so it is escaped and cut to 200 characters.
pub(crate) fn clip(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .flat_map(char::escape_debug)
        .take(200)
        .collect();
    if out.len() < reason.escape_debug().count() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_stop_at_255_bytes() {
        assert!(check_short_string("queue name", &"q".repeat(255)).is_ok());
        let err = check_short_string("queue name", &"q".repeat(256)).unwrap_err();
        assert!(err.contains("256 bytes"), "{err}");
        assert!(err.len() < 120, "the name is not echoed whole: {err}");
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert!(check_short_string("routing key", &"é".repeat(128)).is_err());
        assert!(check_short_string("routing key", &"é".repeat(127)).is_ok());
    }

    #[test]
    fn ids_stop_at_their_limit() {
        assert!(check_id("_msg_id", &"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(check_id("_msg_id", &"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn control_characters_are_refused_in_names_and_ids() {
        for bad in ["a\nb", "\u{1b}[31mred", "nul\0", "del\u{7f}"] {
            let err = check_id("_msg_id", bad).unwrap_err();
            assert!(err.contains("control characters"), "{err}");
            assert!(
                !err.contains('\n') && !err.contains('\u{1b}'),
                "escaped: {err}"
            );
            assert!(check_short_string("queue name", bad).is_err());
        }
        assert!(check_id("_msg_id", "reply_ünïcode-ok.1").is_ok());
    }

    #[test]
    fn reasons_are_escaped_and_clipped() {
        assert_eq!(clip("bad \"x\"\n"), "bad \\\"x\\\"\\n");
        let long = clip(&"y".repeat(1000));
        assert_eq!(long.len(), 203);
        assert!(long.ends_with("..."));
    }

    #[test]
    fn previews_cut_at_a_character_boundary_and_escape() {
        assert_eq!(preview("abc"), "\"abc\"");
        assert_eq!(preview(&"é".repeat(40)), format!("{:?}", "é".repeat(16)));
        assert_eq!(preview("\u{1b}[31m"), "\"\\u{1b}[31m\"");
    }
}
