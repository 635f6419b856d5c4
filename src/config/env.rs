//! `${VAR}` and `${VAR:-default}` in the config text, filled from the environment before parsing.
//! `$${` stands for a literal `${`. Comments are left as they are. A value goes in as what it
//! stands for, never as config syntax: inside "..." or """...""" it is escaped; inside '...',
//! '''...''' or outside quotes, a value that would end the string or add syntax is refused.

/// A variable the text needs that cannot be filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvProblem {
    pub name: String,
    pub line: usize,
    pub message: &'static str,
    /// Where its stand-in begins in the interpolated text, so the key whose value it is can be
    /// found (and that value's own problems, which the stand-in causes, left out).
    pub at: usize,
}

/// The text with every reference filled in, each one that could not be by a stand-in, and
/// the problems of those.
#[derive(Debug)]
pub struct Interpolated {
    pub text: String,
    pub problems: Vec<EnvProblem>,
}

/// What stands for a reference that could not be filled, so that the rest of the file can
/// still be read and checked: nothing inside quotes (the string stays a string), and outside
/// them a number (the key keeps a value rather than becoming a syntax error that would hide
/// every other problem).
const STAND_IN_BARE: &str = "0";

const MISSING: &str = "environment variable is not set and has no default (use ${NAME:-default})";
const UNCLOSED: &str = "a `${` without its `}` on the same line (write `$${` for a literal `${`)";
const BAD_NAME: &str = "not a variable name: letters, digits and `_`, not starting with a digit \
     (a `${` inside another is not supported)";
const NESTED_DEFAULT: &str = "a `${` in a default is not supported (`}` ends the first one)";
const UNFIT_LITERAL: &str = "its value has a ', a line break or a control character, which a \
     '...' or '''...''' string cannot hold: use \"...\"";
const UNFIT_BARE: &str =
    "outside quotes its value must be a number or true/false: put it in \"...\"";
const UNFIT_EMPTY: &str = "its value is empty, which outside quotes leaves no value: set it, \
     give a default (${NAME:-value}) or put it in \"...\"";

/// Where in the text a `${...}` stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Bare,
    /// Inside "..." or """...""": the value is escaped.
    Basic {
        multiline: bool,
    },
    /// Inside '...' or '''...''': taken as written, so it must not hold a quote or a line break.
    Literal {
        multiline: bool,
    },
    /// After a `#` outside strings, to the end of the line: left as written.
    Comment,
}

/// Replaces every `${NAME}` / `${NAME:-default}` outside comments using `lookup`. Returns every
/// problem (a missing variable, a value that does not fit where it goes) rather than the
/// first, so one run of `check` shows them all, and a text in which each of those stands
/// replaced (see [`STAND_IN_BARE`]) so that the file's other problems can be found in it too.
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Interpolated {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let bytes = text.as_bytes();
    let mut context = Context::Bare;
    let mut line = 1;
    // `text[copied..at]` is read but not yet written out.
    let (mut copied, mut at) = (0, 0);
    while at < bytes.len() {
        if bytes[at] == b'$' && context != Context::Comment {
            out.push_str(&text[copied..at]);
            let found = Found {
                context,
                line,
                at: out.len(),
            };
            let (written, read) = reference(&text[at..], found, &lookup, &mut problems);
            out.push_str(&written);
            at += read;
            copied = at;
            continue;
        }
        let (next, read) = step(context, &bytes[at..]);
        line += bytes[at..at + read].iter().filter(|&&b| b == b'\n').count();
        context = next;
        at += read;
    }
    out.push_str(&text[copied..]);
    Interpolated {
        text: out,
        problems,
    }
}

/// Where a reference was found: its context, its line in the text and the offset it is
/// written at in the interpolated text.
#[derive(Clone, Copy)]
struct Found {
    context: Context,
    line: usize,
    at: usize,
}

