//! "Did you mean" for unknown config keys: the keys each table takes, read from the serde
//! types that read it, and the one an unknown key is likely a misspelling of.

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::autoscale::{RawAutoscale, RawDiscover, RawPolicy, RawRules, RawSchedule};
use super::cache::{RawCache, RawRouteCache};
use super::limits::{RawAuth, RawHttp2, RawRateLimit, RawRule, RawState};
use super::raw::{
    RawActiveHealth, RawAdmin, RawConfig, RawInstanceTable, RawRoute, RawServer, RawUpstream,
};
use super::tls::{RawCertificate, RawTls};
use super::upstream_tls::RawUpstreamTls;

/// The keys a misspelt or shortened `key` of the table at `table` (a key path,
/// `upstreams.app.health`) most likely meant: the closest one if it is close enough, else
/// those it begins (`stale` for `stale_if_error` and `stale_while_revalidate`); empty when
/// nothing fits.
pub fn closest_keys(table: &str, key: &str) -> Vec<&'static str> {
    let shape = shape(table);
    let known_as = FOREIGN_NAMES
        .iter()
        .find(|(at, name, _)| *at == shape && *name == key);
    if let Some((_, _, meant)) = known_as {
        return meant.to_vec();
    }
    let Some(known) = keys_of(&shape) else {
        return Vec::new();
    };
    let most = (key.chars().count() / 3).max(1);
    let closest = known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= most)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate);
    if let Some(closest) = closest {
        return vec![closest];
    }
    if key.chars().count() < 3 {
        return Vec::new();
    }
    known
        .iter()
        .copied()
        .filter(|candidate| candidate.starts_with(key))
        .collect()
}

/// Names nginx, HAProxy and other proxies give settings (the README's "Coming from nginx"),
/// by table shape, and the keys that are meant: no spelling is near enough to find them, and
/// the nearest one can mislead (`read_timeout` is nearest `idle_timeout`).
const FOREIGN_NAMES: &[(&str, &str, &[&str])] = &[
    ("server", "client_max_body_size", &["max_body"]),
    ("server", "keepalive_timeout", &["idle_timeout"]),
    ("server", "client_header_timeout", &["header_read_timeout"]),
    ("server", "client_body_timeout", &["body_read_timeout"]),
    (
        "server",
        "large_client_header_buffers",
        &["max_header_size"],
    ),
    (
        "server",
        "read_timeout",
        &["header_read_timeout", "body_read_timeout"],
    ),
    ("server", "maxconn", &["max_connections"]),
    ("upstreams.*", "proxy_read_timeout", &["response_timeout"]),
    ("upstreams.*", "read_timeout", &["response_timeout"]),
    (
        "upstreams.*",
        "timeout",
        &["response_timeout", "connect_timeout"],
    ),
    ("upstreams.*", "proxy_connect_timeout", &["connect_timeout"]),
    ("upstreams.*", "keepalive_timeout", &["idle_timeout"]),
    ("upstreams.*", "max_conns", &["max_in_flight"]),
    ("upstreams.*", "maxconn", &["max_in_flight"]),
    ("upstreams.*", "proxy_next_upstream_tries", &["retries"]),
    ("upstreams.*", "servers", &["instances"]),
    ("upstreams.*", "server", &["instances"]),
    ("upstreams.*", "balance", &["strategy"]),
    ("upstreams.*", "health_check", &["health"]),
    ("upstreams.*", "weight", &["instances"]),
    ("routes[]", "prefix", &["path_prefix"]),
    ("routes[]", "location", &["path_prefix"]),
    ("routes[]", "server_name", &["host"]),
];

/// A table's path with what varies taken out: upstream names become `*`, array positions `[]`.
fn shape(table: &str) -> String {
    let mut shaped = Vec::new();
    for (i, segment) in table.split('.').enumerate() {
        let name = segment.split('[').next().unwrap_or_default();
        let indexed = segment.contains('[');
        let name = if i == 1 && shaped.first() == Some(&"upstreams".to_string()) {
            "*"
        } else {
            name
        };
        shaped.push(if indexed {
            format!("{name}[]")
        } else {
            name.to_string()
        });
    }
    shaped.join(".")
}

