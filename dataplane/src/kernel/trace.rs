//! W3C Trace Context (`traceparent`): read from the request, continued to the upstream.
//!
//! The data plane makes its own ids rather than asking a tracing SDK, so that propagation costs next to
//! nothing when no exporter is configured; when one is, the spans it exports carry these same ids
//! ([`crate::kernel::telemetry`]).

use http::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";

/// The trace of one request as the gateway sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's server span.
    pub span_id: [u8; 8],
    /// The caller's span, when the request carried a valid `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the caller's trace, or starts one sampled with probability `ratio`.
    pub fn from_headers(headers: &HeaderMap, ratio: f64) -> Self {
        match headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse) {
            Some((trace_id, parent, flags)) => {
                Self { trace_id, span_id: new_span_id(), parent_span_id: Some(parent), sampled: flags & 1 == 1 }
            }
            None => Self {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                parent_span_id: None,
                sampled: ratio >= 1.0 || (ratio > 0.0 && fastrand::f64() < ratio),
            },
        }
    }

    /// The `traceparent` for a request the gateway sends on behalf of this one, from span `span_id`.
    pub fn traceparent(&self, span_id: [u8; 8]) -> HeaderValue {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        hex(&mut text, &self.trace_id);
        text.push('-');
        hex(&mut text, &span_id);
        text.push_str(if self.sampled { "-01" } else { "-00" });
        // Built from hex digits and dashes only.
        HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    pub fn trace_id_hex(&self) -> String {
        let mut text = String::with_capacity(32);
        hex(&mut text, &self.trace_id);
        text
    }
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// `version-traceid-parentid-flags`; version 00 exactly, later versions by their first four fields.
/// A `traceparent` value: trace id, parent span id, flags.
pub fn parse(text: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    decode(trace, &mut trace_id)?;
    decode(parent, &mut span_id)?;
    let mut flag = [0u8; 1];
    decode(flags, &mut flag)?;
    let mut v = [0u8; 1];
    decode(version, &mut v)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flag[0]))
}

fn decode(text: &str, out: &mut [u8]) -> Option<()> {
    let bytes = text.as_bytes();
    for (i, slot) in out.iter_mut().enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *slot = digit(bytes[2 * i])? << 4 | digit(bytes[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(tp).unwrap());
        h
    }

    #[test]
    fn a_valid_traceparent_is_continued() {
        let ctx = TraceContext::from_headers(&headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), 0.0);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id, Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        assert!(ctx.sampled);
        let out = ctx.traceparent([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(out, "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01");
    }

    #[test]
    fn invalid_traceparents_start_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let ctx = TraceContext::from_headers(&headers(bad), 1.0);
            assert_eq!(ctx.parent_span_id, None, "{bad}");
            assert!(ctx.sampled, "ratio 1 samples new traces");
        }
        let later =
            TraceContext::from_headers(&headers("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x"), 1.0);
        assert!(later.parent_span_id.is_some() && !later.sampled, "a later version is read by its first fields");
        assert!(!TraceContext::from_headers(&HeaderMap::new(), 0.0).sampled);
    }
}
