//! cluster::apiserver: the Kubernetes API client the agent's cluster source uses.
//!
//! kube's own stack (TLS from the kubeconfig, base URI, authentication, extra headers, retry of
//! 429/503/504), over a TCP connector that detects a dead connection: TCP keepalive and
//! `TCP_USER_TIMEOUT`. A watch is a long-lived HTTP/1.1 response on its own connection, and
//! kube sets neither. When a connection dies without a FIN or RST (this node's underlay address
//! removed, so nothing sent from it arrives; an apiserver host gone; a NAT or load balancer
//! that forgot the flow), the watch waits for data that never comes until the watcher's idle
//! timeout (290 s + 5 s): the agent sees no cluster change for five minutes. With the probes
//! below such a connection fails within [`DEAD_AFTER`] and the watcher reconnects (from
//! whatever address the node now has).
//!
//! The commonest of those deaths, this node's own address removed (a renumbering), is known
//! to the kernel at once: every connection the client opens is recorded with its local
//! address, and when the kernel reports an address removed, the connections from an address
//! no interface holds any more are shut down, so their watches fail and reconnect within
//! the watcher's backoff instead of [`DEAD_AFTER`].

use std::{
    collections::HashSet,
    future::Future,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    rt::{Read, ReadBufCursor, Write},
    Uri,
};
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection, HttpConnector},
        Client as HyperClient,
    },
    rt::{TokioExecutor, TokioIo},
};
use kube::client::{retry::RetryPolicy, Body, ConfigExt as _};
use tokio::net::TcpStream;
use tower::{retry::RetryLayer, BoxError, Service, ServiceBuilder};

/// A connection idle this long is probed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Then probed this often.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A connection whose probes or data have gone unacknowledged this long is closed
/// (`TCP_USER_TIMEOUT`, which also bounds a request written into a dead connection; with
/// keepalive it replaces the probe count as the limit).
pub const DEAD_AFTER: Duration = Duration::from_secs(25);

