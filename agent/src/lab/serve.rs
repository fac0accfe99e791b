//! Servers the lab runs inside pods: `http` (200 with a short body on every path) and `echo`
//! (TCP and UDP echo on one port). They run as ordinary processes in the pod's netns and cgroup.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
};

use super::{spec::PodSpec, LabPaths};

pub fn log_name(pod: &PodSpec, port: u16) -> String {
    format!("serve-{}-{}-{port}", pod.namespace, pod.name)
}

pub fn ready_file(paths: &LabPaths, pod: &PodSpec, port: u16) -> PathBuf {
    paths.ready_dir().join(log_name(pod, port))
}

/// The body the http server answers with.
pub fn http_body(pod: &str) -> String {
    format!("hello from {pod}\n")
}

/// Serves until killed. The ready file is written once the port is bound.
pub async fn run(kind: &str, port: u16, pod: String, ready: &Path) -> std::io::Result<()> {
    // `[::]` takes IPv4 and IPv6 (a dual-stack pod); a pod without IPv6 gets `0.0.0.0`.
    let (addr, tcp) = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await
    {
        Ok(l) => (SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), l),
        Err(_) => {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            (addr, TcpListener::bind(addr).await?)
        }
    };
    let udp = if kind == "echo" {
        Some(UdpSocket::bind(addr).await?)
    } else {
        None
    };
    std::fs::write(ready, b"ready\n")?;
    eprintln!("serving {kind} for {pod} on {addr}");
    if let Some(udp) = udp {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                if let Ok((n, from)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(&buf[..n], from).await;
                }
            }
        });
    }
    loop {
        let (stream, _) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if kind == "http" {
            let body = Bytes::from(http_body(&pod));
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        } else {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let mut buf = vec![0u8; 65536];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }
}