/// How the TOML quoting changes at the start of `rest` (which does not start with a `$` in
/// code), and how many bytes that reads.
fn step(context: Context, rest: &[u8]) -> (Context, usize) {
    let run_of = |quote: u8| rest.iter().take_while(|&&b| b == quote).count();
    match (context, rest[0]) {
        (
            Context::Comment
            | Context::Basic { multiline: false }
            | Context::Literal { multiline: false },
            b'\n',
        ) => (Context::Bare, 1),
        (Context::Bare, b'#') => (Context::Comment, 1),
        (Context::Bare, quote @ (b'"' | b'\'')) => {
            let multiline = run_of(quote) >= 3;
            let read = if multiline { 3 } else { 1 };
            if quote == b'"' {
                (Context::Basic { multiline }, read)
            } else {
                (Context::Literal { multiline }, read)
            }
        }
        // An escaped quote or backslash does not end the string nor escape what follows.
        (Context::Basic { .. }, b'\\') if matches!(rest.get(1), Some(b'"' | b'\\')) => (context, 2),
        (Context::Basic { multiline: false }, b'"')
        | (Context::Literal { multiline: false }, b'\'') => (Context::Bare, 1),
        // Up to two more quotes right before the closing three belong to the string.
        (Context::Basic { multiline: true }, b'"')
        | (Context::Literal { multiline: true }, b'\'')
            if run_of(rest[0]) >= 3 =>
        {
            (Context::Bare, run_of(rest[0]).min(5))
        }
        _ => (context, 1),
    }
}

/// Reads the `$...` at the start of `rest`: what to write for it and how many bytes it took. A
/// problem with it is pushed to `problems` (and a stand-in written instead).
fn reference<'a>(
    rest: &'a str,
    found: Found,
    lookup: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<EnvProblem>,
) -> (std::borrow::Cow<'a, str>, usize) {
    let Found { context, line, at } = found;
    let stand_in = if context == Context::Bare {
        STAND_IN_BARE
    } else {
        ""
    };
    if rest.starts_with("$${") {
        return ("${".into(), 3);
    }
    let Some(body) = rest.strip_prefix("${") else {
        return ("$".into(), 1);
    };
    let line_end = body.find('\n').unwrap_or(body.len());
    let Some(end) = body[..line_end].find('}') else {
        problems.push(EnvProblem {
            name: body[..line_end].trim_end().to_string(),
            line,
            message: UNCLOSED,
            at,
        });
        // Inside quotes the rest of the line is kept, with the quote that ends the string.
        let written = if context == Context::Bare {
            stand_in
        } else {
            &rest[..2 + line_end]
        };
        return (written.into(), 2 + line_end);
    };
    let read = 2 + end + 1;
    let expr = &body[..end];
    let (name, default) = match expr.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (expr, None),
    };
    let filled = if !is_variable_name(name) {
        Err(BAD_NAME)
    } else if default.is_some_and(|default| default.contains("${")) {
        // `}` ends the first reference, so `${A:-${B}}` would leave `}` behind as text.
        Err(NESTED_DEFAULT)
    } else {
        let value = lookup(name).filter(|v| !v.is_empty() || default.is_none());
        // A default is a value too, held to the same rules: outside quotes `${PORT:-x}`
        // would otherwise fail as TOML syntax, naming neither the variable nor the key.
        match value.as_deref().or(default) {
            Some(value) => fitted(value, context).map(|fitted| fitted.into_owned().into()),
            None => Err(MISSING),
        }
    };
    match filled {
        Ok(written) => (written, read),
        Err(message) => {
            problems.push(EnvProblem {
                name: name.to_string(),
                line,
                message,
                at,
            });
            (stand_in.into(), read)
        }
    }
}

/// `value` as it may stand in `context`, or why it cannot.
fn fitted(value: &str, context: Context) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    use std::fmt::Write as _;
    match context {
        Context::Basic { .. } => {
            if !value.contains(|c: char| c == '"' || c == '\\' || c.is_control()) {
                return Ok(value.into());
            }
            let mut out = String::with_capacity(value.len() + 8);
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    '\r' => out.push_str("\\r"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\u{:04X}", u32::from(c));
                    }
                    c => out.push(c),
                }
            }
            Ok(out.into())
        }
        // A line break would also move the line numbers of every error after it.
        Context::Literal { .. }
            if value.contains(|c: char| c == '\'' || (c.is_control() && c != '\t')) =>
        {
            Err(UNFIT_LITERAL)
        }
        Context::Literal { .. } => Ok(value.into()),
        Context::Bare if value.is_empty() => Err(UNFIT_EMPTY),
        Context::Bare if is_bare_scalar(value) => Ok(value.into()),
        Context::Bare | Context::Comment => Err(UNFIT_BARE),
    }
}

