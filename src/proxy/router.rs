//! Route matching: which route (and so which upstream) serves a request, by host and path prefix.

use std::borrow::Cow;

use crate::config::RouteConfig;

/// Picks the route for `host` (the Host as sent: a port is ignored) and `path`, matched in its
/// [`normalized_path`] form. A route naming a host beats one that does not; among those, the
/// longest matching path prefix wins; ties go to the route listed first. The host is only read
/// when a route names one.
pub fn match_route(routes: &[RouteConfig], host: Option<&[u8]>, path: &str) -> Option<usize> {
    let path = normalized_path(path);
    let mut best: Option<(usize, (bool, usize))> = None;
    let mut bare_host: Option<Option<&str>> = None;
    for (index, route) in routes.iter().enumerate() {
        let host_specific = route.host.is_some();
        if let Some(pattern) = &route.host {
            let host = *bare_host.get_or_insert_with(|| {
                host.and_then(|h| std::str::from_utf8(h).ok())
                    .map(host_without_port)
            });
            if !host.is_some_and(|host| host_matches(pattern, host)) {
                continue;
            }
        }
        if !path.starts_with(route.path_prefix.as_bytes()) {
            continue;
        }
        let rank = (host_specific, route.path_prefix.len());
        if best.is_none_or(|(_, best_rank)| rank > best_rank) {
            best = Some((index, rank));
        }
    }
    best.map(|(index, _)| index)
}

/// The path as routes see it: `%XX` decoded, `.` and `..` segments resolved (RFC 3986 §5.2.4)
/// and repeated slashes merged, as nginx matches its locations; otherwise `/x/../admin`,
/// `//admin` or `/%61dmin` would pass a route's checks for `/admin` and still reach an
/// instance that resolves them to it. The instance gets the path as sent.
pub fn normalized_path(path: &str) -> Cow<'_, [u8]> {
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%')
        && !bytes
            .windows(2)
            .any(|pair| pair[0] == b'/' && matches!(pair[1], b'/' | b'.'));
    if plain {
        return Cow::Borrowed(bytes);
    }
    // Invalid escapes (`%zz`, a `%` at the end) stay as they are.
    let decoded: Vec<u8> = percent_encoding::percent_decode(bytes).collect();
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len());
    let mut segments = decoded.split(|&b| b == b'/').peekable();
    // The part before the first slash (none in origin-form) stays as it is.
    out.extend_from_slice(segments.next().unwrap_or_default());
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            b"" | b"." if !last => {}
            b".." => {
                let parent = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
                out.truncate(parent);
                if last {
                    out.push(b'/');
                }
            }
            b"." => out.push(b'/'),
            _ => {
                out.push(b'/');
                out.extend_from_slice(segment);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Cow::Owned(out)
}

/// The target an instance gets from a route with `strip_prefix`: `path_and_query` without
/// `prefix`, starting with `/`, the query kept. The path as sent when it starts with the prefix
/// and has no dot segment or empty one; else (e.g. `//api/x`, `/api/./x`) its
/// [`normalized_path`], the form the route matched, escaped again, as nginx forwards a URI
/// whose location part it replaced. `None` when neither starts with it.
pub fn stripped_target(path_and_query: &str, prefix: &str) -> Option<String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let dotted = path
        .as_bytes()
        .windows(2)
        .any(|pair| pair[0] == b'/' && matches!(pair[1], b'/' | b'.'));
    let rest: Cow<'_, str> = match path.strip_prefix(prefix).filter(|_| !dotted) {
        Some(rest) => Cow::Borrowed(rest),
        None => {
            let normalized = normalized_path(path);
            let rest = normalized.strip_prefix(prefix.as_bytes())?;
            Cow::Owned(percent_encoding::percent_encode(rest, PATH_ESCAPES).to_string())
        }
    };
    let mut target = String::with_capacity(path_and_query.len() + 1);
    if !rest.starts_with('/') {
        target.push('/');
    }
    target.push_str(&rest);
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    Some(target)
}

/// What a decoded path escapes again on its way to an instance: what may not stand in a path
/// (RFC 3986 §3.3), and `%` itself.
pub const PATH_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Whether `path` carries `%00`. Decoded, a NUL ends the path for an instance written in C, at
/// a place routing never saw; nginx refuses it too.
pub fn has_encoded_nul(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| w == b"%00")
}

/// `example.com` matches itself; `*.example.com` matches any subdomain (not the bare domain).
/// Patterns are lowercase (config validation); hosts are compared ignoring ASCII case.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.len() > domain.len() + 1
                && host.is_char_boundary(host.len() - domain.len())
                && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Host of a request without the port, and without the trailing dot of a fully qualified