/// The client for `config`: kube's default stack with [`connector`] under it. A kubeconfig
/// naming a proxy keeps kube's own client (its proxy connectors), without the probes.
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if let Some(proxy) = &config.proxy_url {
        tracing::warn!(
            "the kubeconfig names proxy {proxy}: apiserver connections through it are not \
             probed, and a dead one is noticed only at the watch timeout (~5 min)"
        );
        return kube::Client::try_from(config);
    }
    let live = Live::default();
    tokio::spawn(end_orphans_on_address_removal(Arc::downgrade(&live.0)));
    let tracked = Tracked {
        http: connector(&config),
        live,
    };
    let https = config.rustls_https_connector_with_connector(tracked)?;
    let hyper = HyperClient::builder(TokioExecutor::new()).build::<_, Body>(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// TCP to the apiserver, probed: see the module documentation.
fn connector(config: &kube::Config) -> HttpConnector {
    let mut http = HttpConnector::new();
    // The TLS connector above it decides between http and https.
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    http.set_tcp_user_timeout(Some(DEAD_AFTER));
    http
}

/// The client's open connections.
#[derive(Clone, Default)]
struct Live(Arc<Mutex<Vec<Weak<Conn>>>>);

/// One connection: its local address and a duplicate of its socket, valid while held (a
/// shutdown through it ends the connection hyper holds).
struct Conn {
    local: IpAddr,
    socket: OwnedFd,
}

impl Live {
    fn add(&self, conn: &Arc<Conn>) {
        let mut live = self.0.lock().expect("apiserver connections lock");
        live.retain(|c| c.strong_count() > 0);
        live.push(Arc::downgrade(conn));
    }
}

/// Shuts down each connection in `live` whose local address is not in `present`; the
/// addresses of those shut down.
fn end_orphans(live: &Mutex<Vec<Weak<Conn>>>, present: &HashSet<IpAddr>) -> Vec<IpAddr> {
    let open: Vec<Arc<Conn>> = live
        .lock()
        .expect("apiserver connections lock")
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    open.iter()
        .filter(|c| !present.contains(&c.local))
        .filter(|c| {
            nix::sys::socket::shutdown(c.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both)
                .is_ok()
        })
        .map(|c| c.local)
        .collect()
}

/// The addresses this host's interfaces hold now.
fn local_addresses() -> std::io::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// Waits for the kernel's address-removed notices (rtnetlink) and ends the connections left
/// without their address, until the client is dropped. Without the notices (no netlink),
/// such a connection is still noticed through its probes, after [`DEAD_AFTER`].
async fn end_orphans_on_address_removal(live: Weak<Mutex<Vec<Weak<Conn>>>>) {
    let notices = match address_notices() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch this host's addresses: an apiserver connection from a removed address is noticed only through its probes ({DEAD_AFTER:?})");
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(mut ready) = notices.readable().await else {
            return;
        };
        // What changed is not read: the addresses are compared whole, so a lost notice
        // (ENOBUFS) costs nothing.
        loop {
            use nix::errno::Errno;
            let fd = notices.get_ref().as_raw_fd();
            match nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n > 0 => {}
                Err(Errno::ENOBUFS | Errno::EINTR) => {}
                // Drained (EAGAIN).
                _ => break,
            }
        }
        ready.clear_ready();
        let Some(live) = live.upgrade() else {
            return;
        };
        match local_addresses() {
            Ok(present) => {
                for from in end_orphans(&live, &present) {
                    tracing::info!(%from, "apiserver connection closed: its local address left this host; its requests and watches start again from the node's current address");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list this host's addresses"),
        }
    }
}

/// A netlink socket told of every IPv4 and IPv6 address change.
fn address_notices() -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    // SAFETY: the AsyncFd owns `fd` (an OwnedFd: valid, open, the same descriptor for its
    // whole life) and nothing else closes it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// [`HttpConnector`], with each connection it opens recorded in [`Live`].
#[derive(Clone)]
struct Tracked {
    http: HttpConnector,
    live: Live,
}

impl Service<Uri> for Tracked {
    type Response = TrackedStream;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TrackedStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (connecting, live) = (self.http.call(dst), self.live.clone());
        Box::pin(async move {
            let io = connecting.await?;
            let tcp = io.inner();
            let conn = match (tcp.local_addr(), tcp.as_fd().try_clone_to_owned()) {
                (Ok(local), Ok(socket)) => Some(Arc::new(Conn {
                    local: local.ip(),
                    socket,
                })),
                // Out of descriptors: the connection is only probed.
                _ => None,
            };
            if let Some(c) = &conn {
                live.add(c);
            }
            Ok(TrackedStream { io, _conn: conn })
        })
    }
}

/// A connection [`Tracked`] made; recorded while it lives.
struct TrackedStream {
    io: TokioIo<TcpStream>,
    _conn: Option<Arc<Conn>>,
}

impl Connection for TrackedStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// A connection [`Tracked`] opened is recorded while it lives; it is shut down when its
    /// local address is gone, and only then.
    #[tokio::test]
    async fn connections_from_an_address_gone_are_shut_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tracked = Tracked {
            http: HttpConnector::new(),
            live: Live::default(),
        };
        let dst: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        let stream = tracked.call(dst.clone()).await.unwrap();
        let (mut server_end, _) = listener.accept().unwrap();
        let live = tracked.live.0.clone();
        let loopback: HashSet<IpAddr> = ["127.0.0.1".parse().unwrap()].into();
        assert!(end_orphans(&live, &loopback).is_empty());
        assert_eq!(
            end_orphans(&live, &HashSet::new()),
            vec![loopback.iter().next().copied().unwrap()]
        );
        // The server reads the end of the stream: the connection hyper holds is over.
        let mut rest = Vec::new();
        assert_eq!(server_end.read_to_end(&mut rest).unwrap(), 0);
        // A connection dropped is forgotten.
        drop(stream);
        let again = tracked.call(dst).await.unwrap();
        assert_eq!(
            live.lock()
                .unwrap()
                .iter()
                .filter(|c| c.strong_count() > 0)
                .count(),
            1
        );
        assert_eq!(live.lock().unwrap().len(), 1);
        drop(again);
    }
}
