//! Header rules of a proxy: hop-by-hop headers stay on their hop (RFC 9110 §7.6.1), and the upstream
//! learns who asked through `X-Forwarded-*` and `Forwarded` (RFC 7239).

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that concern one connection only.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header that `Connection` names. `TE: trailers` is kept
/// (and only that), since gRPC over HTTP/2 needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and a removal hashes its name.
    if !headers.keys().any(|name| name == header::TE || HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if trailers_only {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends the client to `X-Forwarded-For` and `Forwarded` (every earlier line kept, joined into one),
/// and sets `X-Forwarded-Proto` and `X-Forwarded-Host`. Values an earlier proxy set for those two are kept
/// only when the connection comes from a private network (another proxy in front of the gateway); from
/// anywhere else the client could claim them, so the gateway's own values replace them.
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: Option<&HeaderValue>, proto: &'static str) {
    let ip = client.ip().to_canonical();
    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(previous) => format!("{previous}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let trusted = from_private_network(ip);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    match host {
        Some(host) if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) => {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        None if !trusted => {
            headers.remove(&X_FORWARDED_HOST);
        }
        _ => {}
    }
    // RFC 7239: IPv6 addresses are quoted and bracketed; the host is quoted when it has a colon (a port).
    let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
    let mut element = format!("for={node};proto={proto}");
    if let Some(host) = host.and_then(|h| h.to_str().ok()).filter(|h| is_token_or_quotable(h)) {
        if host.contains(':') {
            element.push_str(&format!(";host=\"{host}\""));
        } else {
            element.push_str(&format!(";host={host}"));
        }
    }
    let forwarded = match joined(headers, &header::FORWARDED) {
        Some(previous) => format!("{previous}, {element}"),
        None => element,
    };
    if let Ok(value) = HeaderValue::try_from(forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Every line of a list header, joined with commas.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Loopback, RFC 1918, link-local and unique-local addresses: where another proxy of the same site sits.
fn from_private_network(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

fn is_token_or_quotable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep", "te"]);
        assert_eq!(h[header::TE], "trailers");

        // Each alone, without a Connection header to name it, still goes.
        for (name, value) in
            [("te", "gzip"), ("proxy-authorization", "Basic eA=="), ("trailer", "x"), ("keep-alive", "1")]
        {
            let mut h = HeaderMap::new();
            h.insert("x-keep", HeaderValue::from_static("yes"));
            h.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"], "{name}");
        }
    }

    #[test]
    fn forwarded_headers_append_to_earlier_proxies() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=203.0.113.7"));
        let host = HeaderValue::from_static("shop.example:8080");
        add_forwarded(&mut h, "10.1.2.3:5555".parse().unwrap(), Some(&host), "http");
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1, 203.0.113.7, 10.1.2.3", "every earlier line is kept");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "shop.example:8080");
        assert_eq!(h[header::FORWARDED], "for=203.0.113.7, for=10.1.2.3;proto=http;host=\"shop.example:8080\"");
        // A proxy on a private network may say the original scheme; a client on the internet may not.
        let mut behind = HeaderMap::new();
        behind.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarded(&mut behind, "10.0.0.9:1".parse().unwrap(), Some(&host), "http");
        assert_eq!(behind[X_FORWARDED_PROTO], "https");
        let mut spoofed = HeaderMap::new();
        spoofed.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        spoofed.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        add_forwarded(&mut spoofed, "203.0.113.50:1".parse().unwrap(), Some(&host), "http");
        assert_eq!(spoofed[X_FORWARDED_PROTO], "http");
        assert_eq!(spoofed[X_FORWARDED_HOST], "shop.example:8080");
        let mut v6 = HeaderMap::new();
        add_forwarded(&mut v6, "[2001:db8::1]:80".parse().unwrap(), None, "http");
        assert_eq!(v6[header::FORWARDED], "for=\"[2001:db8::1]\";proto=http");
    }
}