/// name: `only.example.` is the site `only.example` (nginx strips it too), so it meets that
/// site's routes and their checks rather than slipping past them to a catch-all route.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name.strip_suffix('.').unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str) -> RouteConfig {
        RouteConfig {
            cache: None,
            name: format!("{host:?}{prefix}"),
            host: host.map(String::from),
            path_prefix: prefix.into(),
            strip_prefix: false,
            upstream: "u".into(),
        }
    }

    #[test]
    fn a_stripped_prefix_leaves_a_path_and_the_query() {
        let cases = [
            ("/api/x?a=1", "/api/", "/x?a=1"),
            ("/api/x", "/api", "/x"),
            ("/api", "/api", "/"),
            ("/api?q", "/api", "/?q"),
            ("/api/", "/api/", "/"),
            ("/apix", "/api", "/x"),
            ("/api/a%20b/", "/api", "/a%20b/"),
            // Matched on the normalized path: that form goes, escaped again.
            ("//api/x%3Fy", "/api", "/x%3Fy"),
            ("/%61pi/x%25y?z", "/api", "/x%25y?z"),
            ("/other/../api/x", "/api", "/x"),
            ("/api/./x", "/api", "/x"),
            ("/api//x", "/api/", "/x"),
            ("/api/.well-known/x", "/api", "/.well-known/x"),
        ];
        for (target, prefix, stripped) in cases {
            assert_eq!(
                stripped_target(target, prefix).as_deref(),
                Some(stripped),
                "{target} - {prefix}"
            );
        }
        assert_eq!(stripped_target("/else", "/api"), None);
    }

    #[test]
    fn longest_prefix_and_host_specific_routes_win() {
        let routes = vec![
            route(None, "/"),
            route(None, "/api"),
            route(Some("admin.test"), "/"),
            route(Some("*.shop.test"), "/cart"),
        ];
        // (Host as sent, path) -> route
        let cases = [
            (Some("x.test"), "/", Some(0)),
            (Some("admin.test:8080"), "/", Some(2)),
            (Some("x.test"), "/api/users", Some(1)),
            (Some("admin.test"), "/api", Some(2)),
            (Some("eu.shop.test"), "/cart/1", Some(3)),
            (Some("shop.test"), "/cart/1", Some(0)),
            (None, "/api", Some(1)),
            (Some("Admin.TEST"), "/", Some(2)),
            (Some("EU.Shop.Test"), "/cart", Some(3)),
            (Some("admin.test."), "/", Some(2)),
            (Some("admin.test.:8080"), "/", Some(2)),
            (Some("eu.shop.test."), "/cart", Some(3)),
            (Some("admin.test.."), "/", Some(0)),
        ];
        for (host, path, expected) in cases {
            let host_bytes = host.map(str::as_bytes);
            assert_eq!(
                match_route(&routes, host_bytes, path),
                expected,
                "{host:?} {path}"
            );
        }
    }

    #[test]
    fn no_default_route_means_no_match() {
        let routes = vec![route(None, "/api")];
        assert_eq!(match_route(&routes, None, "/other"), None);
        assert_eq!(match_route(&routes, None, "/api"), Some(0));
    }

    #[test]
    fn paths_are_matched_resolved_and_decoded() {
        let cases = [
            ("/admin/secret", "/admin/secret"),
            ("/x/../admin/secret", "/admin/secret"),
            ("/./admin/secret", "/admin/secret"),
            ("//admin//secret", "/admin/secret"),
            ("/x/%2e%2e/admin/secret", "/admin/secret"),
            ("/%61dmin/secret", "/admin/secret"),
            ("/x/..%2fadmin/secret", "/admin/secret"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("/..", "/"),
            ("/", "/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/100%", "/100%"),
            ("/%zz/%4", "/%zz/%4"),
        ];
        for (sent, matched) in cases {
            assert_eq!(
                String::from_utf8_lossy(&normalized_path(sent)),
                matched,
                "{sent}"
            );
        }
        assert!(matches!(normalized_path("/api/v1/users"), Cow::Borrowed(_)));
        let routes = vec![route(None, "/"), route(None, "/admin")];
        assert_eq!(match_route(&routes, None, "/x/../admin/secret"), Some(1));
        assert_eq!(match_route(&routes, None, "/%61dmin"), Some(1));
    }

    #[test]
    fn ports_are_dropped_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