/// Every table shape and the keys its serde type takes.
type KeysOf = fn() -> &'static [&'static str];
const TABLES: &[(&str, KeysOf)] = &[
    ("", fields_of::<RawConfig>),
    ("server", fields_of::<RawServer>),
    ("server.http2", fields_of::<RawHttp2>),
    ("admin", fields_of::<RawAdmin>),
    ("upstreams.*", fields_of::<RawUpstream>),
    ("upstreams.*.instances[]", fields_of::<RawInstanceTable>),
    ("upstreams.*.health", fields_of::<RawActiveHealth>),
    ("upstreams.*.tls", fields_of::<RawUpstreamTls>),
    ("upstreams.*.autoscale", fields_of::<RawAutoscale>),
    ("upstreams.*.autoscale.scale_up", fields_of::<RawRules>),
    ("upstreams.*.autoscale.scale_down", fields_of::<RawRules>),
    (
        "upstreams.*.autoscale.scale_up.policies[]",
        fields_of::<RawPolicy>,
    ),
    (
        "upstreams.*.autoscale.scale_down.policies[]",
        fields_of::<RawPolicy>,
    ),
    (
        "upstreams.*.autoscale.schedules[]",
        fields_of::<RawSchedule>,
    ),
    ("upstreams.*.autoscale.discover", fields_of::<RawDiscover>),
    ("routes[]", fields_of::<RawRoute>),
    ("routes[].cache", fields_of::<RawRouteCache>),
    ("routes[].rate_limits[]", fields_of::<RawRule>),
    ("rate_limit.rules[]", fields_of::<RawRule>),
    ("cache", fields_of::<RawCache>),
    ("tls", fields_of::<RawTls>),
    ("tls.certificates[]", fields_of::<RawCertificate>),
    ("state", fields_of::<RawState>),
    ("rate_limit", fields_of::<RawRateLimit>),
    ("auth", fields_of::<RawAuth>),
];

/// The keys the table of that shape takes.
fn keys_of(shape: &str) -> Option<&'static [&'static str]> {
    let (_, keys) = TABLES.iter().find(|(table, _)| *table == shape)?;
    let keys = keys();
    (!keys.is_empty()).then_some(keys)
}

/// The field names serde reads `T` with: a deserializer that only takes note of them.
fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("names only"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("names only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Edits (insertions, deletions, substitutions, swaps of neighbours) from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_keys_get_the_key_of_their_table() {
        assert_eq!(closest_keys("server", "shutdown_grase"), ["shutdown_grace"]);
        assert_eq!(closest_keys("upstreams.app", "stratgey"), ["strategy"]);
        assert_eq!(
            closest_keys("upstreams.app.health", "intervall"),
            ["interval"]
        );
        assert_eq!(closest_keys("routes[2]", "path_prefx"), ["path_prefix"]);
        assert_eq!(
            closest_keys("upstreams.api.instances[0]", "wieght"),
            ["weight"]
        );
        assert_eq!(closest_keys("", "upstream"), ["upstreams"]);
        // A key shortened: those it begins.
        let mut stale = closest_keys("routes[0].cache", "stale");
        stale.sort_unstable();
        assert_eq!(stale, ["stale_if_error", "stale_while_revalidate"]);
        // The names other proxies give: what is meant, not the nearest spelling.
        assert_eq!(closest_keys("server", "client_max_body_size"), ["max_body"]);
        assert_eq!(
            closest_keys("upstreams.api", "read_timeout"),
            ["response_timeout"]
        );
        assert_eq!(closest_keys("routes[1]", "prefix"), ["path_prefix"]);
        // Nothing close, or a table not known here: no guess.
        assert!(closest_keys("server", "colour").is_empty());
        assert!(closest_keys("nowhere", "listen").is_empty());
    }

    #[test]
    fn every_table_shape_knows_its_keys() {
        for (shape, _) in TABLES {
            assert!(keys_of(shape).is_some(), "{shape}");
        }
        for (shape, name, meant) in FOREIGN_NAMES {
            let known = keys_of(shape).unwrap();
            assert!(!known.contains(name), "{shape}.{name} is a key");
            assert!(
                meant.iter().all(|key| known.contains(key)),
                "{shape}: {meant:?}"
            );
        }
        assert_eq!(
            shape("upstreams.a.autoscale.schedules[3]"),
            "upstreams.*.autoscale.schedules[]"
        );
    }

    #[test]
    fn edits_count_swaps_as_one() {
        assert_eq!(edit_distance("strategy", "strategy"), 0);
        assert_eq!(edit_distance("stratgey", "strategy"), 1);
        assert_eq!(edit_distance("path_prefx", "path_prefix"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
