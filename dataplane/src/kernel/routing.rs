//! Route matching: host, path prefix or exact path, methods and headers; routes are tried in order and the
//! first match wins.

use http::{HeaderName, HeaderValue, Method, Request};
use umw_crds::middleware::{HttpMethod, RouteMatch};

/// A route's match, compiled once per configuration.
#[derive(Clone, Debug)]
pub struct Matcher {
    hosts: Vec<HostPattern>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: one more label in front.
    Wildcard(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathMatch {
    Any,
    Exact(String),
    /// Without a trailing slash (except for `/` itself, which is `Any`).
    Prefix(String),
}

/// Why a match could not be compiled; [`umw_crds::validate`] reports these before it comes to this.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MatchError(String);

impl Matcher {
    pub fn compile(m: &RouteMatch) -> Result<Self, MatchError> {
        let hosts = m
            .hosts
            .iter()
            .map(|h| {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix('*') {
                    Some(suffix) => HostPattern::Wildcard(suffix.to_string()),
                    None => HostPattern::Exact(h),
                }
            })
            .collect();
        let path = match (&m.path, &m.path_prefix) {
            (Some(exact), _) => PathMatch::Exact(exact.clone()),
            (None, Some(prefix)) => {
                let trimmed = prefix.trim_end_matches('/');
                if trimmed.is_empty() { PathMatch::Any } else { PathMatch::Prefix(trimmed.to_string()) }
            }
            (None, None) => PathMatch::Any,
        };
        let methods = m.methods.iter().map(|m| method(*m)).collect();
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::try_from(h.name.as_str())
                    .map_err(|_| MatchError(format!("{:?} is not a header name", h.name)))?;
                let value = HeaderValue::try_from(h.value.as_str())
                    .map_err(|_| MatchError(format!("{:?} is not a header value", h.value)))?;
                Ok((name, value))
            })
            .collect::<Result<_, MatchError>>()?;
        Ok(Self { hosts, path, methods, headers })
    }

    pub fn matches<B>(&self, request: &Request<B>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(request.method()) {
            return false;
        }
        if !self.path_matches(request.uri().path()) {
            return false;
        }
        if !self.hosts.is_empty() {
            let Some(host) = host_of(request) else { return false };
            if !self.hosts.iter().any(|p| p.matches(&host)) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| request.headers().get_all(name).iter().any(|v| v == value))
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => {
                path.starts_with(prefix.as_str()) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
        }
    }
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(exact) => host == exact,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].contains('.')
            }
        }
    }
}

/// The request's host, lower case, without port: from `Host`, or from the URI (HTTP/2 `:authority`).
pub fn host_of<B>(request: &Request<B>) -> Option<String> {
    let raw = match request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) => host,
        None => request.uri().host()?,
    };
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its brackets; drop a port after them.
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    Some(host.to_ascii_lowercase())
}

pub fn method(m: HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Options => Method::OPTIONS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umw_crds::middleware::HeaderMatch;

    fn req(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path).header("host", host);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let m = Matcher::compile(&RouteMatch { path_prefix: Some("/api".into()), ..Default::default() }).unwrap();
        for (path, want) in [("/api", true), ("/api/", true), ("/api/x?y", true), ("/apix", false), ("/", false)] {
            assert_eq!(m.matches(&req("GET", "h", path, &[])), want, "{path}");
        }
        let slash = Matcher::compile(&RouteMatch { path_prefix: Some("/api/".into()), ..Default::default() }).unwrap();
        assert!(slash.matches(&req("GET", "h", "/api", &[])));
        assert!(!slash.matches(&req("GET", "h", "/apix", &[])));
        let root = Matcher::compile(&RouteMatch { path_prefix: Some("/".into()), ..Default::default() }).unwrap();
        assert!(root.matches(&req("GET", "h", "/anything", &[])));
    }

    #[test]
    fn exact_paths_methods_hosts_and_headers() {
        let m = Matcher::compile(&RouteMatch {
            path: Some("/login".into()),
            methods: vec![HttpMethod::Post],
            hosts: vec!["*.example.com".into(), "api.local".into()],
            headers: vec![HeaderMatch { name: "X-Tenant".into(), value: "blue".into() }],
            ..Default::default()
        })
        .unwrap();
        let tenant = [("x-tenant", "blue")];
        assert!(m.matches(&req("POST", "a.example.com:8080", "/login", &tenant)));
        assert!(m.matches(&req("POST", "API.local", "/login", &tenant)));
        assert!(!m.matches(&req("POST", "a.b.example.com", "/login", &tenant)), "wildcard is one label");
        assert!(!m.matches(&req("POST", "example.com", "/login", &tenant)));
        assert!(!m.matches(&req("GET", "api.local", "/login", &tenant)), "method");
        assert!(!m.matches(&req("POST", "api.local", "/login/x", &tenant)), "exact path");
        assert!(!m.matches(&req("POST", "api.local", "/login", &[("x-tenant", "red")])), "header value");
        assert!(!m.matches(&req("POST", "api.local", "/login", &[])), "header missing");
    }

    #[test]
    fn host_comes_from_the_header_or_the_authority() {
        assert_eq!(host_of(&req("GET", "Shop.Example:443", "/", &[])).as_deref(), Some("shop.example"));
        assert_eq!(host_of(&req("GET", "[::1]:8080", "/", &[])).as_deref(), Some("[::1]"));
        let h2 = Request::builder().uri("http://h2.example/x").body(()).unwrap();
        assert_eq!(host_of(&h2).as_deref(), Some("h2.example"));
    }
}
