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

use std::time::Duration;

use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HyperClient},
    rt::TokioExecutor,
};
use kube::client::{retry::RetryPolicy, Body, ConfigExt as _};
use tower::{retry::RetryLayer, BoxError, ServiceBuilder};

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
    let https = config.rustls_https_connector_with_connector(connector(&config))?;
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
