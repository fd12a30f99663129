//! Rendering a service's app for one node: the parameter values of a
//! service file are minijinja templates (LAMA's server control parameters,
//! with RelayFrom as `first_server`). Pure: the same spec and node give the
//! same assignment in the manager and in the simulator.

use super::model::*;

/// The variables a template may use.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RenderCtx {
    /// Node name.
    pub node_name: String,
    /// Node address (its registration's).
    pub node_address: String,
    /// The service's port (`app.port`), if any.
    pub port: Option<u16>,
    /// Service name.
    pub service: String,
    /// App id on the node.
    pub app_id: String,
    /// Backend address of the service's first serving node (itself if none).
    pub first_server: String,
}

/// A template that does not render, named by its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RenderError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong and the fix.
    pub problem: String,
}

/// The app id a service's app has on its nodes.
pub fn app_id(service: &str) -> String {
    format!("{APP_PREFIX}{service}")
}

/// Apps whose id starts with this belong to services; the controller owns
/// them on every node.
pub const APP_PREFIX: &str = "svc-";

fn env() -> minijinja::Environment<'static> {
    let mut e = minijinja::Environment::new();
    e.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    e
}

fn render_one(
    env: &minijinja::Environment<'_>,
    field: &str,
    tpl: &str,
    ctx: &RenderCtx,
) -> Result<String, RenderError> {
    // Most values are plain strings: skip the template engine for them.
    if !tpl.contains("{{") && !tpl.contains("{%") {
        return Ok(tpl.to_string());
    }
    env.render_str(tpl, ctx).map_err(|e| RenderError {
        field: field.to_string(),
        problem: format!(
            "template {tpl:?} does not render: {e}; usable variables: node_name, node_address, port, service, app_id, first_server"
        ),
    })
}

/// Renders the backend address and the app assignment of `spec` for one node.
pub fn render(spec: &ServiceSpec, ctx: &RenderCtx) -> Result<(String, AppAssignment), RenderError> {
    let env = env();
    let backend = render_one(&env, "app.backend", &spec.app.backend, ctx)?;
    let mut params = Params::new();
    for (k, v) in &spec.app.params {
        // A secret is passed as it is: a password holding `{{` or `{#` is
        // no template error, and its value never appears in one.
        let value = if is_secret_param(k) {
            v.clone()
        } else {
            render_one(&env, &format!("app.params.{k}"), v, ctx)?
        };
        params.insert(k.clone(), value);
    }
    check_params(&spec.app.adaptor, &params).map_err(|problem| RenderError {
        field: "app.params".into(),
        problem,
    })?;
    Ok((
        backend,
        AppAssignment {
            id: ctx.app_id.clone(),
            adaptor: spec.app.adaptor.clone(),
            params,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_per_node_with_relay_from() {
        let s: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "radio", "max_nodes": 3,
            "app": {"adaptor": "process", "port": 8000, "params": {
                "command": "icecast",
                "args": "--relay {{ first_server }} --name {{ node_name }}"}},
            "metric": {"kind": "net", "capacity": 100.0},
        }))
        .unwrap();
        let ctx = RenderCtx {
            node_name: "n2".into(),
            node_address: "10.0.0.2".into(),
            port: Some(8000),
            service: "radio".into(),
            app_id: app_id("radio"),
            first_server: "10.0.0.1:8000".into(),
        };
        let (backend, a) = render(&s, &ctx).unwrap();
        assert_eq!(backend, "10.0.0.2:8000");
        assert_eq!(a.id, "svc-radio");
        assert_eq!(a.params["args"], "--relay 10.0.0.1:8000 --name n2");
        assert_eq!(a.params["command"], "icecast");
        let mut bad = s.clone();
        bad.app.backend = "{{ nope }}".into();
        assert_eq!(render(&bad, &ctx).unwrap_err().field, "app.backend");
    }
}
