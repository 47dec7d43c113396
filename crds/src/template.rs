//! The small template language of tags and keys: text with `{{ source.name }}` placeholders, e.g.
//! `product:{{ path.1 }}` or `GET:/products/{{ data.id }}`. Which sources exist depends on where the
//! template is used (a request: `path`, `query`, `header`, `host`; an event: `data`, `type`, ...).

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// `source.name`, or `source` alone (`{{ host }}`).
    Value {
        source: String,
        name: Option<String>,
    },
}

/// Parses a template; `Err` says what is wrong.
pub fn parse(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| format!("{template:?}: a {{{{ without its }}}}"))?;
        let expression = after[..end].trim();
        if expression.is_empty() {
            return Err(format!("{template:?}: an empty {{{{ }}}}"));
        }
        let (source, name) = match expression.split_once('.') {
            Some((source, name)) => (source.to_string(), Some(name.to_string())),
            None => (expression.to_string(), None),
        };
        if !source.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.as_deref().is_some_and(|n| n.is_empty() || n.contains(char::is_whitespace))
        {
            return Err(format!("{template:?}: {expression:?} is not source.name"));
        }
        parts.push(Part::Value { source, name });
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("{template:?}: a }}}} without its {{{{"));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

/// Parses and checks that every placeholder uses one of `sources`.
pub fn check(template: &str, sources: &[&str]) -> Result<(), String> {
    for part in parse(template)? {
        if let Part::Value { source, .. } = part
            && !sources.contains(&source.as_str())
        {
            return Err(format!("{template:?}: unknown source {source:?}; one of {}", sources.join(", ")));
        }
    }
    Ok(())
}

/// Renders parsed parts with `lookup(source, name)`; a missing value renders empty.
pub fn render(parts: &[Part], lookup: impl Fn(&str, Option<&str>) -> Option<String>) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(text) => out.push_str(text),
            Part::Value { source, name } => out.push_str(&lookup(source, name.as_deref()).unwrap_or_default()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_render_and_refuse_nonsense() {
        let parts = parse("product:{{ path.1 }}/{{host}}").unwrap();
        let rendered = render(&parts, |s, n| Some(format!("<{s}:{}>", n.unwrap_or("-"))));
        assert_eq!(rendered, "product:<path:1>/<host:->");
        assert!(parse("a {{ b").is_err());
        assert!(parse("a }} b").is_err());
        assert!(parse("{{ }}").is_err());
        assert!(check("{{ data.id }}", &["path"]).is_err());
        assert!(check("x-{{ query.page }}", &["path", "query"]).is_ok());
    }
}
