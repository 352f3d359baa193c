//! oslo notification messages: `message_id` (uuid4 with dashes), `publisher_id`,
//! `event_type`, `priority` (upper case), `payload`, `timestamp` (`YYYY-MM-DD HH:MM:SS.ffffff`,
//! UTC, no zone), `_unique_id`, then the context as `_context_*` keys, in that order.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::context::RequestContext;
use crate::wire::envelope::CONTEXT_PREFIX;
use crate::wire::KeyStr;

/// A notification ready to be encoded.
pub(crate) struct NotificationOut<'a, P: ?Sized> {
    pub message_id: &'a str,
    pub publisher_id: &'a str,
    pub event_type: &'a str,
    /// Upper case, as oslo sends it (`INFO`).
    pub priority: &'a str,
    pub payload: &'a P,
    pub timestamp: &'a str,
    pub unique_id: &'a str,
    pub context: &'a RequestContext,
}

impl<P: Serialize + ?Sized> Serialize for NotificationOut<'_, P> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(7 + self.context.len()))?;
        map.serialize_entry("message_id", self.message_id)?;
        map.serialize_entry("publisher_id", self.publisher_id)?;
        map.serialize_entry("event_type", self.event_type)?;
        map.serialize_entry("priority", self.priority)?;
        map.serialize_entry("payload", self.payload)?;
        map.serialize_entry("timestamp", self.timestamp)?;
        map.serialize_entry("_unique_id", self.unique_id)?;
        for (key, value) in self.context.iter() {
            map.serialize_entry(&format!("{CONTEXT_PREFIX}{key}"), value)?;
        }
        map.end()
    }
}

/// A received notification's fields.
#[derive(Debug, Default)]
pub(crate) struct NotificationIn {
    pub message_id: String,
    pub publisher_id: String,
    pub event_type: String,
    pub priority: String,
    pub payload: Value,
    pub timestamp: String,
    pub unique_id: Option<String>,
    pub context: RequestContext,
}

impl<'de> Deserialize<'de> for NotificationIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NotificationVisitor;
        impl<'de> Visitor<'de> for NotificationVisitor {
            type Value = NotificationIn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a notification map")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<NotificationIn, M::Error> {
                let mut n = NotificationIn::default();
                let mut priority = None;
                while let Some(KeyStr(key)) = map.next_key()? {
                    match key.as_ref() {
                        "message_id" => {
                            n.message_id = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        "publisher_id" => {
                            n.publisher_id = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        "event_type" => {
                            n.event_type = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        "priority" => priority = Some(map.next_value::<String>()?),
                        "payload" => n.payload = map.next_value()?,
                        "timestamp" => {
                            n.timestamp = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        "_unique_id" => n.unique_id = map.next_value()?,
                        other => match other.strip_prefix(CONTEXT_PREFIX) {
                            Some(name) => {
                                let name = name.to_string();
                                n.context.insert(name, map.next_value::<Value>()?);
                            }
                            None => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        },
                    }
                }
                n.priority = priority.ok_or_else(|| de::Error::missing_field("priority"))?;
                Ok(n)
            }
        }
        deserializer.deserialize_map(NotificationVisitor)
    }
}

/// Python's `str(datetime.utcnow())` for now: `YYYY-MM-DD HH:MM:SS.ffffff`.
pub(crate) fn utc_timestamp(now: SystemTime) -> String {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since_epoch.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every day from 1970 to 2500 against a calendar counted a day at a time.
    #[test]
    fn civil_dates_match_a_day_by_day_calendar() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let length = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970_i64, 1_u32, 1_u32);
        for days in 0..(530 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > length(y, m) {
                (d, m) = (1, m + 1);
                if m > 12 {
                    (m, y) = (1, y + 1);
                }
            }
        }
    }

    #[test]
    fn a_notification_that_is_not_a_map_is_refused_as_such() {
        let body = crate::wire::Codec::MsgPack
            .encode(&serde_json::json!(["event_type", "x"]))
            .unwrap();
        let doc = crate::wire::Document::open(Some("application/msgpack"), body).unwrap();
        let err = doc
            .decode::<NotificationIn>()
            .expect_err("an array is refused")
            .to_string();
        assert!(err.contains("expected a notification map"), "{err}");
    }

    #[test]
    fn timestamps_like_python_utcnow() {
        let at = |secs: u64, micros: u64| {
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
        };
        assert_eq!(utc_timestamp(at(0, 0)), "1970-01-01 00:00:00.000000");
        assert_eq!(
            utc_timestamp(at(951_782_400, 5)),
            "2000-02-29 00:00:00.000005"
        );
        assert_eq!(
            utc_timestamp(at(1_795_610_242, 404_495)),
            "2026-11-25 12:37:22.404495"
        );
        assert_eq!(
            utc_timestamp(at(4_102_444_799, 999_999)),
            "2099-12-31 23:59:59.999999"
        );
    }
}
