//! The two things read from X.509 certificates that the TLS library does not expose: the validity period
//! (for expiry metrics and status) and the subject as text (for `x-forwarded-client-cert`). A small DER
//! reader over certificates that the TLS library has already parsed and, for clients, verified; anything
//! unexpected yields `None`, never a panic.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

/// One DER element: its tag, its content and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count].iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;

/// `notBefore` and `notAfter` of a DER certificate.
pub fn validity(certificate: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (SEQUENCE, certificate, _) = element(certificate)? else { return None };
    let (SEQUENCE, tbs, _) = element(certificate)? else { return None };
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == VERSION {
        rest = after;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        rest = element(rest)?.2;
    }
    let (SEQUENCE, validity, _) = element(rest)? else { return None };
    let (tag, not_before, rest) = element(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = element(rest)?;
    Some((not_before, time(tag, not_after)?))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?;
    let text = text.strip_suffix('Z')?;
    let full = match (tag, text.len()) {
        (UTC_TIME, 12) => {
            let year: u32 = text[..2].parse().ok()?;
            format!("{}{text}", if year < 50 { "20" } else { "19" })
        }
        (GENERALIZED_TIME, 14) => text.to_string(),
        _ => return None,
    };
    let at = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S").ok()?.and_utc();
    let seconds = u64::try_from(at.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// A Name's content (the RDN sequence without its outer tag) as RFC 4514 text: most specific first,
/// `CN=orders,OU=payments,O=shop`.
pub fn distinguished_name(name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let (SET, set, after) = element(rest)? else { return None };
        rest = after;
        let mut attributes = Vec::new();
        let mut inner = set;
        while !inner.is_empty() {
            let (SEQUENCE, attribute, after) = element(inner)? else { return None };
            inner = after;
            let (OID, oid, value) = element(attribute)? else { return None };
            let (_, value, _) = element(value)?;
            let value = String::from_utf8_lossy(value);
            attributes.push(format!("{}={}", attribute_name(oid), escape(&value)));
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// The short name of an attribute type, or its dotted OID.
fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let Some((&first, rest)) = oid.split_first() else { return String::new() };
    let mut out = format!("{}.{}", first / 40, first % 40);
    let mut value: u64 = 0;
    for &byte in rest {
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            let _ = write!(out, ".{value}");
            value = 0;
        }
    }
    out
}

/// RFC 4514 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER of a length-prefixed element.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        out.extend(content);
        out
    }

    fn attribute(oid: &[u8], value: &str) -> Vec<u8> {
        der(SET, &der(SEQUENCE, &[der(OID, oid), der(0x0c, value.as_bytes())].concat()))
    }

    #[test]
    fn names_read_most_specific_first_and_are_escaped() {
        let name = [
            attribute(&[0x55, 0x04, 0x06], "DE"),
            attribute(&[0x55, 0x04, 0x0a], "shop, inc"),
            attribute(&[0x55, 0x04, 0x03], "orders"),
        ]
        .concat();
        assert_eq!(distinguished_name(&name).unwrap(), "CN=orders,O=shop\\, inc,C=DE");
        assert_eq!(
            distinguished_name(&attribute(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37], "x")).unwrap(),
            "1.3.6.1.4.1.311=x"
        );
        assert_eq!(distinguished_name(&[SET, 0x05, 0x30]), None, "truncated");
        assert_eq!(distinguished_name(&[]).unwrap(), "");
    }

    #[test]
    fn validity_is_read_from_both_time_forms() {
        let validity_of = |not_before: Vec<u8>, not_after: Vec<u8>| {
            let tbs = [
                der(VERSION, &der(0x02, &[2])),
                der(0x02, &[1]),
                der(SEQUENCE, &[]),
                der(SEQUENCE, &[]),
                der(SEQUENCE, &[not_before, not_after].concat()),
                der(SEQUENCE, &[]),
            ]
            .concat();
            validity(&der(SEQUENCE, &[der(SEQUENCE, &tbs), der(SEQUENCE, &[])].concat()))
        };
        let (from, to) =
            validity_of(der(UTC_TIME, b"491231235959Z"), der(GENERALIZED_TIME, b"20510101000000Z")).unwrap();
        assert_eq!(from.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 2_524_607_999);
        assert_eq!(to.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 2_556_144_000);
        let (from, _) = validity_of(der(UTC_TIME, b"700101000000Z"), der(UTC_TIME, b"700101000001Z")).unwrap();
        assert_eq!(from, SystemTime::UNIX_EPOCH);
        assert_eq!(validity_of(der(UTC_TIME, b"7001010000Z"), der(UTC_TIME, b"700101000001Z")), None);
        assert_eq!(validity(&[SEQUENCE, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
