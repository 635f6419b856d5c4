//! Wall-clock readings as the numbers the admin API, the logs and shared cache entries carry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds from the Unix epoch to `time` (0 for a time before it).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    unix_ms(SystemTime::now())
}
