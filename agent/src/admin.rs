//! admin: the agent's admin API, HTTP/1.1 over a unix socket (so `curl --unix-socket` works),
//! and the client the CLI uses to reach it.

use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

/// Errors serving or calling the admin API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach agent at {path} (is the agent running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin request to {path} failed")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("agent at {path} timed out")]
    Timeout { path: String },
    #[error("agent answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// A request as handlers see it.
pub struct AdminRequest {
    pub method: hyper::Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
}

impl AdminRequest {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type and body.
pub struct AdminResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl AdminResponse {
    pub fn json<T: serde::Serialize>(v: &T) -> Self {
        match serde_json::to_vec(v) {
            Ok(body) => Self {
                status: StatusCode::OK,
                content_type: "application/json",
                body: body.into(),
            },
            Err(e) => Self::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    pub fn text(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "text/plain; version=0.0.4",
            body: body.into(),
        }
    }

    pub fn error(status: StatusCode, message: &str) -> Self {
        let body = serde_json::json!({ "error": message });
        Self {
            status,
            content_type: "application/json",
            body: body.to_string().into(),
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = AdminResponse> + Send>>;

/// What serves the routes.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: AdminRequest) -> BoxFuture;
}

/// Serves the admin API until `shutdown` resolves. Replaces a stale socket file.
pub async fn serve(
    socket: &Path,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let _ = std::fs::remove_file(socket);
    if let Some(parent) = socket.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = UnixListener::bind(socket).map_err(|source| Error::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match body.collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => Bytes::new(),
                    };
                    let query = parts
                        .uri
                        .query()
                        .map(|q| {
                            q.split('&')
                                .filter(|s| !s.is_empty())
                                .map(|kv| {
                                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                                    (percent_decode(k), percent_decode(v))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let r = handler
                        .handle(AdminRequest {
                            method: parts.method,
                            path: parts.uri.path().to_string(),
                            query,
                            body,
                        })
                        .await;
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(r.status)
                            .header("content-type", r.content_type)
                            .body(Full::new(r.body))
                            .expect("static response parts are valid"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query component.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Calls the admin API: `method path` with an optional body; returns the body of a 2xx answer.
pub async fn call(
    socket: &Path,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Bytes, Error> {
    let spath = socket.display().to_string();
    let fut = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::Connect {
                path: spath.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", "veil-agent")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request parts are valid");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::Status {
                status: status.as_u16(),
                body: msg,
            });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Timeout {
            path: spath.clone(),
        })?
}

/// GET and decode JSON.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
) -> Result<T, JsonError> {
    let body = call(
        socket,
        hyper::Method::GET,
        path,
        None,
        Duration::from_secs(10),
    )
    .await?;
    serde_json::from_slice(&body).map_err(JsonError::Decode)
}

/// A call that also decodes JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error(transparent)]
    Call(#[from] Error),
    #[error("agent answered with JSON veil cannot read")]
    Decode(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_codec_round_trips() {
        for s in ["plain", "a b", "shop/frontend", "100%", "x=y&z", "ünï"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("a+b%2Fc"), "a b/c");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("tail%4"), "tail%4");
    }
}
