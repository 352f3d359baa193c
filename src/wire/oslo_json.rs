//! oslo.messaging's JSON wire format, byte for byte.
//!
//! oslo serializes with Python's `json.dumps` defaults: separators `", "` and `": "`,
//! `ensure_ascii` (every non-ASCII character as `\uXXXX`, astral characters as surrogate pairs),
//! floats as Python's `repr`. The payload is JSON text *inside* a JSON string:
//! `{"oslo.version": "2.0", "oslo.message": "<json>"}`.

use std::fmt::Write as _;
use std::io;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::ser::Formatter;

use crate::version::Version;

/// The envelope version oslo writes and the only one it reads.
pub(crate) const ENVELOPE_VERSION: &str = "2.0";

/// A `serde_json` formatter that writes what Python's `json.dumps` writes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // serde_json already escaped `"`, `\` and control characters; what is left to do is
        // Python's ensure_ascii: DEL and everything beyond ASCII.
        // Bytes below 0x7f are the ASCII characters written as they are: scan bytes (fast on
        // large strings) and decode a character only where one needs escaping.
        let bytes = fragment.as_bytes();
        let mut start = 0;
        while let Some(offset) = bytes[start..].iter().position(|&b| b >= 0x7f) {
            let i = start + offset;
            w.write_all(&bytes[start..i])?;
            let Some(ch) = fragment[i..].chars().next() else {
                break;
            };
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        w.write_all(&bytes[start..])
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(python_float_repr(f64::from(value)).as_bytes())
    }
}

/// Python's item separator `", "` (none before the first item).
fn separator<W: ?Sized + io::Write>(w: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

/// Python's `repr(float)` for a finite value: shortest round-trip digits, exponent form when
/// the decimal point would be before the 4th leading zero or after the 16th digit.
pub(crate) fn python_float_repr(value: f64) -> String {
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .into();
    }
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let decpt = exp + 1;
    let mut out = String::with_capacity(24);
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        let _ = write!(out, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-decpt) as usize));
        out.push_str(&digits);
    } else if decpt >= n {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (decpt - n) as usize));
        out.push_str(".0");
    } else {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    }
    out
}

/// Serializes `value` as Python's `json.dumps` would, appending to `out`.
pub(crate) fn write_python_json<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(out, PythonFormatter);
    value.serialize(&mut ser)
}

/// `json.dumps(value)` as a `String`.
pub(crate) fn to_python_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::with_capacity(128);
    write_python_json(&mut out, value)?;
    // The formatter only ever writes ASCII.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Wraps serialized message JSON in oslo's 2.0 envelope.
pub(crate) fn wrap_envelope(inner: &[u8]) -> serde_json::Result<Vec<u8>> {
    let inner = std::str::from_utf8(inner).map_err(de::Error::custom)?;
    let mut out = Vec::with_capacity(inner.len() + inner.len() / 8 + 48);
    out.extend_from_slice(b"{\"oslo.version\": \"2.0\", \"oslo.message\": ");
    write_python_json(&mut out, inner)?;
    out.push(b'}');
    Ok(out)
}

/// Opens a received JSON body: returns the message JSON inside a 2.0 envelope, or the body
/// itself for an envelope-less (1.0) message. Rejects non-objects and other envelope versions,
/// as oslo does.
pub(crate) fn unwrap_envelope(body: Vec<u8>) -> Result<Vec<u8>, String> {
    // kombu decodes every JSON body as UTF-8 first. serde_json does not check the strings it
    // skips, so without this a body could open and later fail to be written again.
    if let Err(e) = std::str::from_utf8(&body) {
        return Err(format!("the JSON body is not UTF-8: {e}"));
    }
    let body = python_literals_as_null(body);
    let probe: EnvelopeProbe =
        serde_json::from_slice(&body).map_err(|e| format!("invalid JSON body: {e}"))?;
    match (probe.version, probe.message) {
        (Some(version), Some(message)) => {
            let compatible = Version::parse(&version)
                .map(|v| Version::parse(ENVELOPE_VERSION).is_ok_and(|ours| ours.can_serve(&v)))
                .unwrap_or(false);
            if !compatible {
                return Err(format!(
                    "unsupported envelope version {version:?} (expected {ENVELOPE_VERSION})"
                ));
            }
            Ok(python_literals_as_null(message.into_bytes()))
        }
        _ => Ok(body),
    }
}

