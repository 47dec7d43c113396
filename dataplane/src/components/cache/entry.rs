//! A cached response and its compact binary form (what Redis stores).
//!
//! Layout, all integers big-endian: magic `UMW1`, status u16, stored / fresh-until / stale-until as
//! milliseconds since the epoch (u64), a count and length-prefixed strings for the `Vary` header names,
//! the same for headers (name, value), then the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

const MAGIC: &[u8; 4] = b"UMW1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub status: u16,
    /// The response's headers, parsed once when the entry is made or read, so that a hit copies a map
    /// of shared values instead of parsing every header again.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it was stored, in milliseconds since the epoch.
    pub stored_ms: u64,
    /// Fresh until then.
    pub fresh_until_ms: u64,
    /// May be served stale (while revalidating, or on upstream errors) until then.
    pub stale_until_ms: u64,
    /// Header names of the response's `Vary`, lower case.
    pub vary: Vec<String>,
}

impl Entry {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(
            64 + self.body.len() + self.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 8).sum::<usize>(),
        );
        out.put_slice(MAGIC);
        out.put_u16(self.status);
        out.put_u64(self.stored_ms);
        out.put_u64(self.fresh_until_ms);
        out.put_u64(self.stale_until_ms);
        out.put_u16(self.vary.len() as u16);
        for name in &self.vary {
            put_bytes(&mut out, name.as_bytes());
        }
        out.put_u16(self.headers.len() as u16);
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// `None` for anything that is not an entry of this format (a foreign or truncated value).
    pub fn decode(mut data: Bytes) -> Option<Entry> {
        if data.len() < 4 + 2 + 24 + 4 || &data[..4] != MAGIC {
            return None;
        }
        data.advance(4);
        let status = data.get_u16();
        let stored_ms = data.get_u64();
        let fresh_until_ms = data.get_u64();
        let stale_until_ms = data.get_u64();
        let vary_count = usize::from(data.get_u16());
        let mut vary = Vec::with_capacity(vary_count);
        for _ in 0..vary_count {
            vary.push(String::from_utf8(take_bytes(&mut data)?.to_vec()).ok()?);
        }
        if data.remaining() < 2 {
            return None;
        }
        let header_count = usize::from(data.get_u16());
        let mut headers = HeaderMap::with_capacity(header_count);
        for _ in 0..header_count {
            let name = HeaderName::from_bytes(&take_bytes(&mut data)?).ok()?;
            let value = HeaderValue::from_maybe_shared(take_bytes(&mut data)?).ok()?;
            headers.append(name, value);
        }
        Some(Entry { status, headers, body: data, stored_ms, fresh_until_ms, stale_until_ms, vary })
    }

    /// Bytes the entry takes in memory, roughly.
    pub fn weight(&self) -> u32 {
        let size =
            self.body.len() + self.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 16).sum::<usize>() + 128;
        u32::try_from(size).unwrap_or(u32::MAX)
    }
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn take_bytes(data: &mut Bytes) -> Option<Bytes> {
    if data.remaining() < 4 {
        return None;
    }
    let len = data.get_u32() as usize;
    (data.remaining() >= len).then(|| data.split_to(len))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let entry = Entry {
            status: 200,
            headers: [
                (http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (http::header::ETAG, HeaderValue::from_static("\"x\"")),
                (HeaderName::from_static("x-custom"), HeaderValue::from_static("a")),
            ]
            .into_iter()
            .chain([(HeaderName::from_static("x-custom"), HeaderValue::from_static("b"))])
            .fold(HeaderMap::new(), |mut map, (name, value)| {
                map.append(name, value);
                map
            }),
            body: Bytes::from_static(b"{\"a\":1}"),
            stored_ms: 1,
            fresh_until_ms: 2,
            stale_until_ms: 3,
            vary: vec!["accept-encoding".into()],
        };
        assert_eq!(Entry::decode(entry.encode()), Some(entry.clone()));
        let encoded = entry.encode();
        assert_eq!(Entry::decode(encoded.slice(..encoded.len() - entry.body.len() - 5)), None, "truncated");
        assert_eq!(Entry::decode(Bytes::from_static(b"hello world, not an entry at all")), None);
        let decoded = Entry::decode(encoded).unwrap();
        let repeated: Vec<_> = decoded.headers.get_all("x-custom").iter().collect();
        assert_eq!(repeated, ["a", "b"], "a repeated header keeps its values in order");
    }
}
