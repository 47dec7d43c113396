//! CloudEvents 1.0 on the wire, through the `cloudevents-sdk` crate's message traits: Kafka records in
//! binary mode (`ce_*` headers, `content-type` for `datacontenttype`) or structured mode (a JSON envelope
//! with `content-type: application/cloudevents+json`), and HTTP requests in binary mode (`ce-*` headers).
//! The W3C trace context travels as the `traceparent` extension (the CloudEvents distributed tracing
//! extension), so a trace continues across Kafka.

use cloudevents::event::{AttributesReader, Data, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, MessageAttributeValue, MessageDeserializer, StructuredDeserializer,
    StructuredSerializer,
};
use cloudevents::{Event, EventBuilder, EventBuilderV10};

/// `content-type` of a structured event.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// `content-type` of a batch of structured events (a JSON array).
pub const BATCH: &str = "application/cloudevents-batch+json";

/// The trace context extension attribute.
pub const TRACEPARENT: &str = "traceparent";

/// How events are written to Kafka.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Binary,
    Structured,
}

/// An event ready for a transport: headers and a body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Wire {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Collects an event's attributes as headers with a prefix (`ce_` for Kafka, `ce-` for HTTP).
struct Collector {
    prefix: &'static str,
    wire: Wire,
}

impl Collector {
    fn name(&self, attribute: &str) -> String {
        if attribute == "datacontenttype" { "content-type".to_string() } else { format!("{}{attribute}", self.prefix) }
    }
}

impl BinarySerializer<Wire> for Collector {
    fn set_spec_version(mut self, version: SpecVersion) -> cloudevents::message::Result<Self> {
        let name = format!("{}specversion", self.prefix);
        self.wire.headers.push((name, version.to_string()));
        Ok(self)
    }

    fn set_attribute(mut self, name: &str, value: MessageAttributeValue) -> cloudevents::message::Result<Self> {
        let name = self.name(name);
        self.wire.headers.push((name, value.to_string()));
        Ok(self)
    }

    fn set_extension(self, name: &str, value: MessageAttributeValue) -> cloudevents::message::Result<Self> {
        self.set_attribute(name, value)
    }

    fn end_with_data(mut self, bytes: Vec<u8>) -> cloudevents::message::Result<Wire> {
        self.wire.body = bytes;
        Ok(self.wire)
    }

    fn end(self) -> cloudevents::message::Result<Wire> {
        Ok(self.wire)
    }
}

impl StructuredSerializer<Wire> for Collector {
    fn set_structured_event(mut self, bytes: Vec<u8>) -> cloudevents::message::Result<Wire> {
        self.wire.headers.push(("content-type".into(), STRUCTURED.into()));
        self.wire.body = bytes;
        Ok(self.wire)
    }
}

/// The event as a Kafka record's headers and value.
/// In binary mode the data is the value as it came (an ingested JSON body is published byte for byte); in
/// structured mode JSON data kept as bytes is written as the envelope's `data`, not as `data_base64`.
pub fn to_kafka(event: &Event, format: Format) -> Result<Wire, String> {
    let collector = Collector { prefix: "ce_", wire: Wire::default() };
    match format {
        Format::Binary => BinaryDeserializer::deserialize_binary(event.clone(), collector),
        Format::Structured => StructuredDeserializer::deserialize_structured(with_json_data(event), collector),
    }
    .map_err(|e| e.to_string())
}

/// The event with JSON data kept as bytes parsed into JSON, for a structured envelope.
fn with_json_data(event: &Event) -> Event {
    let mut event = event.clone();
    if let Some(Data::Binary(bytes)) = event.data()
        && is_json_type(event.datacontenttype())
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
    {
        event.set_data_unchecked(Data::Json(value));
    }
    event
}

/// Whether a `datacontenttype` says JSON (an absent one does, as CloudEvents 1.0 reads it).
fn is_json_type(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|t| t.starts_with("application/json") || t.starts_with("text/json") || t.ends_with("+json"))
}

/// The event as an HTTP request's `ce-*` headers and body (binary content mode).
pub fn to_http(event: &Event) -> Result<Wire, String> {
    BinaryDeserializer::deserialize_binary(event.clone(), Collector { prefix: "ce-", wire: Wire::default() })
        .map_err(|e| e.to_string())
}

