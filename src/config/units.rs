//! Human units in the config file: durations ("250ms", "15s", "5m", "1h", "1m30s") and sizes
//! ("512", "16KiB", "10MiB", "1GB").

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// The units a duration may be written in.
const UNITS: &str = "us, ms, s, m, h, d";

/// Parses a duration made of one or more `<number><unit>` parts, in the [`UNITS`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` needs a unit ({UNITS})"))?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration"))?;
        let seconds = match unit {
            // Latency limits (`bench --fail-on p99>500us`) are read in microseconds.
            "us" | "µs" => value / 1_000_000.0,
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            "d" => value * 86400.0,
            _ => return Err(format!("`{text}`: unknown unit `{unit}` ({UNITS})")),
        };
        total = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= LONGEST)
            .ok_or_else(|| format!("`{text}` is too long (at most 3650d)"))?;
        rest = next;
    }
    Ok(total)
}

/// The longest duration taken: ten years is past any timeout or lifetime worth setting, and
/// far from where adding it to the clock could overflow.
const LONGEST: Duration = Duration::from_secs(3650 * 86_400);

/// Parses a byte size: a plain number of bytes or a number with B, KB, KiB, MB, MiB, GB, GiB
/// (KB, MB, GB are powers of 1000), or k, m, g, which are powers of 1024 as in nginx's sizes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("`{text}`: unknown size unit `{other}`")),
    };
    let bytes = (value * factor) as u64;
    // Rounded down to nothing, a size would read as 0, which means "no limit" for some keys.
    if bytes == 0 && value > 0.0 {
        return Err(format!("`{text}` is less than one byte"));
    }
    Ok(bytes)
}

/// Reads a size field as written: text with a unit, or a bare integer of bytes (`max_body =
/// 1048576`); the text is parsed with the other keys' values, so every bad one is reported.
/// [`size_text`] for a key whose absence means something of its own.
pub fn optional_size_text<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    size_text(deserializer).map(Some)
}

pub fn size_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    text_or_count(
        deserializer,
        "a size such as \"16KiB\" or a number of bytes",
    )
}

/// Reads a status range as written: text (`"200-399"`) or one status as a bare integer
/// (`expect_status = 200`).
pub fn status_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    text_or_count(deserializer, "a status or range such as \"200-399\"")
}

/// Text as written, or a non-negative integer as its digits.
fn text_or_count<'de, D: Deserializer<'de>>(
    deserializer: D,
    expecting: &'static str,
) -> Result<String, D::Error> {
    struct TextOrCount(&'static str);
    impl Visitor<'_> for TextOrCount {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_owned())
        }
        fn visit_u64<E: de::Error>(self, count: u64) -> Result<String, E> {
            Ok(count.to_string())
        }
        fn visit_i64<E: de::Error>(self, count: i64) -> Result<String, E> {
            u64::try_from(count)
                .map(|count| count.to_string())
                .map_err(|_| E::custom(format!("{}, not negative", self.0)))
        }
    }
    deserializer.deserialize_any(TextOrCount(expecting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2µs"), Ok(Duration::from_micros(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("3650d"), Ok(LONGEST));
        for huge in ["3651d", "99999999999999999999h", "3000d1000d", "1e400s"] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("16KiB"), Ok(16 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("10m"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("8k"), Ok(8 * 1024));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1XB").is_err());
        // 0 is 0 (no limit where that means none), but a fraction of a byte is a mistake.
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("0.0004KB")
            .unwrap_err()
            .contains("less than one byte"));
    }
}
