//! The aggregated API server: discovery for `subresources.kubevirt.io/v1`, `/healthz`, and the
//! addvolume/removevolume subresources, over HTTPS (mTLS with the front-proxy client cert).

use crate::context::Ctx;
use crate::hotplug_api::{ApiError, Target, handle};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

pub const GROUP: &str = "subresources.kubevirt.io";
pub const VERSION: &str = "v1";
const MAX_BODY: usize = 1 << 20;

fn json_response(code: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status_response(e: &ApiError) -> Response<Full<Bytes>> {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": e.to_string(), "reason": e.reason(), "code": e.code(),
        }),
    )
}

/// `GET /apis/subresources.kubevirt.io/v1`.
pub fn resource_list() -> serde_json::Value {
    let sub = |name: &str| json!({"name": name, "singularName": "", "namespaced": true, "kind": "", "verbs": ["update"]});
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [
            sub("virtualmachines/addvolume"), sub("virtualmachines/removevolume"),
            sub("virtualmachineinstances/addvolume"), sub("virtualmachineinstances/removevolume"),
        ]
    })
}

fn group() -> serde_json::Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [gv.clone()], "preferredVersion": gv})
}

/// Parsed `/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{resource}/{name}/{sub}`.
pub fn parse_subresource_path(path: &str) -> Option<(Target, String, String, String)> {
    let rest = path.strip_prefix(&format!("/apis/{GROUP}/{VERSION}/namespaces/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [ns, resource, name, sub] = parts.as_slice() else {
        return None;
    };
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    let target = match *resource {
        "virtualmachines" => Target::Vm,
        "virtualmachineinstances" => Target::Vmi,
        _ => return None,
    };
    Some((target, ns.to_string(), name.to_string(), sub.to_string()))
}

async fn route(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    authenticated: bool,
    require_client_cert: bool,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let user = req
        .headers()
        .get("x-remote-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    debug!(%method, %path, %user, "request");
    match (method.clone(), path.as_str()) {
        (Method::GET, "/healthz" | "/readyz" | "/livez") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            return r;
        }
        _ if require_client_cert && !authenticated => {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "a client certificate signed by the front-proxy ca is required", "reason": "Unauthorized", "code": 401}),
            );
        }
        (Method::GET, "/apis") => {
            return json_response(
                StatusCode::OK,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]}),
            );
        }
        (Method::GET, p) if p == format!("/apis/{GROUP}") => {
            return json_response(StatusCode::OK, group());
        }
        (Method::GET, p) if p == format!("/apis/{GROUP}/{VERSION}") => {
            return json_response(StatusCode::OK, resource_list());
        }
        _ => {}
    }
    let Some((target, ns, name, sub)) = parse_subresource_path(&path) else {
        return status_response(&ApiError::NotFound(format!(
            "the server could not find the requested resource ({method} {path})"
        )));
    };
    let add = match sub.as_str() {
        "addvolume" => true,
        "removevolume" => false,
        other => {
            return status_response(&ApiError::NotFound(format!(
                "unknown subresource {other:?}"
            )));
        }
    };
    if method != Method::PUT {
        let mut r = status_response(&ApiError::Injected {
            status: 405,
            message: format!("{method} is not supported on {sub}: use PUT"),
        });
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("PUT"));
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_response(&ApiError::BadRequest(format!(
                "cannot read the request body: {e}"
            )));
        }
    };
    let span = info_span!("subresource", %ns, %name, %sub, kind = ?target, %user);
    match handle(&ctx, target, &ns, &name, add, &body)
        .instrument(span)
        .await
    {
        Ok(()) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
        Err(e) => {
            info!(%ns, %name, %sub, code = e.code(), error = %e, "subresource call refused");
            status_response(&e)
        }
    }
}

/// Serves until the listener fails; each connection runs on its own task.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<Ctx>,
    require_client_cert: bool,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
            };
            let authenticated = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move {
                    Ok::<_, Infallible>(route(req, ctx, authenticated, require_client_cert).await)
                }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = parse_subresource_path(
            "/apis/subresources.kubevirt.io/v1/namespaces/t/virtualmachines/w/addvolume",
        )
        .unwrap();
        assert_eq!(p, (Target::Vm, "t".into(), "w".into(), "addvolume".into()));
        let p = parse_subresource_path(
            "/apis/subresources.kubevirt.io/v1/namespaces/t/virtualmachineinstances/w/removevolume",
        )
        .unwrap();
        assert_eq!(p.0, Target::Vmi);
        assert!(
            parse_subresource_path(
                "/apis/subresources.kubevirt.io/v1/namespaces/t/pods/w/addvolume"
            )
            .is_none()
        );
        assert!(
            parse_subresource_path(
                "/apis/subresources.kubevirt.io/v1/namespaces/t/virtualmachines/w"
            )
            .is_none()
        );
        assert!(
            parse_subresource_path(
                "/apis/subresources.kubevirt.io/v1/namespaces//virtualmachines/w/addvolume"
            )
            .is_none()
        );
    }

    #[test]
    fn discovery_lists_the_four_subresources() {
        let l = resource_list();
        let names: Vec<_> = l["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 4);
        assert!(names.contains(&"virtualmachineinstances/removevolume"));
    }
}