/// Reads an event from a Kafka record's headers and value, in either mode.
pub fn from_kafka(headers: Vec<(String, Vec<u8>)>, body: Option<Vec<u8>>) -> Result<Event, String> {
    MessageDeserializer::into_event(Record { headers, body }).map_err(|e| e.to_string())
}

struct Record {
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

impl Record {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

fn text(bytes: Vec<u8>) -> cloudevents::message::Result<String> {
    String::from_utf8(bytes).map_err(|e| cloudevents::message::Error::Other { source: Box::new(e) })
}

impl BinaryDeserializer for Record {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(self, visitor: V) -> cloudevents::message::Result<R> {
        let version = self.get("ce_specversion").map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
        let version = SpecVersion::try_from(version.as_str())?;
        let attributes = version.attribute_names();
        let mut visitor = visitor.set_spec_version(version)?;
        for (name, value) in self.headers {
            let lower = name.to_ascii_lowercase();
            if lower == "content-type" {
                visitor = visitor.set_attribute("datacontenttype", MessageAttributeValue::String(text(value)?))?;
                continue;
            }
            let Some(attribute) = lower.strip_prefix("ce_") else { continue };
            if attribute == "specversion" {
                continue;
            }
            let value = MessageAttributeValue::String(text(value)?);
            visitor = if attributes.contains(&attribute) {
                visitor.set_attribute(attribute, value)?
            } else {
                visitor.set_extension(attribute, value)?
            };
        }
        match self.body {
            Some(body) => visitor.end_with_data(body),
            None => visitor.end(),
        }
    }
}

impl StructuredDeserializer for Record {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(
        self,
        visitor: V,
    ) -> cloudevents::message::Result<R> {
        visitor.set_structured_event(self.body.unwrap_or_default())
    }
}

impl MessageDeserializer for Record {
    fn encoding(&self) -> Encoding {
        if self.get("content-type").is_some_and(|v| v.starts_with(STRUCTURED.as_bytes())) {
            Encoding::STRUCTURED
        } else if self.get("ce_specversion").is_some() {
            Encoding::BINARY
        } else {
            Encoding::UNKNOWN
        }
    }
}

/// Reads an event from an HTTP request: structured (`application/cloudevents+json`), binary (`ce-*`
/// headers), or, for a plain body, a new event around it with the given defaults (`ce-id`, `ce-type`,
/// `ce-source`, `ce-subject` headers taken when present, so that a client retrying with the same `ce-id`
/// lets consumers drop the duplicate).
pub fn from_http(headers: &http::HeaderMap, body: Vec<u8>, defaults: &Defaults) -> Result<Event, String> {
    let structured = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(STRUCTURED));
    if structured || headers.contains_key("ce-specversion") {
        return cloudevents::binding::http::to_event(headers, body).map_err(describe);
    }
    let content_type =
        headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut builder = EventBuilderV10::new()
        .id(header("ce-id").unwrap_or_else(new_id))
        .ty(header("ce-type").unwrap_or_else(|| defaults.ty.clone()))
        .source(header("ce-source").unwrap_or_else(|| defaults.source.clone()))
        .time(chrono::Utc::now());
    if let Some(subject) = header("ce-subject") {
        builder = builder.subject(subject);
    }
    // A JSON body is checked, not kept parsed: it is published as it came, and what needs its fields (a
    // filter, a key template, a schema) parses it then. Checked by parsing it whole, as those will: a
    // lighter check (serde's `IgnoredAny`) lets through invalid UTF-8, lone surrogates and any nesting depth.
    if is_json_type(Some(&content_type)) {
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| format!("the body is not JSON ({e})"))?;
    }
    builder.data(content_type, Data::Binary(body)).build().map_err(|e| e.to_string())
}

