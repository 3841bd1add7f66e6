//! The upstream call policy (retries, the status table, overload) and balancing, against fake encoder replicas (in-test servers on free loopback ports). The real
//! services are exercised end to end in `tests/e2e`; fakes are used here only to make replicas fail on purpose.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kosmos_gateway::cache::{ContentHash, EmbeddingCache};
use kosmos_gateway::config::{Discovery, PoolConfig};
use kosmos_gateway::domain::ValidImage;
use kosmos_gateway::encode::ImageEncoder;
use kosmos_gateway::pool::Pool;
use kosmos_gateway::upstream::ModelInfo;
use kosmos_processor::AcceptedFormat;
use kosmos_proto::encoder::v1 as enc;
use kosmos_proto::encoder::v1::vision_encoder_server::{VisionEncoder, VisionEncoderServer};
use kosmos_proto::tensor::v1::{DType, Tensor};
use tonic::{Request, Response, Status};

/// How a fake replica answers Encode.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Healthy,
    Down,
    RefusesTheImage,
    Full,
}

#[derive(Debug)]
struct FakeEncoder {
    behaviour: Behaviour,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl VisionEncoder for FakeEncoder {
    async fn encode(
        &self,
        request: Request<enc::EncodeRequest>,
    ) -> Result<Response<enc::EncodeResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behaviour {
            Behaviour::Down => Err(Status::unavailable("replica is down")),
            Behaviour::RefusesTheImage => Err(Status::invalid_argument("image is corrupt")),
            Behaviour::Full => Err(Status::resource_exhausted("encoder queue full")),
            Behaviour::Healthy => Ok(Response::new(enc::EncodeResponse {
                embeddings: request
                    .into_inner()
                    .images
                    .iter()
                    .map(|_| Tensor {
                        dtype: DType::DtypeF32 as i32,
                        shape: vec![3, 2],
                        data: vec![0; 3 * 2 * 4],
                    })
                    .collect(),
                model_fingerprint: "fp".into(),
                timings: None,
            })),
        }
    }

    async fn info(
        &self,
        _request: Request<enc::InfoRequest>,
    ) -> Result<Response<enc::InfoResponse>, Status> {
        Ok(Response::new(enc::InfoResponse {
            model_fingerprint: "fp".into(),
            ..Default::default()
        }))
    }
}

async fn start_fake(behaviour: Behaviour) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicU64::new(0));
    let service = VisionEncoderServer::new(FakeEncoder {
        behaviour,
        calls: calls.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, calls)
}

fn pool(addrs: &[SocketAddr], max_attempts: u32) -> Pool {
    let config = PoolConfig {
        connect_timeout: Duration::from_secs(1),
        call_timeout: Some(Duration::from_secs(5)),
        max_attempts: NonZeroU32::new(max_attempts).expect("non-zero"),
        ..PoolConfig::with_discovery(Discovery::Static(
            addrs.iter().map(|addr| format!("http://{addr}")).collect(),
        ))
    };
    let pool = Pool::new("encoder", config).expect("pool");
    // What the gateway's probe round records before any call: every fake serves model build "fp" (calls are
    // pinned to the request's build, and a replica not probed yet serves none).
    for replica in pool.replicas().iter() {
        replica.set_fingerprint("fp");
    }
    pool
}

fn model() -> ModelInfo {
    ModelInfo {
        fingerprint: Arc::from("fp"),
        context_length: 512,
        vocab_size: 100,
        num_image_tokens: 3,
        hidden_size: 2,
        image_placeholder_first_id: 4,
        image_placeholder_repeated: false,
        family: Arc::from("kosmos-2"),
        eos_token_id: 2,
    }
}

fn image(seed: u8) -> ValidImage {
    let data = vec![seed; 16];
    ValidImage {
        segment: 0,
        hash: ContentHash::of(&data),
        data: Arc::new(data),
        format: AcceptedFormat::Png,
        width: 1,
        height: 1,
    }
}