/// Python's `json.dumps` writes the non-finite floats as the bare tokens `NaN`, `Infinity`
/// and `-Infinity`, which JSON (and serde_json) has no value for. They are read as `null`,
/// so the rest of the message stays readable: a handler argument of type `Option<f64>` or
/// `serde_json::Value` gets `None` / `null`, an `f64` one a `TypeError` naming it.
///
/// Tokens inside strings are left alone; a body without any of them is returned as is
/// after one byte scan.
pub(crate) fn python_literals_as_null(text: Vec<u8>) -> Vec<u8> {
    let mentions = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    if !mentions(b"NaN") && !mentions(b"Infinity") {
        return text;
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            let token = [&b"NaN"[..], b"Infinity", b"-Infinity"]
                .into_iter()
                .find(|token| text[i..].starts_with(token));
            if let Some(token) = token {
                out.extend_from_slice(b"null");
                i += token.len();
                continue;
            }
            in_string = byte == b'"';
        }
        out.push(byte);
        i += 1;
    }
    out
}

/// The two envelope keys of a body; the body must be a JSON object.
struct EnvelopeProbe {
    version: Option<String>,
    message: Option<String>,
}

impl<'de> Deserialize<'de> for EnvelopeProbe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProbeVisitor;
        impl<'de> Visitor<'de> for ProbeVisitor {
            type Value = EnvelopeProbe;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvelopeProbe, A::Error> {
                let mut probe = EnvelopeProbe {
                    version: None,
                    message: None,
                };
                while let Some(crate::wire::KeyStr(key)) = map.next_key()? {
                    match key.as_ref() {
                        "oslo.version" => probe.version = map.next_value::<Option<String>>()?,
                        "oslo.message" => probe.message = map.next_value::<Option<String>>()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(probe)
            }
        }
        deserializer.deserialize_map(ProbeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_that_are_not_utf8_do_not_open() {
        // Found by the oslo_envelope fuzz target: invalid UTF-8 in a skipped value.
        let err = unwrap_envelope(b"{\"\":\"\xac\"}".to_vec()).unwrap_err();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn floats_read_back_exactly() {
        // Found by the json_roundtrip fuzz target: serde_json's default float parser is off
        // by an ulp or two for some values; Python reads repr() exactly.
        for x in [
            1.764761702864496e-307_f64,
            0.09999997462145985,
            0.1,
            1e300,
            5e-324,
        ] {
            let text = to_python_json(&x).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{text}");
        }
    }

    #[test]
    fn python_non_finite_floats_read_as_null_outside_strings() {
        let python = br#"{"a": NaN, "b": [Infinity, -Infinity, 1.5], "s": "NaN -Infinity \" NaN", "t": "x\\"}"#;
        let read: serde_json::Value =
            serde_json::from_slice(&python_literals_as_null(python.to_vec())).unwrap();
        assert_eq!(
            read,
            json!({"a": null, "b": [null, null, 1.5], "s": "NaN -Infinity \" NaN", "t": "x\\"})
        );
        // A body without them is returned untouched: the same buffer, not a copy.
        let plain = br#"{"a": 1}"#.to_vec();
        let buffer = plain.as_ptr();
        let returned = python_literals_as_null(plain);
        assert_eq!(returned.as_ptr(), buffer);
    }

    #[test]
    fn each_non_finite_token_alone_is_read_as_null() {
        for (python, expected) in [
            (&br#"{"a": NaN}"#[..], json!({"a": null})),
            (br#"{"a": Infinity}"#, json!({"a": null})),
            (br#"{"a": -Infinity}"#, json!({"a": null})),
        ] {
            let read: serde_json::Value =
                serde_json::from_slice(&python_literals_as_null(python.to_vec())).unwrap();
            assert_eq!(read, expected, "{}", String::from_utf8_lossy(python));
        }
    }

    #[test]
    fn a_token_after_a_string_with_escapes_is_read_as_null() {
        // The escape ends with the character it escapes: the string still closes.
        let python = br#"{"s": "q\"\\", "n": NaN}"#;
        let read: serde_json::Value =
            serde_json::from_slice(&python_literals_as_null(python.to_vec())).unwrap();
        assert_eq!(read, json!({"s": "q\"\\", "n": null}));
    }

    #[test]
    fn python_non_finite_floats_inside_the_envelope_are_read() {
        let inner = r#"{"method": "m", "args": {"x": NaN, "y": -Infinity}}"#;
        let body = format!(
            "{{\"oslo.version\": \"2.0\", \"oslo.message\": {}}}",
            serde_json::to_string(inner).unwrap()
        );
        let message = unwrap_envelope(body.into_bytes()).unwrap();
        let read: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert_eq!(read, json!({"method": "m", "args": {"x": null, "y": null}}));
    }

    #[test]
    fn separators_and_ascii_like_python() {
        let v = json!({"a": [1, 2, {"b": null}], "s": "h\u{e9}llo \u{2603} \u{1F680}\x7f\n\"\\/"});
        assert_eq!(
            to_python_json(&v).unwrap(),
            r#"{"a": [1, 2, {"b": null}], "s": "h\u00e9llo \u2603 \ud83d\ude80\u007f\n\"\\/"}"#
        );
        assert_eq!(to_python_json(&json!({})).unwrap(), "{}");
        assert_eq!(to_python_json(&json!([])).unwrap(), "[]");
        assert_eq!(
            to_python_json(&"\u{1}\u{8}\u{c}\t\r").unwrap(),
            r#""\u0001\b\f\t\r""#
        );
    }

    #[test]
    fn f32_values_are_written_as_python_reads_their_f64() {
        assert_eq!(to_python_json(&1.5_f32).unwrap(), "1.5");
        // Python has only doubles: the f32 nearest 0.1, widened exactly.
        assert_eq!(to_python_json(&0.1_f32).unwrap(), "0.10000000149011612");
    }

    #[test]
    fn a_body_that_is_not_an_object_says_an_object_was_expected() {
        let err = unwrap_envelope(b"[1, 2]".to_vec()).unwrap_err();
        assert!(err.contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn floats_like_python_repr() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (123456789.123, "123456789.123"),
        ];
        for (v, expected) in cases {
            assert_eq!(python_float_repr(v), expected, "{v:e}");
        }
    }

    #[test]
    fn envelope_round_trip() {
        let inner = to_python_json(&json!({"method": "echo", "args": {"x": "\u{e9}"}})).unwrap();
        let body = wrap_envelope(inner.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"oslo.version": "2.0", "oslo.message": "{\"method\": \"echo\", \"args\": {\"x\": \"\\u00e9\"}}"}"#
        );
        assert_eq!(unwrap_envelope(body).unwrap(), inner.as_bytes());
    }

    #[test]
    fn envelope_rules() {
        // 1.0: a bare object is the message itself.
        let bare = br#"{"method": "echo", "args": {}}"#.to_vec();
        assert_eq!(unwrap_envelope(bare.clone()).unwrap(), bare);
        for bad in [
            &br#"{"oslo.version": "2.1", "oslo.message": "{}"}"#[..],
            br#"{"oslo.version": "3.0", "oslo.message": "{}"}"#,
            br#"{"oslo.version": "x", "oslo.message": "{}"}"#,
            br#"[1, 2]"#,
            b"\xff\xfe garbage",
            b"",
        ] {
            assert!(
                unwrap_envelope(bad.to_vec()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            unwrap_envelope(br#"{"oslo.version": "2.0.0", "oslo.message": "{}"}"#.to_vec()).is_ok()
        );
    }
}