/// Where an event breaks the CloudEvents 1.0 specification, one `(attribute, reason)` per problem: the
/// required attributes non-empty, `specversion` 1.0, optional string attributes non-empty when present,
/// `datacontenttype` a media type (RFC 2046), and attribute names of lower-case ASCII letters and digits.
/// (`time` and `dataschema` are parsed, as a timestamp and a URI, when the event is read.)
pub fn nonconformities(event: &Event) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |attribute: &str, reason: &str| problems.push((attribute.to_string(), reason.to_string()));
    if event.specversion() != SpecVersion::V10 {
        problem("specversion", &format!("is {}; only CloudEvents 1.0 is accepted", event.specversion()));
    }
    for (attribute, value) in [("id", event.id()), ("source", event.source().as_str()), ("type", event.ty())] {
        if value.is_empty() {
            problem(attribute, "is required and must not be empty");
        }
    }
    if event.subject() == Some("") {
        problem("subject", "must not be empty when present");
    }
    if let Some(content_type) = event.datacontenttype()
        && !is_media_type(content_type)
    {
        problem("datacontenttype", &format!("{content_type:?} is not a media type such as application/json"));
    }
    let mut extensions: Vec<&str> = event.iter_extensions().map(|(name, _)| name).collect();
    extensions.sort_unstable();
    for name in extensions {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            problem(name, "is not a valid attribute name: only lower-case letters a-z and digits 0-9");
        } else if matches!(name, "data" | "data_base64" | "specversion") {
            problem(name, "is a reserved name and cannot be an extension attribute");
        }
    }
    problems
}

/// `type/subtype` with optional `; parameter`s, both tokens (RFC 2046, RFC 9110 §8.3.1).
fn is_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    matches!(essence.split_once('/'), Some((ty, subtype)) if token(ty) && token(subtype))
}

/// The SDK's reading error in terms of the attribute at fault.
fn describe(error: cloudevents::message::Error) -> String {
    use cloudevents::message::Error;
    match error {
        Error::ParseTimeError { source } => format!("attribute `time` is not an RFC 3339 timestamp ({source})"),
        Error::ParseUrlError { source } => format!("attribute `dataschema` is not an absolute URI ({source})"),
        Error::UnknownSpecVersion { source } => format!("attribute `specversion`: {source}; only 1.0 is accepted"),
        other => format!("not a CloudEvent: {other}"),
    }
}

/// An event around a Kafka record that is not a CloudEvent: id `<topic>-<partition>-<offset>` (stable
/// across redeliveries), the given type, source `kafka:<topic>`, the value as data (JSON when it is).
pub fn plain(message: &super::kafka::Incoming, ty: &str) -> Result<Event, String> {
    let payload = message.payload.clone().unwrap_or_default();
    let builder = EventBuilderV10::new()
        .id(format!("{}-{}-{}", message.topic, message.partition, message.offset))
        .ty(ty.to_string())
        .source(format!("kafka:{}", message.topic));
    let builder = match serde_json::from_slice::<serde_json::Value>(&payload) {
        Ok(json) => builder.data("application/json", json),
        Err(_) => builder.data("application/octet-stream", payload),
    };
    builder.build().map_err(|e| e.to_string())
}

/// `type` and `source` of events made from plain HTTP bodies.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub ty: String,
    pub source: String,
}

