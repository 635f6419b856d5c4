//! Any text as a config file: validation must answer with errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = scalegate::config::Config::from_toml(text);
    }
});
