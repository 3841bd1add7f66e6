//! Starting and serving: load the tokenizer, build the pools, bind, serve the public API with health and
//! reflection until shutdown, then drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kosmos_processor::KosmosTokenizer;
use kosmos_proto::v1::kosmos_server::KosmosServer;
use kosmos_runtime::Shutdown;
use kosmos_runtime::grpc::{Health, READINESS};
use tokio::net::TcpListener;

use crate::cache::EmbeddingCache;
use crate::config::GatewayConfig;
use crate::encode::ImageEncoder;
use crate::error::StartError;
use crate::grpc::KosmosService;
use crate::metrics::GatewayMetrics;
use crate::pool::Pool;
use crate::state::{GatewayState, GatewayStats};
use crate::upstream::{self, ModelInfo, SERVICE_NAME, Upstreams, UpstreamsWriter};

/// A handle on a running gateway's state, for in-process callers (tests, the `kosmos` command).
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    state: Arc<GatewayState>,
}

impl GatewayHandle {
    /// The gateway's load now.
    pub fn stats(&self) -> GatewayStats {
        self.state.stats()
    }

    /// The model, once a decoder described it.
    pub fn model(&self) -> Option<Arc<ModelInfo>> {
        self.state.upstreams.model()
    }

    /// Waits until both pools answer and the model is known, or `timeout`; returns whether it is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.state.upstreams.wait_ready(timeout).await
    }
}

/// A gateway with its tokenizer loaded, its pools built and its port bound, not yet serving.
#[derive(Debug)]
pub struct BoundGateway {
    config: GatewayConfig,
    state: Arc<GatewayState>,
    writer: UpstreamsWriter,
    listener: TcpListener,
    metrics_listener: TcpListener,
}

/// Loads the tokenizer (on a blocking thread), builds the pools and binds the listener.
pub async fn start(config: GatewayConfig) -> Result<BoundGateway, StartError> {
    let dir = config.model_dir.clone();
    let tokenizer = tokio::task::spawn_blocking(move || {
        KosmosTokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|source| StartError::Tokenizer { dir, source })
    })
    .await??;
    let encoder_pool = Pool::new("encoder", config.encoder.clone())?;
    let decoder_pool = Pool::new("decoder", config.decoder.clone())?;
    let (upstreams, writer) = Upstreams::new(encoder_pool.clone(), decoder_pool);
    let cache = Arc::new(EmbeddingCache::new(config.cache_capacity_bytes));
    let encoder = ImageEncoder::new(encoder_pool, cache, config.limits.max_message_bytes.get());
    let metrics = GatewayMetrics::new(&kosmos_runtime::metrics::model_name(&config.model_dir))
        .map_err(|err| StartError::Metrics(err.to_string()))?;
    let state = Arc::new(GatewayState::new(
        Arc::new(tokenizer),
        upstreams,
        encoder,
        config.limits.clone(),
        config.stream_buffer_messages.get(),
        metrics,
    ));
    state.metrics.observe(Arc::downgrade(&state));
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(config.listen).await?;
    let metrics_listener = bind(config.metrics_listen).await?;
    Ok(BoundGateway {
        config,
        state,
        writer,
        listener,
        metrics_listener,
    })
}

/// Starts the gateway and serves it until `shutdown` trips, then drains in-flight calls.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> Result<(), StartError> {
    start(config).await?.serve(shutdown).await
}

impl BoundGateway {
    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        self.listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: self.config.listen,
                source,
            })
    }

    /// The bound address of `GET /metrics`.
    pub fn metrics_addr(&self) -> Result<SocketAddr, StartError> {
        self.metrics_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: self.config.metrics_listen,
                source,
            })
    }

    /// A handle on the gateway's state.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            state: self.state.clone(),
        }
    }

    /// Serves until `shutdown` trips. Health turns SERVING once both pools answer; on shutdown readiness turns
    /// NOT_SERVING first, then in-flight calls get `drain_timeout` to finish.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), StartError> {
        let Self {
            config,
            state,
            writer,
            listener,
            metrics_listener,
        } = self;
        let metrics_server = tokio::spawn(kosmos_runtime::metrics::serve(
            metrics_listener,
            state.metrics.registry().clone(),
            shutdown.clone(),
        ));
        // kosmos_build_info names the model the decoders serve, once they have described it.
        let build_info = {
            let mut changes = state.upstreams.model_changes();
            let registry = state.metrics.registry().clone();
            let name = kosmos_runtime::metrics::model_name(&config.model_dir);
            tokio::spawn(async move {
                loop {
                    let fingerprint = changes
                        .borrow_and_update()
                        .as_ref()
                        .map(|model| model.fingerprint.to_string())
                        .unwrap_or_default();
                    registry.set_model(&name, &fingerprint);
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let (health, health_service) = Health::new().await;
        // Not serving until the probes find both pools (Health::new starts the overall status SERVING).
        health.set_status("", false).await;
        health.set_status(SERVICE_NAME, false).await;
        health.set_status(READINESS, false).await;
        let (reflection_v1, reflection_v1alpha) = kosmos_runtime::grpc::reflection()
            .map_err(|err| StartError::Reflection(err.to_string()))?;
        let watcher = tokio::spawn(upstream::watch(
            state.upstreams.clone(),
            writer,
            state.tokenizer.clone(),
            health,
            shutdown.clone(),
        ));
        let max_message_bytes = config.limits.max_message_bytes.get();
        let rpc_layer = kosmos_runtime::rpc::RpcLayer::new(state.metrics.rpc().clone());
        let kosmos = KosmosServer::new(KosmosService::new(state))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let router = tonic::transport::Server::builder()
            .layer(rpc_layer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(kosmos);
        tracing::info!(addr = ?listener.local_addr().ok(), "gateway serving");
        let result = kosmos_runtime::grpc::serve_with_drain(
            router,
            listener,
            shutdown.clone(),
            config.drain_timeout,
        )
        .await
        .map_err(StartError::from);
        watcher.abort();
        metrics_server.abort();
        build_info.abort();
        tracing::info!("gateway stopped serving");
        result
    }
}
