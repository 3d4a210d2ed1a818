//! Payload filters: an optional condition on an event's JSON `data` that a subscription adds
//! to its event type patterns. Parsed once (config load or API call) into a tree that is
//! checked at fan-out. Pure: no I/O.
//!
//! The syntax is the same JSON object in the API and TOML table in the config file:
//!
//! ```text
//! {"all": [F, ...]}   every F holds          {"any": [F, ...]}  at least one F holds
//! {"not": F}          F does not hold
//! {"field": "order.total", OP: OPERAND}      one condition on a field of `data`
//! ```
//!
//! `field` is a dotted path into `data` (`items.0.sku` indexes arrays). OP is one of `eq`,
//! `ne` (true when the field is absent), `in` (a list), `exists` (true/false), `prefix`
//! (strings), `gt`, `gte`, `lt`, `lte` (numbers; a field that is not a number fails them).
//! Numbers compare by value: `1` equals `1.0`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most conditions and groups one filter may hold.
const MAX_NODES: usize = 256;
/// Deepest nesting of groups.
const MAX_DEPTH: usize = 16;
/// Most segments in a field path.
const MAX_PATH: usize = 32;

/// Why a filter was refused, and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// Where the problem is, e.g. `filter.all[1].gte`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for FilterError {}

/// A parsed filter. Compares, prints and serializes as the JSON it was written as.
#[derive(Debug, Clone)]
pub struct Filter {
    source: Value,
    root: Node,
}

#[derive(Debug, Clone)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Cond { path: Vec<String>, op: Op },
}

#[derive(Debug, Clone)]
enum Op {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    Exists(bool),
    Prefix(String),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
}

const OPS: &str = "eq, ne, in, exists, prefix, gt, gte, lt, lte";

impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Filter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Stored records are postcard, which cannot carry a free-form JSON value: text it is.
        s.serialize_str(&self.source.to_string())
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let v: Value = serde_json::from_str(&text).map_err(serde::de::Error::custom)?;
        Filter::parse(&v, "filter").map_err(serde::de::Error::custom)
    }
}

struct Parser {
    nodes: usize,
}

impl Filter {
    /// Parses a filter; `at` names its root in error paths (`filter`,
    /// `subscriptions[2].filter`).
    pub fn parse(v: &Value, at: &str) -> Result<Filter, FilterError> {
        let mut p = Parser { nodes: 0 };
        let root = p.node(v, at, 0)?;
        Ok(Filter {
            source: v.clone(),
            root,
        })
    }

    /// The filter as written.
    pub fn as_json(&self) -> &Value {
        &self.source
    }

    /// Whether an event's data passes the filter.
    pub fn matches(&self, data: &Value) -> bool {
        eval(&self.root, data)
    }
}

fn err(path: &str, message: impl Into<String>) -> FilterError {
    FilterError {
        path: path.to_string(),
        message: message.into(),
    }
}

