//! Route matching: which route (and so which upstream) serves a request, by host and path prefix.

use crate::config::RouteConfig;

/// Picks the route for `host` (without port, lowercase) and `path`. A route naming a host beats
/// one that does not; among those, the longest matching path prefix wins; ties go to the route
/// listed first.
pub fn match_route(routes: &[RouteConfig], host: Option<&str>, path: &str) -> Option<usize> {
    let mut best: Option<(usize, (bool, usize))> = None;
    for (index, route) in routes.iter().enumerate() {
        let host_specific = match (&route.host, host) {
            (None, _) => false,
            (Some(pattern), Some(host)) if host_matches(pattern, host) => true,
            _ => continue,
        };
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
        assert_eq!(match_route(&routes, Some("x.test"), "/"), Some(0));
        assert_eq!(match_route(&routes, Some("x.test"), "/api/users"), Some(1));
        assert_eq!(match_route(&routes, Some("admin.test"), "/api"), Some(2));
        assert_eq!(
            match_route(&routes, Some("eu.shop.test"), "/cart/1"),
            Some(3)
        );
        assert_eq!(match_route(&routes, Some("shop.test"), "/cart/1"), Some(0));
        assert_eq!(match_route(&routes, None, "/api"), Some(1));
        assert_eq!(match_route(&routes, Some("Admin.TEST"), "/"), Some(2));
        assert_eq!(match_route(&routes, Some("EU.Shop.Test"), "/cart"), Some(3));
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
