//! `${VAR}` and `${VAR:-default}` in the config text, filled from the environment before parsing.
//! `$${` stands for a literal `${`. Comments are left as they are.

/// A variable the text needs but the environment lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    pub name: String,
    pub line: usize,
}

/// Replaces every `${NAME}` / `${NAME:-default}` outside comments using `lookup`. Returns all
/// missing variables (those without a default) rather than the first, so one run of `check`
/// shows them all.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<MissingVar>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let (code, comment) = line.split_at(comment_start(line));
        interpolate_line(code, number + 1, &lookup, &mut out, &mut missing);
        out.push_str(comment);
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// Byte offset where a `#` comment starts on this line (outside "..." and '...' strings).
fn comment_start(line: &str) -> usize {
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, b) in line.bytes().enumerate() {
        match quote {
            Some(b'"') if escaped => escaped = false,
            Some(b'"') if b == b'\\' => escaped = true,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'#' => return i,
            None => {}
        }
    }
    line.len()
}

fn interpolate_line(
    text: &str,
    line: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
    missing: &mut Vec<MissingVar>,
) {
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            out.push_str(after);
            rest = "";
            break;
        };
        let expr = &body_start[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        match (
            lookup(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                missing.push(MissingVar {
                    name: name.to_string(),
                    line,
                });
            }
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8080".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn fills_variables_and_defaults() {
        assert_eq!(
            interpolate("listen = \"0.0.0.0:${PORT}\"", env).unwrap(),
            "listen = \"0.0.0.0:8080\""
        );
        assert_eq!(interpolate("${NOPE:-9090}", env).unwrap(), "9090");
        assert_eq!(interpolate("${EMPTY:-x}", env).unwrap(), "x");
        assert_eq!(interpolate("${EMPTY}", env).unwrap(), "");
        assert_eq!(
            interpolate("cost $5 and $${PORT}", env).unwrap(),
            "cost $5 and ${PORT}"
        );
    }

    #[test]
    fn comments_are_not_interpolated() {
        let text = "# uses ${NOPE}\nurl = \"a#${PORT}\" # ${NOPE}\n";
        assert_eq!(
            interpolate(text, env).unwrap(),
            "# uses ${NOPE}\nurl = \"a#8080\" # ${NOPE}\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_line() {
        let err = interpolate("a = 1\nb = \"${ONE}\"\nc = \"${TWO}\"", env).unwrap_err();
        assert_eq!(
            err,
            vec![
                MissingVar {
                    name: "ONE".into(),
                    line: 2
                },
                MissingVar {
                    name: "TWO".into(),
                    line: 3
                }
            ]
        );
    }
}
