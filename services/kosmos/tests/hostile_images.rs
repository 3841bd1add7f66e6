//! The metadata bombs of issue 13 through the public API of a real `kosmos serve` (a child process with the
//! demo model): the 1 GiB iCCP PNG and its zTXt / iTXt / eXIf / WebP EXIF / JPEG ICC cousins, and a request
//! of eight iCCP bombs, are each answered INVALID_ARGUMENT within a second; the process's peak memory (VmHWM)
//! grows by less than 100 MB over its level after a normal request; and it serves a normal request afterwards.

mod common;

use std::time::{Duration, Instant};

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use kosmos_testkit::bombs;

/// The most the peak resident memory may grow while the bombs are refused.
const MAX_PEAK_GROWTH_BYTES: u64 = 100 * 1000 * 1000;
/// A generous bound on one refusal (they take milliseconds); not a performance claim.
const MAX_ANSWER_TIME: Duration = Duration::from_secs(1);

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM line");
    kib * 1024
}

fn image(data: Vec<u8>) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::Image {
            data,
            mime_type: String::new(),
        })),
    }
}

fn request(images: Vec<Vec<u8>>) -> pb::GenerateRequest {
    let mut prompt: Vec<pb::Segment> = images.into_iter().map(image).collect();
    prompt.push(pb::Segment {
        kind: Some(pb::segment::Kind::Text("An image of".into())),
    });
    pb::GenerateRequest {
        prompt,
        params: Some(pb::GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        }),
        grounding: false,
    }
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let picture = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 90])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    match format {
        image::ImageFormat::WebP => {
            use image::ImageEncoder as _;
            image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
                .write_image(&picture, 8, 8, image::ExtendedColorType::Rgb8)
                .expect("webp");
        }
        _ => picture.write_to(&mut bytes, format).expect("encoding"),
    }
    bytes.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_bombs_are_refused_fast_with_bounded_memory_and_the_service_keeps_serving() {
    let (server, address) = common::serve().await;
    let mut client = KosmosClient::connect(address).await.expect("connects");
    let normal = std::fs::read(common::repo().join("models/demo/heldout/images/001.png"))
        .expect("a held-out image");
    // The idle level: after a normal request, so that lazily built state is counted as idle.
    client
        .generate(request(vec![normal.clone()]))
        .await
        .expect("a normal request is served");
    let idle_peak = peak_resident_bytes(server.pid());

    let two_mib = 2 << 20;
    let gib = 1 << 30;
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("PNG iCCP chunk", vec![bombs::png_iccp_bomb(gib)]),
        ("PNG iCCP chunk", vec![bombs::png_iccp_bomb(gib); 8]),
        ("PNG zTXt chunk", vec![bombs::png_ztxt_bomb(gib)]),
        ("PNG iTXt chunk", vec![bombs::png_itxt_bomb(gib)]),
        ("PNG eXIf chunk", vec![bombs::png_with_exif(two_mib)]),
        (
            "WebP EXIF chunk",
            vec![
                bombs::webp_with_chunk(
                    &encoded(image::ImageFormat::WebP),
                    (8, 8),
                    b"EXIF",
                    1 << 30,
                    b"MM\0*",
                )
                .expect("webp"),
            ],
        ),
        (
            "JPEG ICC profile (APP2)",
            vec![
                bombs::jpeg_with_icc_profile(&encoded(image::ImageFormat::Jpeg), two_mib)
                    .expect("jpeg"),
            ],
        ),
    ];
    let mut report = Vec::new();
    for (item, images) in cases {
        let sent_bytes: usize = images.iter().map(Vec::len).sum();
        let started = Instant::now();
        let answer = client.generate(request(images)).await;
        let elapsed = started.elapsed();
        let status = answer.expect_err("a bomb was accepted");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{item}: {}",
            status.message()
        );
        assert!(
            status.message().contains(item) && status.message().contains("`prompt[0].image.data`"),
            "{item}: {}",
            status.message()
        );
        assert!(elapsed < MAX_ANSWER_TIME, "{item}: answered in {elapsed:?}");
        report.push(format!(
            "{item} ({sent_bytes} bytes sent): {:.1} ms",
            elapsed.as_secs_f64() * 1e3
        ));
    }
    let bombs_peak = peak_resident_bytes(server.pid());
    let growth = bombs_peak.saturating_sub(idle_peak);
    println!(
        "peak resident memory: {:.1} MiB idle, {:.1} MiB after the bombs (+{:.1} MiB)\n{}",
        idle_peak as f64 / (1 << 20) as f64,
        bombs_peak as f64 / (1 << 20) as f64,
        growth as f64 / (1 << 20) as f64,
        report.join("\n")
    );
    assert!(
        growth < MAX_PEAK_GROWTH_BYTES,
        "the peak resident memory grew by {growth} bytes refusing the bombs"
    );

    let answer = client
        .generate(request(vec![normal]))
        .await
        .expect("a normal request is served after the bombs")
        .into_inner();
    assert!(!answer.text.trim().is_empty(), "{answer:?}");
}