impl Parser {
    fn node(&mut self, v: &Value, at: &str, depth: usize) -> Result<Node, FilterError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(err(
                at,
                format!("a filter holds at most {MAX_NODES} conditions"),
            ));
        }
        if depth > MAX_DEPTH {
            return Err(err(at, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let Some(obj) = v.as_object() else {
            return Err(err(
                at,
                "expected an object: {\"all\": [...]}, {\"any\": [...]}, {\"not\": {...}} or {\"field\": ..., \"<op>\": ...}",
            ));
        };
        for group in ["all", "any", "not"] {
            if obj.contains_key(group) {
                if obj.len() != 1 {
                    return Err(err(
                        at,
                        format!("\"{group}\" must be the only key of its object"),
                    ));
                }
                let inner = &obj[group];
                let here = format!("{at}.{group}");
                if group == "not" {
                    return Ok(Node::Not(Box::new(self.node(inner, &here, depth + 1)?)));
                }
                let Some(items) = inner.as_array() else {
                    return Err(err(&here, "expected a list of filters"));
                };
                if items.is_empty() {
                    return Err(err(&here, "needs at least one filter"));
                }
                let children = items
                    .iter()
                    .enumerate()
                    .map(|(i, c)| self.node(c, &format!("{here}[{i}]"), depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(if group == "all" {
                    Node::All(children)
                } else {
                    Node::Any(children)
                });
            }
        }
        let Some(field) = obj.get("field") else {
            return Err(err(
                at,
                "expected \"all\", \"any\", \"not\" or a condition with \"field\"",
            ));
        };
        let Some(field) = field.as_str() else {
            return Err(err(&format!("{at}.field"), "must be a string"));
        };
        let path: Vec<String> = field.split('.').map(str::to_string).collect();
        if field.is_empty() || path.iter().any(String::is_empty) || path.len() > MAX_PATH {
            return Err(err(
                &format!("{at}.field"),
                format!(
                    "{field:?} is not a dotted path like \"order.total\" (at most {MAX_PATH} parts)"
                ),
            ));
        }
        let ops: Vec<(&String, &Value)> = obj.iter().filter(|(k, _)| *k != "field").collect();
        let (name, operand) = match ops.as_slice() {
            [one] => *one,
            [] => return Err(err(at, format!("needs one operator: {OPS}"))),
            _ => {
                return Err(err(
                    at,
                    format!(
                        "has {} operators ({}); use one per condition and combine with \"all\"",
                        ops.len(),
                        ops.iter()
                            .map(|(k, _)| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        };
        let here = format!("{at}.{name}");
        let number = |v: &Value| {
            v.as_f64()
                .ok_or_else(|| err(&here, format!("must be a number, got {v}")))
        };
        let op = match name.as_str() {
            "eq" => Op::Eq(operand.clone()),
            "ne" => Op::Ne(operand.clone()),
            "in" => match operand.as_array() {
                Some(list) if !list.is_empty() => Op::In(list.clone()),
                _ => return Err(err(&here, "must be a non-empty list of values")),
            },
            "exists" => match operand.as_bool() {
                Some(b) => Op::Exists(b),
                None => return Err(err(&here, "must be true or false")),
            },
            "prefix" => match operand.as_str() {
                Some(s) => Op::Prefix(s.to_string()),
                None => return Err(err(&here, "must be a string")),
            },
            "gt" => Op::Gt(number(operand)?),
            "gte" => Op::Gte(number(operand)?),
            "lt" => Op::Lt(number(operand)?),
            "lte" => Op::Lte(number(operand)?),
            other => {
                return Err(err(
                    &here,
                    format!("unknown operator {other:?} (expected one of {OPS})"),
                ));
            }
        };
        Ok(Node::Cond { path, op })
    }
}

fn lookup<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = data;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// JSON equality where numbers compare by value.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn eval(n: &Node, data: &Value) -> bool {
    match n {
        Node::All(c) => c.iter().all(|n| eval(n, data)),
        Node::Any(c) => c.iter().any(|n| eval(n, data)),
        Node::Not(c) => !eval(c, data),
        Node::Cond { path, op } => {
            let v = lookup(data, path);
            let num = || v.and_then(Value::as_f64);
            match op {
                Op::Eq(want) => v.is_some_and(|v| json_eq(v, want)),
                Op::Ne(want) => !v.is_some_and(|v| json_eq(v, want)),
                Op::In(list) => v.is_some_and(|v| list.iter().any(|w| json_eq(v, w))),
                Op::Exists(want) => v.is_some() == *want,
                Op::Prefix(p) => v.and_then(Value::as_str).is_some_and(|s| s.starts_with(p)),
                Op::Gt(x) => num().is_some_and(|n| n > *x),
                Op::Gte(x) => num().is_some_and(|n| n >= *x),
                Op::Lt(x) => num().is_some_and(|n| n < *x),
                Op::Lte(x) => num().is_some_and(|n| n <= *x),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(v: Value) -> Filter {
        match Filter::parse(&v, "filter") {
            Ok(f) => f,
            Err(e) => panic!("{v} did not parse: {e}"),
        }
    }

    fn refused(v: Value) -> FilterError {
        match Filter::parse(&v, "filter") {
            Ok(_) => panic!("{v} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn operators() {
        let data = json!({
            "total": 150, "country": "DE", "vip": true, "note": null,
            "customer": {"email": "a@example.com", "tier": 2},
            "items": [{"sku": "X-1"}, {"sku": "Y-2"}]
        });
        let cases = [
            (json!({"field": "country", "eq": "DE"}), true),
            (json!({"field": "country", "eq": "FR"}), false),
            (json!({"field": "total", "eq": 150.0}), true),
            (json!({"field": "country", "ne": "FR"}), true),
            (json!({"field": "country", "ne": "DE"}), false),
            (json!({"field": "missing", "ne": "DE"}), true),
            (json!({"field": "country", "in": ["FR", "DE"]}), true),
            (json!({"field": "country", "in": ["FR", "IT"]}), false),
            (json!({"field": "missing", "in": ["FR"]}), false),
            (json!({"field": "note", "exists": true}), true),
            (json!({"field": "missing", "exists": false}), true),
            (json!({"field": "customer.email", "exists": true}), true),
            (json!({"field": "customer.email", "prefix": "a@"}), true),
            (json!({"field": "customer.email", "prefix": "b@"}), false),
            (json!({"field": "total", "prefix": "1"}), false),
            (json!({"field": "total", "gt": 100}), true),
            (json!({"field": "total", "gt": 150}), false),
            (json!({"field": "total", "gte": 150}), true),
            (json!({"field": "total", "lt": 150}), false),
            (json!({"field": "total", "lte": 150}), true),
            (json!({"field": "country", "gt": 1}), false),
            (json!({"field": "customer.tier", "lt": 3}), true),
            (json!({"field": "items.1.sku", "eq": "Y-2"}), true),
            (json!({"field": "items.2.sku", "exists": true}), false),
            (json!({"field": "items.x", "exists": true}), false),
            (json!({"field": "vip", "eq": true}), true),
        ];
        for (filter, want) in cases {
            assert_eq!(f(filter.clone()).matches(&data), want, "{filter}");
        }
    }

    #[test]
    fn groups() {
        let data = json!({"total": 50, "country": "DE"});
        let all = f(json!({"all": [
            {"field": "country", "eq": "DE"},
            {"field": "total", "gte": 10}
        ]}));
        assert!(all.matches(&data));
        assert!(!all.matches(&json!({"total": 50, "country": "FR"})));
        let any = f(json!({"any": [
            {"field": "country", "eq": "FR"},
            {"all": [{"field": "total", "lt": 100}, {"not": {"field": "country", "eq": "IT"}}]}
        ]}));
        assert!(any.matches(&data));
        assert!(!any.matches(&json!({"total": 500, "country": "DE"})));
        assert!(!any.matches(&json!("not an object")));
    }

    #[test]
    fn errors_name_their_position() {
        let e = refused(json!({"all": [
            {"field": "a", "eq": 1},
            {"field": "b", "gte": "ten"}
        ]}));
        assert_eq!(e.path, "filter.all[1].gte");
        assert!(e.message.contains("number"), "{e}");

        let e = refused(json!({"any": [{"field": "a", "like": "x"}]}));
        assert_eq!(e.path, "filter.any[0].like");
        assert!(e.message.contains("unknown operator"), "{e}");

        assert_eq!(refused(json!({"field": "a"})).path, "filter");
        assert!(
            refused(json!({"field": "a", "eq": 1, "ne": 2}))
                .message
                .contains("2 operators")
        );
        assert_eq!(refused(json!({"all": []})).path, "filter.all");
        assert_eq!(refused(json!({"all": {}})).path, "filter.all");
        assert_eq!(
            refused(json!({"field": "a..b", "eq": 1})).path,
            "filter.field"
        );
        assert_eq!(refused(json!({"field": 3, "eq": 1})).path, "filter.field");
        assert_eq!(refused(json!({"field": "a", "in": []})).path, "filter.in");
        assert_eq!(
            refused(json!({"field": "a", "exists": "yes"})).path,
            "filter.exists"
        );
        assert_eq!(
            refused(json!({"field": "a", "prefix": 1})).path,
            "filter.prefix"
        );
        assert_eq!(refused(json!({"all": [1]})).path, "filter.all[0]");
        assert_eq!(refused(json!({"all": [], "any": []})).path, "filter");
        assert_eq!(refused(json!([1])).path, "filter");
        assert!(refused(json!({"what": 1})).message.contains("expected"));
    }

    #[test]
    fn limits() {
        let mut deep = json!({"field": "a", "eq": 1});
        for _ in 0..(MAX_DEPTH + 1) {
            deep = json!({"not": deep});
        }
        assert!(refused(deep).message.contains("deeper"));
        let wide: Vec<Value> = (0..MAX_NODES)
            .map(|i| json!({"field": "a", "eq": i}))
            .collect();
        assert!(refused(json!({"any": wide})).message.contains("at most"));
    }

    #[test]
    fn round_trips_as_text() {
        let original = f(json!({"field": "a", "in": [1, 2]}));
        let text = match serde_json::to_string(&original) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let back: Filter = match serde_json::from_str(&text) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(back, original);
        assert!(back.matches(&json!({"a": 2})));
    }
}