/// A new event id: 128 random bits as a UUID (version 4).
pub fn new_id() -> String {
    let n = fastrand::u128(..);
    let n = (n & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The event's data as JSON, when it is JSON (for filters, templates and schemas).
pub fn json_data(event: &Event) -> Option<serde_json::Value> {
    match event.data()? {
        Data::Json(value) => Some(value.clone()),
        Data::String(s) => serde_json::from_str(s).ok(),
        Data::Binary(bytes) => {
            if is_json_type(event.datacontenttype()) {
                serde_json::from_slice(bytes).ok()
            } else {
                None
            }
        }
    }
}

/// A string attribute or extension of the event, by name (`id`, `type`, `source`, `subject`, or an
/// extension).
pub fn attribute(event: &Event, name: &str) -> Option<String> {
    match name {
        "id" => Some(event.id().to_string()),
        "type" => Some(event.ty().to_string()),
        "source" => Some(event.source().to_string()),
        "subject" => event.subject().map(str::to_string),
        other => event.extension(other).map(ToString::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::event::AttributesWriter as _;

    fn event() -> Event {
        EventBuilderV10::new()
            .id("e-1")
            .ty("order.paid")
            .source("/shop")
            .extension(TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .data("application/json", serde_json::json!({"id": 42, "status": "paid"}))
            .build()
            .unwrap()
    }

    #[test]
    fn binary_mode_puts_attributes_in_ce_headers_and_data_in_the_value() {
        let wire = to_kafka(&event(), Format::Binary).unwrap();
        assert_eq!(wire.header("ce_specversion"), Some("1.0"));
        assert_eq!(wire.header("ce_id"), Some("e-1"));
        assert_eq!(wire.header("ce_type"), Some("order.paid"));
        assert_eq!(wire.header("content-type"), Some("application/json"));
        assert_eq!(wire.header("ce_traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        let data: serde_json::Value = serde_json::from_slice(&wire.body).unwrap();
        assert_eq!(data["id"], 42);
    }

    #[test]
    fn both_modes_read_back_to_the_same_event() {
        for format in [Format::Binary, Format::Structured] {
            let wire = to_kafka(&event(), format).unwrap();
            let headers = wire.headers.iter().map(|(n, v)| (n.clone(), v.clone().into_bytes())).collect();
            let back = from_kafka(headers, Some(wire.body)).unwrap();
            assert_eq!(back.id(), "e-1", "{format:?}");
            assert_eq!(back.ty(), "order.paid");
            assert_eq!(
                attribute(&back, TRACEPARENT).as_deref(),
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            );
            assert_eq!(json_data(&back).unwrap()["status"], "paid", "{format:?}");
        }
    }

    #[test]
    fn a_record_that_is_no_cloudevent_is_refused_with_a_reason() {
        let error = from_kafka(vec![], Some(b"{}".to_vec())).unwrap_err();
        assert!(!error.is_empty());
    }

    #[test]
    fn a_plain_json_body_becomes_an_event_with_the_defaults() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        let defaults = Defaults { ty: "orders".into(), source: "/ns/shop".into() };
        let event = from_http(&headers, br#"{"id":7}"#.to_vec(), &defaults).unwrap();
        assert_eq!(event.ty(), "orders");
        assert_eq!(event.source().to_string(), "/ns/shop");
        assert_eq!(event.id().len(), 36);
        assert_eq!(json_data(&event).unwrap()["id"], 7);
        assert!(from_http(&headers, b"not json".to_vec(), &defaults).unwrap_err().contains("not JSON"));
        // Nested deeper than the gateway reads (serde_json's limit of 128), though well-formed.
        let deep = [vec![b'['; 200], vec![b']'; 200]].concat();
        for bad in [&br#"{"id":7} trailing"#[..], b"{\"sku\":\"\xff\"}", br#"{"a":"\udc00"}"#, &deep] {
            let error = from_http(&headers, bad.to_vec(), &defaults).unwrap_err();
            assert!(error.contains("not JSON"), "{}: {error}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_ingested_json_body_is_published_as_it_came_and_as_json_in_an_envelope() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        let defaults = Defaults { ty: "orders".into(), source: "/ns/shop".into() };
        let body = br#"{ "id": 7,  "note": "spaces kept" }"#;
        let event = from_http(&headers, body.to_vec(), &defaults).unwrap();
        assert_eq!(to_kafka(&event, Format::Binary).unwrap().body, body, "byte for byte");
        assert_eq!(to_http(&event).unwrap().body, body);
        let envelope: serde_json::Value =
            serde_json::from_slice(&to_kafka(&event, Format::Structured).unwrap().body).unwrap();
        assert_eq!(envelope["data"]["id"], 7, "{envelope}");
        assert!(envelope.get("data_base64").is_none(), "{envelope}");
        // Data that is not JSON stays base64 in an envelope.
        headers.insert("content-type", "application/octet-stream".parse().unwrap());
        let event = from_http(&headers, vec![0, 159, 146, 150], &defaults).unwrap();
        let envelope: serde_json::Value =
            serde_json::from_slice(&to_kafka(&event, Format::Structured).unwrap().body).unwrap();
        assert_eq!(envelope["data_base64"], "AJ+Slg==");
    }

    #[test]
    fn events_that_break_cloudevents_1_0_are_named_by_attribute() {
        assert!(nonconformities(&event()).is_empty());
        let mut bad = event();
        bad.set_id("");
        bad.set_source("");
        bad.set_extension("bad_ext", "x");
        bad.set_extension("Upper", "x");
        let _ = bad.set_data("text plain", Data::String("x".into()));
        let mut attributes: Vec<String> = nonconformities(&bad).into_iter().map(|(a, _)| a).collect();
        attributes.sort();
        assert_eq!(attributes, ["Upper", "bad_ext", "datacontenttype", "id", "source"]);
        assert!(is_media_type("application/cloudevents+json; charset=utf-8"));
        assert!(!is_media_type("application/"));
        assert!(!is_media_type("json"));
    }

    #[test]
    fn ids_are_version_4_uuids() {
        let id = new_id();
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
