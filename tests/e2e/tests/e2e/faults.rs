//! Faults: replicas killed (SIGKILL) or stopped (SIGTERM) as separate processes while calls are in flight.

use std::path::Path;
use std::time::Duration;

use kosmos_e2e::process::ProcessCluster;
use kosmos_e2e::{fixture_image, image, text, tiny_model_dir};
use kosmos_proto::v1 as pb;

use crate::{IMAGE, greedy_request};

fn caption() -> pb::GenerateRequest {
    greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 12)
}

/// The replica binary this test binary's package builds.
pub fn replica_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kosmos-e2e-replica"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_encoder_restarts_on_its_port_and_serves_again() -> anyhow::Result<()> {
    let model = tiny_model_dir();
    let mut cluster = ProcessCluster::start(replica_binary(), &model, 1, 1, &[], &[]).await?;
    let mut client = cluster.gateway.client().await?;
    let before = client.generate(caption()).await?.into_inner();

    cluster.encoders[0].kill();
    cluster.encoders[0].restart()?;
    cluster.encoders[0]
        .wait_serving("", Duration::from_secs(120))
        .await?;
    // The gateway sees the replica again within a few probe intervals.
    let mut after = None;
    for _ in 0..100 {
        match client.generate(caption()).await {
            Ok(answer) => {
                after = Some(answer.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let after = after.expect("the gateway serves again after the encoder restarted");
    assert_eq!(after.text, before.text);
    Ok(())
}
