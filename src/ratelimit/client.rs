//! Who a request counts against: the client address (seen through trusted proxies), the API key
//! it presented, a header, or the route.

use std::io::Write as _;
use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use smallvec::SmallVec;

use crate::auth::ApiKeyId;
use crate::config::limits::RuleKey;

/// The client address: the peer, unless the peer is a trusted proxy; then the right-most
/// X-Forwarded-For address that is not a trusted proxy (the left-most when all are). Anything
/// left of that could have been written by the client itself.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else {
            return client;
        };
        for hop in line.rsplit(',') {
            let Some(ip) = forwarded_ip(hop.trim()) else {
                return client;
            };
            client = ip;
            if !is_trusted(&ip) {
                return ip;
            }
        }
    }
    client
}

/// An `X-Forwarded-For` entry's address: `IP`, or with a port as some proxies write it
/// (`1.2.3.4:5555`, `[2001:db8::9]:443`, as nginx's realip module reads them), an IPv4-mapped
/// one as the IPv4 it is.
fn forwarded_ip(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|addr| addr.ip()))
        .or_else(|_| {
            let bracketed = hop.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            bracketed
                .ok_or(())
                .and_then(|h| h.parse::<IpAddr>().map_err(drop))
        })
        .ok()?;
    Some(ip.to_canonical())
}

/// One request's key under one rule; hashed as is by the memory store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey<'a> {
    Ip(IpAddr),
    ApiKey(ApiKeyId),
    Header(&'a [u8]),
    Route(&'a str),
}

impl<'a> LimitKey<'a> {
    /// The key of a request under `rule`; requests lacking the header or a known API key count
    /// by client address.
    pub fn of(
        rule: &RuleKey,
        client: IpAddr,
        api_key: Option<ApiKeyId>,
        headers: &'a HeaderMap,
        route: &'a str,
    ) -> LimitKey<'a> {
        match rule {
            RuleKey::ClientIp => LimitKey::Ip(client),
            RuleKey::ApiKey => api_key.map_or(LimitKey::Ip(client), LimitKey::ApiKey),
            RuleKey::Header(name) => headers
                .get(name)
                .map_or(LimitKey::Ip(client), |v| LimitKey::Header(v.as_bytes())),
            RuleKey::Route => LimitKey::Route(route),
        }
    }

    /// `PREFIX` + `KIND:VALUE`, where the prefix is [`redis_prefix`] of the rule; assembled on
    /// the stack (it is built for every request decided at Redis).
    pub fn redis_key(&self, prefix: &[u8]) -> SmallVec<[u8; 96]> {
        let mut key = SmallVec::new();
        key.extend_from_slice(prefix);
        match self {
            LimitKey::Ip(ip) => {
                key.extend_from_slice(b"ip:");
                let mut text = [0u8; 48];
                let mut rest = &mut text[..];
                write!(rest, "{ip}").expect("an IP fits in 48 bytes");
                let len = 48 - rest.len();
                key.extend_from_slice(&text[..len]);
            }
            LimitKey::ApiKey(ApiKeyId(id)) => {
                key.extend_from_slice(b"key:");
                key.extend_from_slice(itoa::Buffer::new().format(*id).as_bytes());
            }
            LimitKey::Header(value) => {
                key.extend_from_slice(b"h:");
                key.extend_from_slice(value);
            }
            LimitKey::Route(route) => {
                key.extend_from_slice(b"route:");
                key.extend_from_slice(route.as_bytes());
            }
        }
        key
    }
}

/// `scalegate:rl:RULE:`: where a rule's keys live in Redis.
pub fn redis_prefix(rule: &str) -> Vec<u8> {
    format!("scalegate:rl:{rule}:").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_read_only_through_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.7"),
        );
        // Straight from an untrusted peer: the header is the client's own words.
        assert_eq!(client_ip(ip("5.5.5.5"), &headers, &trusted), ip("5.5.5.5"));
        // Through trusted proxies: the right-most untrusted hop.
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &trusted), ip("1.2.3.4"));
        // No trusted proxies configured: always the peer.
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &[]), ip("10.0.0.1"));
        // Several header lines read as one list; garbage stops the walk.
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &trusted), ip("1.2.3.4"));
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.0.0.3"),
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &headers, &trusted),
            ip("10.0.0.3")
        );
        // Entries with a port, bracketed IPv6 and IPv4-mapped addresses are the clients they name.
        for (entry, client) in [
            ("1.2.3.4:5555", "1.2.3.4"),
            ("[2001:db8::9]:443", "2001:db8::9"),
            ("[2001:db8::9]", "2001:db8::9"),
            ("::ffff:1.2.3.4", "1.2.3.4"),
        ] {
            headers.insert("x-forwarded-for", HeaderValue::from_static(entry));
            assert_eq!(
                client_ip(ip("10.0.0.1"), &headers, &trusted),
                ip(client),
                "{entry}"
            );
        }
    }

    #[test]
    fn missing_keys_count_by_client_address() {
        let headers = HeaderMap::new();
        let client = ip("1.2.3.4");
        let header = RuleKey::Header(http::HeaderName::from_static("x-user"));
        assert_eq!(
            LimitKey::of(&header, client, None, &headers, "r"),
            LimitKey::Ip(client)
        );
        assert_eq!(
            LimitKey::of(&RuleKey::ApiKey, client, Some(ApiKeyId(2)), &headers, "r"),
            LimitKey::ApiKey(ApiKeyId(2))
        );
        assert_eq!(
            LimitKey::ApiKey(ApiKeyId(2)).redis_key(&redis_prefix("per_key"))[..],
            b"scalegate:rl:per_key:key:2"[..]
        );
        assert_eq!(
            LimitKey::Ip(client).redis_key(&redis_prefix("per_ip"))[..],
            b"scalegate:rl:per_ip:ip:1.2.3.4"[..]
        );
        let v6 = ip("2001:db8:ffff:ffff:ffff:ffff:255.255.255.255");
        assert_eq!(
            LimitKey::Ip(v6).redis_key(b"p:")[..],
            format!("p:ip:{v6}").as_bytes()[..]
        );
    }
}
