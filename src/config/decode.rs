//! Reading the interpolated text into [`RawConfig`] so that every value of the wrong type and
//! every unknown key is reported at once. serde stops at its first error; the key that failed is
//! taken out of the parsed document and the rest is read again, until it reads. A wrongly typed
//! array element or a missing required key takes out the innermost key holding it, since an
//! element cannot go without renumbering the rest: the whole array (for a `[[routes]]` entry
//! lacking `upstream`, every route), or the table lacking the key.

use std::fmt::Write as _;

use serde_path_to_error::Segment;

use super::{key_path, lines, ConfigError, ConfigErrors, RawConfig};

/// How many wrongly typed values one run reports at most.
const MAX_TYPE_ERRORS: usize = 64;

/// What reading the file gave: the raw config when it read (once any wrongly typed keys were
/// taken out), and the problems found on the way.
pub struct Decoded {
    pub raw: Option<RawConfig>,
    /// Unknown keys, each once: wrong whatever their values.
    pub unknown: Vec<ConfigError>,
    /// Wrongly typed values (and missing required keys), each once.
    pub typed: Vec<ConfigError>,
    /// Keys taken out because their values had the wrong type.
    pub removed: Vec<String>,
}

/// Whether a problem found at `key` after reading may come only from a key taken out: the key
/// itself, something inside it, or the table holding it (whose checks across its keys, such as
/// "username and password together" or "a route like another", saw the key's default).
pub fn left_by_removed(removed: &[String], key: &str) -> bool {
    removed.iter().any(|removed| {
        let inside = key
            .strip_prefix(removed.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
        let holder = removed.rfind(['.', '[']).map(|at| &removed[..at]);
        inside || holder == Some(key)
    })
}

/// Reads `text`; a syntax error is the one error returned.
pub fn decode(text: &str) -> Result<Decoded, ConfigErrors> {
    let mut unknown = Vec::new();
    let first = match read(toml::Deserializer::new(text), &mut unknown) {
        Ok(raw) => {
            return Ok(Decoded {
                raw: Some(raw),
                unknown,
                typed: Vec::new(),
                removed: Vec::new(),
            })
        }
        Err(err) => err,
    };
    let path = first.path().clone();
    let err = first.into_inner();
    let line = err.span().map(|span| lines::line_at(text, span.start));
    if path.iter().next().is_none() {
        return Err(ConfigErrors(vec![syntax_error(text, &err)]));
    }
    // The text parsed (serde reached a key), so it parses as a document too.
    let Ok(table) = text.parse::<toml::Table>() else {
        return Err(ConfigErrors(vec![syntax_error(text, &err)]));
    };
    let mut document = toml::Value::Table(table);
    let (mut raw, mut removed, mut typed) = (None, Vec::<String>::new(), Vec::new());
    let mut failed = (path, err.message().to_owned(), line);
    let mut complete = false;
    for _ in 0..MAX_TYPE_ERRORS {
        let (path, message, line) = failed;
        let root = path.iter().next().is_none();
        let key = if root {
            "config".to_owned()
        } else {
            path.to_string()
        };
        let reported = missing_field(&message).is_some_and(|field| {
            // Missing because its wrongly typed value was taken out: reported already.
            let missing = if root {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
            removed.contains(&missing)
        });
        if !reported {
            typed.push(ConfigError { key, line, message });
        }
        let Some(taken) = take_out(&mut document, &path) else {
            complete = true;
            break;
        };
        removed.push(taken);
        match read(document.clone(), &mut unknown) {
            Ok(read) => {
                raw = Some(read);
                complete = true;
                break;
            }
            Err(err) => {
                failed = (
                    err.path().clone(),
                    err.into_inner().message().to_owned(),
                    None,
                )
            }
        }
    }
    if !complete {
        typed.push(ConfigError {
            key: "config".to_owned(),
            line: None,
            message: format!(
                "more than {MAX_TYPE_ERRORS} values of the wrong type; the rest are not shown \
                 (nor what else is wrong): fix these and check again"
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    unknown.retain(|problem: &ConfigError| seen.insert(problem.key.clone()));
    Ok(Decoded {
        raw,
        unknown,
        typed,
        removed,
    })
}

/// One pass of serde over the document, noting keys no field takes into `unknown`.
fn read<'de, D: serde::Deserializer<'de>>(
    document: D,
    unknown: &mut Vec<ConfigError>,
) -> Result<RawConfig, serde_path_to_error::Error<D::Error>> {
    let mut note_unknown = |path: serde_ignored::Path| {
        let key = key_path(&path);
        let (table, name) = key.rsplit_once('.').unwrap_or(("", &key));
        let meant = super::suggest::closest_keys(table, name);
        let message = if meant.is_empty() {
            format!("unknown field `{name}`: no such key here (misspelt?)")
        } else {
            let meant: Vec<String> = meant.iter().map(|key| format!("`{key}`")).collect();
            format!(
                "unknown field `{name}`: no such key here; did you mean {}?",
                meant.join(" or ")
            )
        };
        unknown.push(ConfigError {
            line: None,
            message,
            key,
        });
    };
    serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        document,
        &mut note_unknown,
    ))
}

/// An error outside any key, with the column that helps to find it.
fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let line = err.span().map(|span| lines::line_at(text, span.start));
    let message = match err.span() {
        Some(span) => {
            let line_start = text[..span.start].rfind('\n').map_or(0, |at| at + 1);
            let column = text[line_start..span.start].chars().count() + 1;
            format!("{} (column {column})", err.message())
        }
        None => err.message().to_owned(),
    };
    ConfigError {
        key: "config".to_owned(),
        line,
        message,
    }
}

/// The field a "missing field `x`" message names.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Takes the innermost table key on `path` out of `document` and returns it as problems name
/// keys; None at the root. Not an array element: taking it out would renumber the ones after it.
fn take_out(document: &mut toml::Value, path: &serde_path_to_error::Path) -> Option<String> {
    let segments: Vec<&Segment> = path.iter().collect();
    let last_key = segments
        .iter()
        .rposition(|segment| matches!(segment, Segment::Map { .. }))?;
    let (parents, key) = match (&segments[..last_key], segments[last_key]) {
        (parents, Segment::Map { key }) => (parents, key),
        _ => return None,
    };
    let mut at = document;
    let mut name = String::new();
    for segment in parents {
        let next = match segment {
            Segment::Map { key } => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
                at.get_mut(key.as_str())
            }
            Segment::Seq { index } => {
                let _ = write!(name, "[{index}]");
                at.get_mut(*index)
            }
            _ => None,
        };
        at = next?;
    }
    at.as_table_mut()?.remove(key)?;
    if !name.is_empty() {
        name.push('.');
    }
    name.push_str(key);
    Some(name)
}
