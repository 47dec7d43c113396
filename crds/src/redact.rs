//! Credentials out of messages: one function for every form a connection string takes here, used wherever a
//! URL reaches a log line, `/status`, an error, a condition or an Event.

/// `text` with its credentials replaced by `***`:
///
/// - URL user information: `postgres://app:s3cret@db:5432/shop` → `postgres://app:***@db:5432/shop`; a
///   user information without `:` may be a token and goes whole: `https://tok@host` → `https://***@host`;
/// - query parameters whose name says they hold a secret (`password`, `sslpassword`, `passwd`, `pwd`,
///   `secret`, `token`, `access_token`, `api_key`, `apikey`): `?sslmode=require&password=x` →
///   `?sslmode=require&password=***`;
/// - the same keywords in a libpq keyword/value string: `host=db password=x` → `host=db password=***`.
pub fn url(text: &str) -> String {
    match text.find("://") {
        Some(scheme_end) => {
            let (scheme, rest) = text.split_at(scheme_end + 3);
            // The authority ends at the first `/`, `?` or `#`; user information ends at its last `@`.
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => authority.to_string(),
            };
            let tail = match tail.split_once('?') {
                Some((path, query)) => {
                    let (query, fragment) = match query.split_once('#') {
                        Some((query, fragment)) => (query, Some(fragment)),
                        None => (query, None),
                    };
                    let query: Vec<String> = query.split('&').map(|pair| redact_pair(pair, '=')).collect();
                    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
                    format!("{path}?{}{fragment}", query.join("&"))
                }
                None => tail.to_string(),
            };
            format!("{scheme}{authority}{tail}")
        }
        None if text.contains('=') => text.split(' ').map(|pair| redact_pair(pair, '=')).collect::<Vec<_>>().join(" "),
        None => text.to_string(),
    }
}

/// Whether a parameter of this name holds a secret.
fn secret_name(name: &str) -> bool {
    const NAMES: [&str; 9] =
        ["password", "sslpassword", "passwd", "pwd", "secret", "token", "access_token", "api_key", "apikey"];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn redact_pair(pair: &str, separator: char) -> String {
    match pair.split_once(separator) {
        Some((name, _)) if secret_name(name) => format!("{name}{separator}***"),
        _ => pair.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn every_form_loses_its_secret_and_keeps_the_rest() {
        let cases = [
            ("postgres://app:s3cret@db:5432/shop", "postgres://app:***@db:5432/shop"),
            ("postgres://app@db:1/shop?password=s3cret", "postgres://***@db:1/shop?password=***"),
            (
                "postgresql://db/shop?sslmode=verify-full&sslpassword=s3cret&application_name=x",
                "postgresql://db/shop?sslmode=verify-full&sslpassword=***&application_name=x",
            ),
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            ("rediss://default:s3cret@r.example:6380", "rediss://default:***@r.example:6380"),
            ("https://tok3n@collector:4317", "https://***@collector:4317"),
            ("http://collector:4317/v1?token=s3cret#top", "http://collector:4317/v1?token=***#top"),
            ("http://user:p@ss@host/x", "http://user:***@host/x"),
            ("host=db port=5432 password=s3cret dbname=shop", "host=db port=5432 password=*** dbname=shop"),
            ("kafka-1:9092,kafka-2:9092", "kafka-1:9092,kafka-2:9092"),
            ("http://orders:8080/api", "http://orders:8080/api"),
        ];
        for (given, shown) in cases {
            assert_eq!(url(given), shown, "{given}");
            assert!(!url(given).contains("s3cret") && !url(given).contains("tok3n"), "{given}");
        }
    }
}
