//! The embedding cache: a repeated image never reaches the encoder pool twice while cached.

use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_proto::encoder::v1 as enc;

use crate::{IMAGE, greedy_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_image_is_encoded_once() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let mut encoder = cluster.encoder(0).await?;
    let encoded = |info: enc::InfoResponse| info.images_encoded;
    let picture = fixture_image(IMAGE);

    let first = client
        .generate(greedy_request(
            vec![image(picture.clone()), text("An image of")],
            4,
        ))
        .await?;
    let after_first = encoded(encoder.info(enc::InfoRequest {}).await?.into_inner());
    let stats = cluster.gateway().stats();
    assert_eq!(
        (stats.cache.hits, stats.cache.misses, stats.cache.entries),
        (0, 1, 1)
    );
    assert_eq!(after_first, 1);

    let second = client
        .generate(greedy_request(
            vec![image(picture.clone()), text("An image of")],
            4,
        ))
        .await?;
    assert_eq!(
        first.into_inner().tokens,
        second.into_inner().tokens,
        "the cached embedding gives the same answer"
    );
    // The same image twice in one request, and again in a Score: still no encoder call.
    client
        .generate(greedy_request(
            vec![image(picture.clone()), text("and"), image(picture.clone())],
            4,
        ))
        .await?;
    client
        .score(kosmos_proto::v1::ScoreRequest {
            prompt: vec![image(picture)],
            candidates: vec!["a gradient".into()],
        })
        .await?;
    let after_repeats = encoded(encoder.info(enc::InfoRequest {}).await?.into_inner());
    assert_eq!(
        after_repeats, after_first,
        "no repeated image reached the encoder"
    );
    let stats = cluster.gateway().stats();
    assert_eq!(stats.cache.misses, 1);
    assert_eq!(stats.cache.hits, 3);
    assert_eq!(stats.encoder.calls_total, 1);

    // A different image is a miss.
    client
        .generate(greedy_request(
            vec![image(fixture_image("e_blocks_64x64.png")), text("x")],
            2,
        ))
        .await?;
    let after_new = encoded(encoder.info(enc::InfoRequest {}).await?.into_inner());
    assert_eq!(after_new, after_first + 1);
    cluster.shutdown().await;
    Ok(())
}
