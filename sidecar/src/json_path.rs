//! The small JSONPath subset meters use to read CloudEvents `data`: `$.a.b` and `$['a']['b']`,
//! evaluated over raw JSON so numbers are never parsed through a float.

use serde_json::value::RawValue;
use std::collections::HashMap;

/// A parsed path: the object keys to descend, from the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath(Vec<String>);

/// Why a path is not in the supported subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported JSON path {0:?}: use $.field or $['field'] segments")]
pub struct PathError(pub String);

impl JsonPath {
    /// Parses `$.a.b`, `$['a'].b`, …
    pub fn parse(path: &str) -> Result<Self, PathError> {
        let err = || PathError(path.to_string());
        let mut rest = path.strip_prefix('$').ok_or_else(err)?;
        let mut keys = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("['") {
                let end = r.find("']").ok_or_else(err)?;
                keys.push(r[..end].to_string());
                rest = &r[end + 2..];
            } else if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(['.', '[']).unwrap_or(r.len());
                if end == 0 {
                    return Err(err());
                }
                keys.push(r[..end].to_string());
                rest = &r[end..];
            } else {
                return Err(err());
            }
        }
        if keys.is_empty() {
            return Err(err());
        }
        Ok(JsonPath(keys))
    }

    /// The raw JSON at this path in `data`, if every key is there.
    pub fn find<'a>(&self, data: &'a RawValue) -> Option<&'a RawValue> {
        let mut cur = data;
        for key in &self.0 {
            let obj: HashMap<&str, &'a RawValue> = serde_json::from_str(cur.get()).ok()?;
            cur = obj.get(key.as_str()).copied()?;
        }
        Some(cur)
    }
}

/// What a leaf holds, as the meter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// A JSON string.
    Str(String),
    /// A JSON number, as its exact text.
    Number(String),
    /// `null`, `true`, `false`, an object or an array.
    Other,
}

/// Classifies a raw JSON value.
pub fn leaf(raw: &RawValue) -> Leaf {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text).map_or(Leaf::Other, Leaf::Str),
        Some(b'-' | b'0'..=b'9') => Leaf::Number(text.to_string()),
        _ => Leaf::Other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn parses_and_finds() {
        let p = JsonPath::parse("$.usage.tokens").unwrap();
        let data = raw(r#"{"usage":{"tokens":12345678901234567890.123456789}}"#);
        assert_eq!(
            leaf(p.find(&data).unwrap()),
            Leaf::Number("12345678901234567890.123456789".into())
        );
        let p = JsonPath::parse("$['odd key'].x").unwrap();
        let data = raw(r#"{"odd key":{"x":"gpt"}}"#);
        assert_eq!(leaf(p.find(&data).unwrap()), Leaf::Str("gpt".into()));
        assert!(JsonPath::parse("$").is_err());
        assert!(JsonPath::parse("tokens").is_err());
        assert!(JsonPath::parse("$..x").is_err());
        assert!(JsonPath::parse("$.a").unwrap().find(&raw("[1]")).is_none());
    }
}