#[tokio::test]
async fn an_encode_that_fails_on_one_replica_is_retried_on_another() {
    let (down, down_calls) = start_fake(Behaviour::Down).await;
    let (healthy, healthy_calls) = start_fake(Behaviour::Healthy).await;
    let pool = pool(&[down, healthy], 2);
    let encoder = ImageEncoder::new(pool.clone(), Arc::new(EmbeddingCache::new(0)), 1 << 20);
    // The picker breaks ties between the two fresh replicas at random: encode until the down one has been picked
    // (each image has an even chance; 64 images make missing it impossible in practice), then a few more.
    let mut images: u8 = 0;
    while images < 8 || (down_calls.load(Ordering::SeqCst) == 0 && images < 64) {
        let embeddings = encoder
            .embeddings(&[image(images)], &model(), None, "")
            .await
            .expect("retried");
        assert_eq!(embeddings.tensors.len(), 1);
        images += 1;
    }
    assert_eq!(
        healthy_calls.load(Ordering::SeqCst),
        u64::from(images),
        "every image was encoded by the healthy replica"
    );
    let failed = down_calls.load(Ordering::SeqCst);
    assert!(failed >= 1, "the down replica was tried at least once");
    let stats = pool.stats();
    assert_eq!(stats.retries_total, failed, "each failure was retried");
    assert_eq!((stats.in_flight, stats.pending), (0, 0));
    assert!(
        failed < 8,
        "a failed replica leaves the rotation until it answers again (tried {failed} times)"
    );
}

#[tokio::test]
async fn a_replica_whose_calls_keep_failing_is_ejected_though_its_probe_answers() {
    // The fake's `Info` answers while its `Encode` fails: a half-broken replica (a GPU throwing errors).
    let (sick, sick_calls) = start_fake(Behaviour::Down).await;
    let (healthy, healthy_calls) = start_fake(Behaviour::Healthy).await;
    let pool = pool(&[sick, healthy], 2);
    let encoder = ImageEncoder::new(pool.clone(), Arc::new(EmbeddingCache::new(0)), 1 << 20);
    for seed in 0..40 {
        // What a probe round does between calls: `Info` answered, so both replicas are healthy again.
        for replica in pool.replicas().iter() {
            replica.set_healthy(true);
        }
        encoder
            .embeddings(&[image(seed)], &model(), None, "")
            .await
            .expect("retried on the healthy replica");
    }
    let eject_after = PoolConfig::with_discovery(Discovery::Static(Vec::new()))
        .eject_after_failures
        .expect("ejection is on by default")
        .get();
    assert_eq!(
        sick_calls.load(Ordering::SeqCst),
        u64::from(eject_after),
        "after {eject_after} failures in a row the replica is out of rotation, probes notwithstanding"
    );
    assert_eq!(healthy_calls.load(Ordering::SeqCst), 40);
    let stats = pool.stats();
    assert_eq!((stats.ejected_replicas, stats.ejections_total), (1, 1));
}

