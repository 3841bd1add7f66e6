//! The one lifecycle of every service: a [`Service`] describes what to serve (its gRPC services, its metrics
//! registry, what drives its readiness, what to stop after draining); [`Service::bind`] binds the gRPC and
//! `/metrics` ports into a [`Bound`], whose addresses are known before anything is served (tests bind port 0);
//! [`Bound::serve`] serves until shutdown, then drains with a timeout.
//!
//! Order on shutdown: readiness turns NOT_SERVING first (load balancers stop sending), the service's drain hook
//! runs (e.g. refuse new work), the server stops accepting and in-flight calls get `server.drain_timeout_seconds`
//! to finish, then the service's stop hook runs (e.g. stop an engine thread once no handler can reach it).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::ServerSettings;
use crate::grpc::{Health, HealthService, READINESS};
use crate::metrics::{Registry, RpcMetrics};
use crate::rpc::RpcLayer;
use crate::shutdown::Shutdown;

/// Any error a service's own task reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What drives a service's health while it serves: given its [`Health`] and the shutdown signal, it runs until
/// it has nothing more to do (it may end early; serving goes on) or fails (an error stops the service).
pub type Watcher = Box<dyn FnOnce(Health, Shutdown) -> BoxFuture<Result<(), BoxError>> + Send>;

/// A [`Watcher`] from an async closure: `watcher(move |health, shutdown| async move { … Ok(()) })`.
pub fn watcher<F, Fut>(watch: F) -> Watcher
where
    F: FnOnce(Health, Shutdown) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Box::new(move |health, shutdown| Box::pin(watch(health, shutdown)))
}

