//! Clock readings as numbers: tokio's monotonic clock as ticks from one process-wide origin
//! (for instants kept in atomics), and the wall clock as the Unix milliseconds the admin API,
//! the logs and shared cache entries carry.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Nanoseconds from the process's origin to `at` (0 for an instant before it). The origin is a
/// second before the first reading, so a reading is never 0 and atomics can keep 0 for "never".
pub fn ticks_ns(at: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_secs(1));
    at.saturating_duration_since(origin).as_nanos() as u64
}

/// [`ticks_ns`] in microseconds.
pub fn ticks_us(at: Instant) -> u64 {
    ticks_ns(at) / 1_000
}

/// [`ticks_ns`] in milliseconds.
pub fn ticks_ms(at: Instant) -> u64 {
    ticks_ns(at) / 1_000_000
}

/// Milliseconds from the Unix epoch to `time` (0 for a time before it).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    unix_ms(SystemTime::now())
}
