//! Route matching: which route (and so which upstream) serves a request, by host and path prefix.

use crate::config::RouteConfig;

/// Picks the route for `host` (the Host as sent: a port is ignored) and `path`. A route naming
/// a host beats one that does not; among those, the longest matching path prefix wins; ties go
/// to the route listed first. The host is only read when a route names one.
pub fn match_route(routes: &[RouteConfig], host: Option<&[u8]>, path: &str) -> Option<usize> {
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
        if !path.starts_with(route.path_prefix.as_str()) {
            continue;
        }
        let rank = (host_specific, route.path_prefix.len());
        if best.is_none_or(|(_, best_rank)| rank > best_rank) {
            best = Some((index, rank));
        }
    }
    best.map(|(index, _)| index)
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

/// Host of a request without the port.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
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
            upstream: "u".into(),
        }
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
    fn ports_are_dropped_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
