//! Types shared by several kinds: durations, values that may come from a Secret, policy targets.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A duration written as Kubernetes and Go write them: `500ms`, `30s`, `5m`, `1h30m`.
///
/// The CRD schema checks the syntax (a pattern) and that the value is positive (a CEL rule), so a bad
/// duration is refused at `kubectl apply`; [`Duration::parse`] reads the same grammar at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

/// An HTTP header name (an RFC 9110 token), as a regular expression for the OpenAPI schema.
pub const HEADER_NAME_PATTERN: &str = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

/// An HTTP header value: no control characters but horizontal tab (no CR or LF that could split a header).
pub const HEADER_VALUE_PATTERN: &str = r"^[^\x00-\x08\x0A-\x1F\x7F]*$";

/// The syntax of [`Duration`], as a regular expression for the OpenAPI schema.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,6}(\.[0-9]{1,9})?(ms|s|m|h)){1,4}$";

impl Duration {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Parses `1h30m`, `2.5s`, `500ms`. Units: `ms`, `s`, `m`, `h`. Zero is refused.
    pub fn parse(&self) -> Result<std::time::Duration, DurationError> {
        parse_duration(&self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": "duration(self) > duration('0s')",
                "message": "must be a positive duration such as 500ms, 30s, 5m or 1h30m"
            }]
        })
    }
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("duration {0:?} is empty")]
    Empty(String),
    #[error("duration {0:?} is not a sequence of <number><unit> with unit ms, s, m or h")]
    Syntax(String),
    #[error("duration {0:?} must be greater than zero")]
    NotPositive(String),
}

/// See [`Duration::parse`].
pub fn parse_duration(text: &str) -> Result<std::time::Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty(text.into()));
    }
    let syntax = || DurationError::Syntax(text.into());
    let mut total = 0f64;
    let mut rest = text;
    let mut groups = 0;
    while !rest.is_empty() {
        // The grammar of DURATION_PATTERN: at most four groups, at most six digits before the point.
        groups += 1;
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(syntax)?;
        let integer_len = rest[..number_len].find('.').unwrap_or(number_len);
        if number_len == 0 || integer_len > 6 || number_len - integer_len > 10 || groups > 4 {
            return Err(syntax());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| syntax())?;
        rest = &rest[number_len..];
        let (seconds_per_unit, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(syntax());
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    if total <= 0.0 {
        return Err(DurationError::NotPositive(text.into()));
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| syntax())
}

/// A key of a Secret in the resource's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the resource that refers to it.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A setting given either inline (`value`) or from a Secret (`secretKeyRef`), never both.
///
/// Secret values are never copied into the rendered data-plane configuration: the operator passes them to
/// the data-plane pods as environment variables named by [`crate::config::secret_env_var`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.value) != has(self.secretKeyRef)",
    "message": "set exactly one of value or secretKeyRef"
}]))]
pub struct ValueSource {
    /// The value itself. Use `secretKeyRef` for anything confidential (passwords, tokens, URLs with
    /// credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value is read from this Secret key at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

impl ValueSource {
    pub fn inline(value: impl Into<String>) -> Self {
        Self { value: Some(value.into()), secret_key_ref: None }
    }

    pub fn secret(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self { value: None, secret_key_ref: Some(SecretKeyRef { name: name.into(), key: key.into() }) }
    }
}

/// The kinds a policy may target. Only `Middleware` today.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum TargetKind {
    #[default]
    Middleware,
}

fn default_group() -> String {
    crate::GROUP.to_string()
}

/// Names the Middleware (and optionally one of its routes) that a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// API group of the target. Only `umw.dev`.
    #[serde(default = "default_group")]
    #[schemars(extend("enum" = ["umw.dev"]))]
    pub group: String,
    /// Kind of the target. Only `Middleware`.
    #[serde(default)]
    pub kind: TargetKind,
    /// Name of the Middleware, in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Name of one route of the Middleware (`spec.routes[].name`). Without it the policy applies to every
    /// route of the Middleware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub section_name: Option<String>,
}

impl PolicyTargetRef {
    pub fn middleware(name: impl Into<String>) -> Self {
        Self { group: default_group(), kind: TargetKind::Middleware, name: name.into(), section_name: None }
    }

    pub fn with_section(mut self, section: impl Into<String>) -> Self {
        self.section_name = Some(section.into());
        self
    }
}

impl fmt::Display for PolicyTargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Middleware/{}", self.name)?;
        if let Some(section) = &self.section_name {
            write!(f, " route {section}")?;
        }
        Ok(())
    }
}

/// An embedded JSON Schema (draft 2020-12) document, kept as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonDocument(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for JsonDocument {
    fn schema_name() -> Cow<'static, str> {
        "JsonDocument".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        let ms = |n| std::time::Duration::from_millis(n);
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("30s"), Ok(ms(30_000)));
        assert_eq!(parse_duration("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("0s"), Err(DurationError::NotPositive("0s".into())));
        for bad in ["", "5", "s", "5d", "-5s", "5 s", "1.2.3s", "9300000000000000000s", "1s1s1s1s1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn value_source_constructors_set_one_side() {
        assert!(ValueSource::inline("x").secret_key_ref.is_none());
        assert!(ValueSource::secret("s", "k").value.is_none());
    }
}
