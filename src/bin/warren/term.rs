//! Text from elsewhere (a remote failure, a reply, a notification, the broker) made safe for a
//! terminal: control characters and ANSI escapes are shown, never interpreted.

use std::borrow::Cow;

/// Characters that must not reach a terminal raw: control characters (C0 including ESC and
/// newlines, DEL, the C1 range including the 8-bit CSI `U+009B`), the line and paragraph
/// separators, and the bidirectional formatting characters that reorder what is displayed.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `text` for one line of a terminal: each unsafe character is written as its Rust escape
/// (`\n`, `\t`, `\u{1b}`...), visibly.
pub fn line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Compact JSON for a terminal, on one line. serde_json already escapes C0 controls; this
/// escapes the other unsafe characters as `\uXXXX` too (they can only occur inside JSON
/// strings, all lie in the BMP, so the JSON stays valid and means the same).
pub fn json(value: &serde_json::Value) -> String {
    escape_json(value.to_string(), false)
}

/// Indented JSON for a terminal, escaped as [`json`] is. Its newlines are the layout's own:
/// serde_json writes a newline inside a string as `\n`, so every raw one lies between tokens.
pub fn json_pretty(value: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    escape_json(text, true)
}

/// `text`, serde_json's output, with each unsafe character as `\uXXXX` (but the layout's
/// newlines when `layout_newlines`).
fn escape_json(text: String, layout_newlines: bool) -> String {
    let escaped = |c: char| is_unsafe(c) && !(layout_newlines && c == '\n');
    if !text.chars().any(escaped) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn line_escapes_controls_visibly() {
        assert_eq!(line("plain é"), "plain é");
        assert_eq!(
            line("a\x1b[31mred\x1b[0m\nnext\r\t\u{7}\u{7f}\u{9b}2J\u{202e}x"),
            "a\\u{1b}[31mred\\u{1b}[0m\\nnext\\r\\t\\u{7}\\u{7f}\\u{9b}2J\\u{202e}x"
        );
    }

    #[test]
    fn json_stays_equivalent() {
        let value = json!({"k\u{9b}": "\x1b[2J\u{7f}\u{85}\u{202e}\u{2028}\n ok"});
        let text = json(&value);
        assert!(!text.chars().any(is_unsafe), "{text}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
    }

    #[test]
    fn pretty_json_keeps_only_its_layout_newlines() {
        let value = json!({
            "k\u{9b}": ["\x1b[2J\u{7f}\u{85}\u{202e}\u{2028}\n ok\r\t", {"n": 1}],
            "empty": {},
        });
        let text = json_pretty(&value);
        assert!(text.lines().count() > 3, "{text}");
        assert!(
            text.split('\n').all(|l| !l.chars().any(is_unsafe)),
            "{text}"
        );
        assert!(!text.ends_with('\n'), "{text:?}");
        assert!(text.contains("\n  \"k\\u009b\": [\n"), "{text}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
        assert_eq!(json_pretty(&json!(42)), "42");
        assert_eq!(json_pretty(&json!("a\nb")), r#""a\nb""#);
    }
}