/// Why a service could not bind or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC port could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `/metrics` port could not be bound.
    #[error(transparent)]
    MetricsBind(#[from] crate::metrics::BindError),
    /// The metrics registry could not be created.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS certificate, key or CA could not be read or used.
    #[error("TLS: {0}")]
    Tls(#[from] crate::reload::ReloadError),
    /// The gRPC server failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The service's own task (readiness, model loading) failed.
    #[error("{0}")]
    Task(BoxError),
    /// A task of the service panicked or was cancelled.
    #[error("service task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What to serve: the gRPC services (health and reflection are added here), the metrics registry, the settings
/// of the shared config sections, and the hooks of the lifecycle.
pub struct Service {
    name: &'static str,
    settings: ServerSettings,
    registry: Arc<Registry>,
    routes: tonic::service::Routes,
    health: Health,
    health_service: HealthService,
    watcher: Option<Watcher>,
    on_drain: Option<Box<dyn FnOnce() + Send>>,
    on_stop: Option<BoxFuture<()>>,
    /// The proto packages of the services added: what reflection describes.
    packages: Vec<String>,
    byte_budget: Option<Arc<crate::budget::ByteBudget>>,
    http: Option<(SocketAddr, axum::Router)>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name` (`gateway`, `encoder`, `decoder`) with health (overall and `readiness`); reflection
    /// v1 / v1alpha of the services added is added at [`Service::bind`].
    pub fn new(
        name: &'static str,
        settings: ServerSettings,
        registry: Arc<Registry>,
    ) -> Result<Self, ServeError> {
        let (health, health_service): (Health, HealthService) = Health::detached();
        let routes = tonic::service::Routes::new(health_service.clone());
        Ok(Self {
            name,
            settings,
            registry,
            routes,
            health,
            health_service,
            watcher: None,
            on_drain: None,
            on_stop: None,
            packages: Vec::new(),
            byte_budget: None,
            http: None,
        })
    }

    /// Adds a gRPC service (its message limits set from `grpc.max_message_bytes` by the caller).
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
                Response = http::Response<tonic::body::Body>,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        if let Some((package, _)) = S::NAME.rsplit_once('.') {
            self.packages.push(package.to_string());
        }
        self.routes = self.routes.add_service(service);
        self
    }

    /// What drives readiness while serving (see [`Watcher`]); without one, readiness is SERVING from the start.
    pub fn watch(mut self, watcher: Watcher) -> Self {
        self.watcher = Some(watcher);
        self
    }

    /// Runs once shutdown begins, after readiness turned NOT_SERVING and before the server stops accepting.
    pub fn on_drain(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_drain = Some(Box::new(hook));
        self
    }

    /// Runs after the server has drained (or the drain timeout passed).
    pub fn on_stop(mut self, hook: impl Future<Output = ()> + Send + 'static) -> Self {
        self.on_stop = Some(Box::pin(hook));
        self
    }

    /// Charges every call's request bytes to `budget` (see [`crate::budget`]).
    pub fn byte_budget(mut self, budget: Arc<crate::budget::ByteBudget>) -> Self {
        self.byte_budget = Some(budget);
        self
    }

    /// Also serves `router` over HTTP/1.1 and HTTP/2 on `listen` (the gateway's OpenAI-compatible API): bound
    /// with the gRPC port, drained with it, stopped with it.
    pub fn http(mut self, listen: SocketAddr, router: axum::Router) -> Self {
        self.http = Some((listen, router));
        self
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Binds `server.listen`, `metrics.listen` and the HTTP address if any (falling back to a free port for `/metrics` when
    /// `metrics.fallback_to_free_port` is set and the port is taken).
    pub async fn bind(mut self) -> Result<Bound, ServeError> {
        let (reflection_v1, reflection_v1alpha) = crate::grpc::reflection(&self.packages)?;
        self.routes = std::mem::take(&mut self.routes)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let listen = self.settings.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind {
                address: listen,
                source,
            })?;
        let metrics_listener = match crate::metrics::bind(self.settings.metrics_listen).await {
            Ok(listener) => listener,
            Err(err) if self.settings.metrics_fallback => {
                let any_port = SocketAddr::new(self.settings.metrics_listen.ip(), 0);
                let listener = crate::metrics::bind(any_port).await?;
                tracing::warn!(
                    service = self.name,
                    %err,
                    address = ?listener.local_addr().ok(),
                    "metrics port taken, serving /metrics on a free port"
                );
                listener
            }
            Err(err) => return Err(err.into()),
        };
        let local_addr = address_of(&listener, listen)?;
        let metrics_addr = address_of(&metrics_listener, self.settings.metrics_listen)?;
        let tls = match &self.settings.tls {
            Some(settings) => Some(crate::tls::TlsAcceptor::load(settings)?),
            None => None,
        };
        let health_listener = match self.settings.health_listen {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ServeError::Bind { address, source })?,
            ),
            None => None,
        };
        let health_addr = match &health_listener {
            Some(listener) => Some(address_of(listener, listen)?),
            None => None,
        };
        let http = match &self.http {
            None => None,
            Some((http_listen, _)) => {
                let http_listener =
                    TcpListener::bind(http_listen)
                        .await
                        .map_err(|source| ServeError::Bind {
                            address: *http_listen,
                            source,
                        })?;
                let http_addr = address_of(&http_listener, *http_listen)?;
                Some((http_listener, http_addr))
            }
        };
        Ok(Bound {
            service: self,
            tls,
            health_listener,
            health_addr,
            listener,
            metrics_listener,
            local_addr,
            metrics_addr,
            http,
        })
    }
}

fn address_of(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, ServeError> {
    listener.local_addr().map_err(|source| ServeError::Bind {
        address: asked,
        source,
    })
}

/// A service with its ports bound, not yet serving.
#[derive(Debug)]
pub struct Bound {
    service: Service,
    tls: Option<crate::tls::TlsAcceptor>,
    health_listener: Option<TcpListener>,
    health_addr: Option<SocketAddr>,
    listener: TcpListener,
    metrics_listener: TcpListener,
    local_addr: SocketAddr,
    metrics_addr: SocketAddr,
    http: Option<(TcpListener, SocketAddr)>,
}

impl Bound {
    /// The gRPC address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `GET /metrics` address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The plaintext health-only address (`server.health_listen`), if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Whether the gRPC port speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The HTTP API's address, when the service serves one ([`Service::http`]).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, address)| *address)
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.service.name
    }

    /// Serves until `shutdown` trips (or the watcher fails), then drains: readiness NOT_SERVING, the drain hook,
    /// in-flight calls get the drain timeout, then the stop hook.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), ServeError> {
        let Self {
            mut service,
            tls,
            health_listener,
            health_addr: _,
            listener,
            metrics_listener,
            local_addr,
            metrics_addr,
            http,
        } = self;
        let name = service.name;
        let health = service.health.clone();
        // `""` is liveness: the process works. It stays SERVING through the drain; only readiness drops.
        health.set_status("", true).await;
        health.set_status(READINESS, false).await;
        let metrics_server = tokio::spawn(crate::metrics::serve(
            metrics_listener,
            Arc::clone(&service.registry),
            shutdown.clone(),
        ));
        let watcher_failed = Shutdown::new();
        let (failure_sender, mut failure) = tokio::sync::mpsc::channel::<BoxError>(1);
        let watcher = match service.watcher {
            Some(watcher) => {
                let run = watcher(health.clone(), shutdown.clone());
                let failed = watcher_failed.clone();
                tokio::spawn(async move {
                    if let Err(err) = run.await {
                        let _ = failure_sender.send(err).await;
                        failed.trigger();
                    }
                })
            }
            None => {
                health.set_ready().await;
                tokio::spawn(async move { drop(failure_sender) })
            }
        };
        // The RPC layer continues the caller's trace and meters every call, health and reflection included.
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(service.settings.keepalive_interval)
            .http2_keepalive_timeout(Some(service.settings.keepalive_timeout))
            .max_concurrent_streams(Some(service.settings.max_concurrent_streams))
            .layer(RpcLayer::new(RpcMetrics::new(&service.registry)))
            .layer(crate::budget::ByteBudgetLayer::new(
                service.byte_budget.clone(),
            ));
        let router = builder.add_routes(service.routes);
        let stop_serving = Shutdown::new();
        // The health-only port answers the same statuses; it stops after the main server has drained, so probes
        // see NOT_SERVING throughout the drain.
        let health_stop = Shutdown::new();
        let health_server = health_listener.map(|listener| {
            let router =
                tonic::transport::Server::builder().add_service(service.health_service.clone());
            tokio::spawn(crate::grpc::serve(
                router,
                listener,
                None,
                health_stop.clone(),
            ))
        });
        let tls_mode = match &tls {
            None => "off",
            Some(tls) if tls.is_mutual() => "mutual (client certificates required)",
            Some(_) => "on",
        };
        // The HTTP API is over TLS when the gRPC port is: the same certificates (and client CA), ALPN h2 and
        // http/1.1.
        let http_tls = tls.as_ref().map(|tls| tls.with_alpn(&[b"h2", b"http/1.1"]));
        let serving = stop_serving.clone();
        let mut server = tokio::spawn(async move {
            crate::grpc::serve(router, listener, tls.as_ref(), serving).await
        });
        // The HTTP API stops accepting with the gRPC server and drains within the same timeout.
        let http_server = match (http, service.http.take()) {
            (Some((http_listener, http_addr)), Some((_, http_router))) => {
                tracing::info!(service = name, %http_addr, "serving http");
                let stop = stop_serving.clone();
                Some(tokio::spawn(async move {
                    match http_tls {
                        Some(acceptor) => {
                            let listener = crate::tls::TlsListener::new(http_listener, &acceptor)?;
                            axum::serve(listener, http_router)
                                .with_graceful_shutdown(async move { stop.wait().await })
                                .await
                        }
                        None => {
                            axum::serve(http_listener, http_router)
                                .with_graceful_shutdown(async move { stop.wait().await })
                                .await
                        }
                    }
                }))
            }
            _ => None,
        };
        tracing::info!(service = name, %local_addr, %metrics_addr, tls = tls_mode, "serving");

        let mut server_result = None;
        tokio::select! {
            () = shutdown.wait() => {}
            () = watcher_failed.wait() => {}
            result = &mut server => server_result = Some(result),
        }
        tracing::info!(
            service = name,
            "shutting down: refusing new calls, finishing the ones in flight"
        );
        health.set_not_ready().await;
        if let Some(hook) = service.on_drain {
            hook();
        }
        stop_serving.trigger();
        let served = match server_result {
            Some(result) => result,
            None => match tokio::time::timeout(service.settings.drain_timeout, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        service = name,
                        drain_timeout_seconds = service.settings.drain_timeout.as_secs_f64(),
                        "drain timeout passed, dropping in-flight calls"
                    );
                    server.abort();
                    Ok(Ok(()))
                }
            },
        };
        if let Some(mut http_server) = http_server {
            match tokio::time::timeout(service.settings.drain_timeout, &mut http_server).await {
                Ok(Ok(Err(err))) => tracing::warn!(service = name, %err, "the http server failed"),
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        service = name,
                        "drain timeout passed, dropping http requests"
                    );
                    http_server.abort();
                }
            }
        }
        watcher.abort();
        health_stop.trigger();
        if let Some(health_server) = health_server
            && let Ok(Err(err)) = health_server.await
        {
            tracing::warn!(service = name, %err, "the health server failed");
        }
        if let Some(hook) = service.on_stop {
            hook.await;
        }
        // The metrics server stops with `shutdown`; after a failure it is stopped here.
        metrics_server.abort();
        if let Ok(Err(err)) = metrics_server.await {
            tracing::warn!(service = name, %err, "the metrics server failed");
        }
        tracing::info!(service = name, "stopped");
        if let Ok(err) = failure.try_recv() {
            return Err(ServeError::Task(err));
        }
        served??;
        Ok(())
    }
}
