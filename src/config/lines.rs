//! The line a key path of the config file (`upstreams.app.instances[1].weight`, `routes[0]`)
//! stands on, for the problems found after parsing, which serde cannot place.

use toml_edit::{ImDocument, Item};

use super::ConfigError;

/// Gives each of `errors` without a line the line of its key in `text` (parsed once for all).
pub fn place(text: &str, errors: &mut [ConfigError]) {
    let Ok(doc) = ImDocument::parse(text) else {
        return;
    };
    for err in errors.iter_mut().filter(|err| err.line.is_none()) {
        err.line = line_of(&doc, text, &err.key);
    }
}

/// The line of `key`; for a key the file leaves out, the line of the nearest table or key
/// above it that is there. `None` when not even the first part is in the file.
fn line_of(doc: &ImDocument<&str>, text: &str, key: &str) -> Option<usize> {
    let mut item = doc.as_item();
    let mut span = None;
    'walk: for part in key.split('.') {
        let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
        let Some((found, next)) = item.as_table_like().and_then(|t| t.get_key_value(name)) else {
            break;
        };
        span = found.span().or(next.span()).or(span);
        item = next;
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            let index: Option<usize> = index.trim_end_matches(']').parse().ok();
            let Some(element) = index.and_then(|i| item.get(i)) else {
                break 'walk;
            };
            span = element.span().or(span);
            item = element;
        }
    }
    span.map(|span| line_at(text, span.start))
}

/// The keys (as problems name them) of the innermost values of `text` holding each of
/// `offsets`; an offset in no value (a table's header) holds none.
pub fn keys_at(text: &str, offsets: &[usize]) -> Vec<String> {
    let Ok(doc) = ImDocument::parse(text) else {
        return Vec::new();
    };
    offsets
        .iter()
        .filter_map(|&at| innermost(doc.as_item(), String::new(), at))
        .collect()
}

/// The key of the innermost value inside `item` (at `key`) whose span holds `at`.
fn innermost(item: &Item, key: String, at: usize) -> Option<String> {
    if let Some(table) = item.as_table_like() {
        for (name, child) in table.iter() {
            let child_key = if key.is_empty() {
                name.to_owned()
            } else {
                format!("{key}.{name}")
            };
            if let Some(found) = innermost(child, child_key, at) {
                return Some(found);
            }
        }
    }
    // Array elements, of `[...]` and of `[[...]]` alike.
    for index in 0.. {
        let Some(element) = item.get(index) else {
            break;
        };
        if let Some(found) = innermost(element, format!("{key}[{index}]"), at) {
            return Some(found);
        }
    }
    // Values only: a table's span is its header, which names keys rather than holding a value.
    let holds = item
        .as_value()
        .and_then(toml_edit::Value::span)
        .is_some_and(|span| span.contains(&at));
    holds.then_some(key)
}

/// The line (from 1) byte `offset` of `text` is on.
pub fn line_at(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use toml_edit::ImDocument;

    /// The line of `key` in `TEXT`.
    fn line_of(key: &str) -> Option<usize> {
        super::line_of(&ImDocument::parse(TEXT).unwrap(), TEXT, key)
    }

    const TEXT: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n\n\
        [upstreams.app]\nstrategy = \"fastest\"\n\
        instances = [\n  \"127.0.0.1:3001\",\n  { addr = \"127.0.0.1:3002\", weight = 0 },\n]\n\n\
        [[routes]]\nupstream = \"app\"\n\n[[routes]]\nupstream = \"nowhere\"\n";

    #[test]
    fn keys_tables_and_array_elements_have_their_lines() {
        assert_eq!(line_of("server.listen"), Some(2));
        assert_eq!(line_of("upstreams.app.strategy"), Some(5));
        assert_eq!(line_of("upstreams.app.instances[1].weight"), Some(8));
        assert_eq!(line_of("routes[1].upstream"), Some(15));
        assert_eq!(line_of("routes[1]"), Some(14));
    }

    #[test]
    fn offsets_are_found_in_the_innermost_value_holding_them() {
        let at = |needle: &str| TEXT.find(needle).unwrap();
        let offsets = [
            at("127.0.0.1:8080"),
            at("fastest"),
            at("weight = 0") + 9,
            at("\"nowhere"),
            at("[upstreams"),
        ];
        assert_eq!(
            super::keys_at(TEXT, &offsets),
            [
                "server.listen",
                "upstreams.app.strategy",
                "upstreams.app.instances[1].weight",
                "routes[1].upstream",
            ]
        );
    }

    #[test]
    fn a_missing_key_points_at_what_holds_it() {
        assert_eq!(line_of("upstreams.app.health.path"), Some(4));
        assert_eq!(line_of("routes[7].upstream"), Some(11));
        assert_eq!(line_of("cache.max_size"), None);
        assert_eq!(line_of("${HOME}"), None);
    }
}