#[tokio::test]
async fn a_pool_with_no_replica_of_the_model_waits_then_is_unavailable() {
    let (healthy, healthy_calls) = start_fake(Behaviour::Healthy).await;
    let config = PoolConfig {
        max_wait_for_replica: Duration::from_millis(400),
        ..PoolConfig::with_discovery(Discovery::Static(vec![format!("http://{healthy}")]))
    };
    let pool = Pool::new("encoder", config).expect("pool");
    // Not probed yet: the replica serves no known build, so the call waits for one, then gives up.
    let encoder = ImageEncoder::new(pool.clone(), Arc::new(EmbeddingCache::new(0)), 1 << 20);
    let started = std::time::Instant::now();
    let err = encoder
        .embeddings(&[image(0)], &model(), None, "")
        .await
        .expect_err("no replica of build fp");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.to_string().contains("waited"), "{err}");
    // A probe tells the build while a call waits: the call proceeds.
    let waiting = tokio::spawn({
        let encoder = encoder.clone();
        async move { encoder.embeddings(&[image(1)], &model(), None, "").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((pool.stats().waiting, pool.stats().pending), (1, 1));
    pool.replicas()[0].set_fingerprint("fp");
    waiting
        .await
        .expect("joined")
        .expect("encoded once the replica came");
    assert_eq!(healthy_calls.load(Ordering::SeqCst), 1);
    assert_eq!((pool.stats().waiting, pool.stats().pending), (0, 0));
}

#[tokio::test]
async fn the_images_of_a_request_are_encoded_concurrently_and_deduplicated() {
    let (first, first_calls) = start_fake(Behaviour::Healthy).await;
    let (second, second_calls) = start_fake(Behaviour::Healthy).await;
    let encoder = ImageEncoder::new(
        pool(&[first, second], 1),
        Arc::new(EmbeddingCache::new(1 << 20)),
        1 << 20,
    );
    let images: Vec<ValidImage> = [1, 2, 3, 1, 4, 2].into_iter().map(image).collect();
    let embeddings = encoder
        .embeddings(&images, &model(), None, "")
        .await
        .expect("encoded");
    assert_eq!(embeddings.tensors.len(), 6);
    assert_eq!(
        embeddings.cached, 2,
        "the repeats came from the first copies"
    );
    let calls = first_calls.load(Ordering::SeqCst) + second_calls.load(Ordering::SeqCst);
    assert_eq!(calls, 4, "one call per distinct image");
    encoder
        .embeddings(&images, &model(), None, "")
        .await
        .expect("cached");
    let again = first_calls.load(Ordering::SeqCst) + second_calls.load(Ordering::SeqCst);
    assert_eq!(again, 4, "the cache answered the second request");
}

#[tokio::test]
async fn a_refused_image_is_not_retried_and_names_the_field() {
    let (refusing, refusing_calls) = start_fake(Behaviour::RefusesTheImage).await;
    let (healthy, healthy_calls) = start_fake(Behaviour::Healthy).await;
    let pool = pool(&[refusing, healthy], 2);
    let encoder = ImageEncoder::new(pool, Arc::new(EmbeddingCache::new(0)), 1 << 20);
    let mut refused = 0;
    for seed in 0..6 {
        if let Err(err) = encoder.embeddings(&[image(seed)], &model(), None, "").await {
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().contains("`prompt[0].image.data`"), "{err}");
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        refusing_calls.load(Ordering::SeqCst),
        "each refusal ended its request"
    );
    assert_eq!(
        refused + healthy_calls.load(Ordering::SeqCst),
        6,
        "no image was sent twice"
    );
}

#[tokio::test]
async fn with_every_replica_down_the_pool_is_unavailable() {
    let (a, _) = start_fake(Behaviour::Down).await;
    let (b, _) = start_fake(Behaviour::Down).await;
    let encoder = ImageEncoder::new(pool(&[a, b], 3), Arc::new(EmbeddingCache::new(0)), 1 << 20);
    let err = encoder
        .embeddings(&[image(0)], &model(), None, "")
        .await
        .expect_err("all down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.to_string().contains("encoder pool unavailable"),
        "{err}"
    );
}

#[tokio::test]
async fn with_every_replica_full_the_pool_is_overloaded_and_stays_in_rotation() {
    let (a, a_calls) = start_fake(Behaviour::Full).await;
    let (b, b_calls) = start_fake(Behaviour::Full).await;
    let pool = pool(&[a, b], 3);
    let encoder = ImageEncoder::new(pool.clone(), Arc::new(EmbeddingCache::new(0)), 1 << 20);
    let err = encoder
        .embeddings(&[image(0)], &model(), None, "")
        .await
        .expect_err("all full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("encoder pool overloaded"), "{err}");
    assert_eq!(
        a_calls.load(Ordering::SeqCst) + b_calls.load(Ordering::SeqCst),
        2,
        "each replica was tried once"
    );
    assert_eq!(
        pool.stats().healthy_replicas,
        2,
        "a full replica is not a failed one"
    );
}

#[tokio::test]
async fn a_dns_name_is_resolved_into_replicas() {
    let config = PoolConfig::with_discovery(Discovery::Dns {
        name: "localhost:50999".into(),
        refresh: Duration::from_secs(1),
    });
    let pool = Pool::new("decoder", config).expect("pool");
    assert!(
        pool.replicas().is_empty(),
        "nothing before the first resolution"
    );
    pool.refresh().await;
    let replicas = pool.replicas();
    assert!(!replicas.is_empty());
    assert!(
        replicas
            .iter()
            .all(|replica| replica.address().ends_with(":50999")),
        "{replicas:?}"
    );
}

#[test]
fn reflection_serves_the_public_api() {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(kosmos_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let public = set
        .file
        .iter()
        .find(|file| file.package() == "kosmos.v1")
        .expect("kosmos.v1 is registered");
    let service = public.service.first().expect("a service");
    assert_eq!(service.name(), "Kosmos");
    let methods: Vec<&str> = service.method.iter().map(|method| method.name()).collect();
    assert_eq!(
        methods,
        ["Generate", "GenerateStream", "Score", "GetModelInfo"]
    );
}
