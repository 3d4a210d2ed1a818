//! Administration: reloading the config file and the OpenAPI document. (The backup download
//! is `backup`.)

use hyper::StatusCode;

use super::error::ApiError;
use super::{ApiState, Resp, json_of};
use crate::subscriptions::ReloadError;

/// The OpenAPI 3 document of the whole API, served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub async fn reload(st: &ApiState) -> Result<Resp, ApiError> {
    match st
        .control
        .reload(&st.sources, &st.auth, st.tls.as_deref())
        .await
    {
        Ok(summary) => {
            // Cluster mode: every other node re-reads its own copy of the file too.
            st.writer.announce_reload().await;
            json_of(StatusCode::OK, &summary)
        }
        Err(ReloadError::Invalid(errs)) => {
            tracing::error!(errors = %errs, "reload refused: the new configuration is invalid; the old one stays in force");
            let list: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
            json_of(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {
                    "code": "invalid_config",
                    "message": format!("the configuration file is invalid; nothing changed: {}", list.join("; ")),
                    "errors": list,
                }}),
            )
        }
        Err(ReloadError::NoFile) => Err(ApiError::conflict(ReloadError::NoFile.to_string())),
        Err(ReloadError::Control(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::routes::table;
    use super::*;

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let doc: Value = match serde_json::from_str(OPENAPI) {
            Ok(d) => d,
            Err(e) => panic!("docs/openapi.json is not JSON: {e}"),
        };
        let Some(paths) = doc["paths"].as_object() else {
            panic!("no paths in docs/openapi.json");
        };
        let routes = table();
        let mut missing = Vec::new();
        for (method, template) in &routes {
            let m = method.as_str().to_ascii_lowercase();
            if paths.get(*template).and_then(|p| p.get(&m)).is_none() {
                missing.push(format!("{method} {template}"));
            }
        }
        assert!(
            missing.is_empty(),
            "docs/openapi.json lacks routes the API answers: {missing:?}"
        );
        let mut extra = Vec::new();
        for (template, ops) in paths {
            for m in ops
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or(Vec::new())
            {
                let known = routes
                    .iter()
                    .any(|(rm, rt)| rt == template && rm.as_str().eq_ignore_ascii_case(m));
                if !known {
                    extra.push(format!("{m} {template}"));
                }
            }
        }
        assert!(
            extra.is_empty(),
            "docs/openapi.json documents routes the API does not answer: {extra:?}"
        );
    }

    #[test]
    fn openapi_references_resolve() {
        fn walk(v: &Value, refs: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        refs.push(r.clone());
                    }
                    m.values().for_each(|c| walk(c, refs));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, refs)),
                _ => {}
            }
        }
        let doc: Value = serde_json::from_str(OPENAPI).unwrap_or(Value::Null);
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let Some(pointer) = r.strip_prefix('#') else {
                panic!("external reference {r}");
            };
            assert!(doc.pointer(pointer).is_some(), "dangling reference {r}");
        }
    }
}