/// A TOML number or boolean, as it may stand outside quotes; anything else would be read as
/// syntax, or fail with an error that names neither the variable nor the key.
fn is_bare_scalar(value: &str) -> bool {
    let simple = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    simple
        && format!("v = {value}")
            .parse::<toml::Table>()
            .is_ok_and(|table| {
                matches!(
                    table.get("v"),
                    Some(toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))
                )
            })
}

/// A shell variable's name: letters, digits and `_`, not starting with a digit.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text, or the problems when there are any.
    fn fill(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<String, Vec<EnvProblem>> {
        let Interpolated { text, problems } = interpolate(text, lookup);
        if problems.is_empty() {
            Ok(text)
        } else {
            Err(problems)
        }
    }

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
            fill("listen = \"0.0.0.0:${PORT}\"", env).unwrap(),
            "listen = \"0.0.0.0:8080\""
        );
        assert_eq!(fill("${NOPE:-9090}", env).unwrap(), "9090");
        assert_eq!(fill("\"${EMPTY:-x}\"", env).unwrap(), "\"x\"");
        assert_eq!(fill("\"${EMPTY}\"", env).unwrap(), "\"\"");
        // Outside quotes an empty value would leave the key without one.
        let empty = fill("port = ${EMPTY}", env).unwrap_err();
        assert_eq!(
            (empty[0].name.as_str(), empty[0].message),
            ("EMPTY", UNFIT_EMPTY)
        );
        assert_eq!(
            fill("cost $5 and $${PORT}", env).unwrap(),
            "cost $5 and ${PORT}"
        );
    }

    fn names_and_lines(problems: &[EnvProblem]) -> Vec<(&str, usize)> {
        problems.iter().map(|p| (p.name.as_str(), p.line)).collect()
    }

    #[test]
    fn defaults_go_in_as_values_too() {
        // Outside quotes only a number or true/false: the variable is named, not a TOML error.
        let err = fill("retries = ${R:-x}\nlisten = ${L:-127.0.0.1:8080}", env).unwrap_err();
        assert_eq!(names_and_lines(&err), [("R", 1), ("L", 2)]);
        assert!(err.iter().all(|p| p.message == UNFIT_BARE));
        // Inside "...", escaped as a value is.
        let text = fill("name = \"${N:-a\"b}\"", env).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["name"].as_str(), Some("a\"b"));
    }

    #[test]
    fn a_reference_that_cannot_be_filled_leaves_a_text_that_still_reads() {
        let text =
            "a = \"x${NOPE}y\"\nb = ${NOPE}\nc = '${1BAD}'\nd = ${UNCLOSED\ne = \"${UNCLOSED\"\n";
        let Interpolated {
            text: out,
            problems,
        } = interpolate(text, env);
        assert_eq!(
            out,
            "a = \"xy\"\nb = 0\nc = ''\nd = 0\ne = \"${UNCLOSED\"\n"
        );
        assert!(out.parse::<toml::Table>().is_ok(), "{out}");
        assert_eq!(names_and_lines(&problems).len(), 5);
        // Each problem knows where its stand-in begins.
        let at: Vec<&str> = problems.iter().map(|p| &out[p.at..=p.at]).collect();
        assert_eq!(at, ["y", "0", "'", "0", "$"]);
    }

    #[test]
    fn comments_are_not_interpolated() {
        let text = "# uses ${NOPE}\nurl = \"a#${PORT}\" # ${NOPE}\n";
        assert_eq!(
            fill(text, env).unwrap(),
            "# uses ${NOPE}\nurl = \"a#8080\" # ${NOPE}\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_line() {
        let err = fill("a = 1\nb = \"${ONE}\"\nc = \"${TWO}\"", env).unwrap_err();
        assert_eq!(names_and_lines(&err), [("ONE", 2), ("TWO", 3)]);
        assert!(err.iter().all(|p| p.message == MISSING));
    }

    #[test]
    fn malformed_references_are_named_for_what_they_are() {
        let text = "a = \"${}\"\nb = \"${1BAD}\"\nc = \"${A${B}}\"\nd = \"/${UNCLOSED\"\n";
        let err = fill(text, env).unwrap_err();
        let found: Vec<(&str, usize, &str)> = err
            .iter()
            .map(|p| (p.name.as_str(), p.line, p.message))
            .collect();
        assert_eq!(
            found,
            [
                ("", 1, BAD_NAME),
                ("1BAD", 2, BAD_NAME),
                ("A${B", 3, BAD_NAME),
                ("UNCLOSED\"", 4, UNCLOSED),
            ]
        );
        let nested = fill("a = \"${X:-${Y}}\"", env).unwrap_err();
        assert_eq!(
            (nested[0].name.as_str(), nested[0].message),
            ("X", NESTED_DEFAULT)
        );
        // A literal `${` written as `$${` is no reference at all.
        assert_eq!(fill("a = \"$${X\"", env).unwrap(), "a = \"${X\"");
    }

    #[test]
    fn multiline_strings_are_read_as_strings() {
        let odd = |name: &str| match name {
            "QUOTED" => Some("say \"\"\"hi\"\"\"\nthen # more".to_owned()),
            "WORD" => Some("abc".to_owned()),
            _ => env(name),
        };
        let text = concat!(
            "body = \"\"\"\n",
            "line ${PORT}\n",
            "${QUOTED} \\\" # ${WORD}\n",
            "\"\"\"\n",
            "raw = '''\n",
            "x ${WORD} ''y\n",
            "'''''\n",
            "port = ${PORT} # ${NOPE}\n",
            "after = \"${WORD}\"\n",
        );
        let filled = fill(text, odd).unwrap();
        let parsed: toml::Table = filled.parse().unwrap();
        assert_eq!(
            parsed["body"].as_str(),
            Some("line 8080\nsay \"\"\"hi\"\"\"\nthen # more \" # abc\n")
        );
        assert_eq!(parsed["raw"].as_str(), Some("x abc ''y\n''"));
        assert_eq!(parsed["port"].as_integer(), Some(8080));
        assert_eq!(parsed["after"].as_str(), Some("abc"));
        // Inside '''...''' a value is held to the rules of '...', and the line is counted.
        let err = fill("a = 1\nraw = '''\n${QUOTED}\n'''", odd).unwrap_err();
        assert_eq!(
            (err[0].name.as_str(), err[0].line, err[0].message),
            ("QUOTED", 3, UNFIT_LITERAL)
        );
    }

    #[test]
    fn values_go_in_as_values_never_as_syntax() {
        let odd = |name: &str| {
            Some(
                match name {
                    "PASS" => "pa\"ss\\wo\trd",
                    "INJECT" => "x\"\n[upstreams.evil]\ninstances = [\"6.6.6.6:80\"]\nkey = \"",
                    "NUMBER" => "42",
                    "FLOAT" => "-1.5e3",
                    "FLAG" => "true",
                    "WORD" => "12abc",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        // Inside "...", escaped: the parsed string is the value, whatever it holds.
        let text = fill("password = \"${PASS}\"\nname = \"${INJECT}\"\n", odd).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["password"].as_str(), Some("pa\"ss\\wo\trd"));
        assert_eq!(parsed["name"].as_str(), odd("INJECT").as_deref());
        assert_eq!(parsed.len(), 2);
        // Outside quotes only a bare scalar fits; inside '...' no quote or line break.
        assert_eq!(fill("retries = ${NUMBER}", odd).unwrap(), "retries = 42");
        assert_eq!(
            fill("a = ${FLOAT}\nb = ${FLAG}", odd).unwrap(),
            "a = -1.5e3\nb = true"
        );
        let literal: toml::Table = fill("key = '${PASS}'", odd).unwrap().parse().unwrap();
        assert_eq!(literal["key"].as_str(), odd("PASS").as_deref());
        for (text, message) in [
            ("retries = ${INJECT}", UNFIT_BARE),
            ("key = '${INJECT}'", UNFIT_LITERAL),
            ("key = \"a\" ${PASS}", UNFIT_BARE),
            ("max_connections = ${WORD}", UNFIT_BARE),
        ] {
            let err = fill(text, odd).unwrap_err();
            assert_eq!(err[0].message, message, "{text}");
        }
    }
}
