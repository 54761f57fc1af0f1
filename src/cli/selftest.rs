//! `fhecam selftest`: one command that proves a device can do its job. A frame goes through
//! the daemon's own GStreamer source and OpenCV preprocessing; a tiny random network is
//! encrypted, run on that frame encrypted, and the decrypted logits must equal the plaintext
//! integer reference bit for bit. Every step prints its duration; any failure exits non-zero.

use anyhow::{bail, Context, Result};
use fhecam::edge::source::{self, SourceOptions};
use fhecam::edge::stats::Stats;
use fhecam::fhe::{eval, EdgeRuntime, EncryptedModel, EncryptedOutput, OwnerKeys};
use fhecam::model::Model;
use fhecam::{preprocess, reference, testnet};
use opencv::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A tiny network that still uses every layer kind; fixed so every device runs the same one.
const DEFAULT_SEED: u64 = 1;

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// Seed of the tiny random network (the same seed gives the same network everywhere).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// FHE worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// GStreamer pipeline the test frame is pulled from; it must end in an appsink.
    #[arg(
        long,
        default_value = "videotestsrc num-buffers=1 ! videoconvert ! appsink"
    )]
    pipeline: String,
    /// Seconds to wait for the frame (GStreamer starts slowly on an emulated device).
    #[arg(long, default_value_t = 60)]
    frame_timeout_s: u64,
    /// Corrupts the expected logits so the comparison must fail (tests the failure path).
    #[arg(long, hide = true)]
    inject_mismatch: bool,
}

/// Runs `f`, prints its duration and what it reports; a failure names the step.
fn step<T>(name: &str, f: impl FnOnce() -> Result<(T, String)>) -> Result<T> {
    let t = Instant::now();
    let (value, detail) = f().with_context(|| format!("selftest step `{name}` failed"))?;
    println!("[{:>8.2} s] {name:<10} {detail}", t.elapsed().as_secs_f64());
    Ok(value)
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let start = Instant::now();
    println!(
        "fhecam {} selftest on {}-{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );

    let frame = step("camera", || camera(&args))?;

    let model = step("network", || network(args.seed))?;

    let input = step("preprocess", || {
        let x = preprocess::preprocess(&frame.image, &model.input)?;
        let detail = format!("frame -> model input {x:?} (OpenCV, as the daemon does)");
        Ok((x, detail))
    })?;

    let keys = step("keygen", || {
        Ok((
            OwnerKeys::generate(),
            "throwaway TFHE client key made here for this test only and discarded \
             (deployed cameras never hold a secret key)"
                .to_string(),
        ))
    })?;
    let public = step("server key", || {
        let p = keys.public_material();
        let detail = format!(
            "evaluation key (compressed server key and compression key) {} bytes as shipped in a bundle, and the compact public key",
            p.server_key_bytes()?.len()
        );
        Ok((p, detail))
    })?;

    let encrypted = step("protect", || {
        let enc = EncryptedModel::encrypt(&model, &keys)?;
        // through the wire format, as a camera receives it
        let bytes = enc.to_bytes()?;
        let detail = format!("every weight and bias encrypted, {} bytes", bytes.len());
        Ok((EncryptedModel::from_bytes(&bytes)?, detail))
    })?;

    let runtime = step("load", || {
        let rt = EdgeRuntime::new(&encrypted, public, args.threads)?;
        let detail = format!("server key decompressed, {} FHE thread(s)", rt.threads());
        Ok((rt, detail))
    })?;

    let output = step("infer", || infer(&runtime, &input))?;

    step("check", || {
        check(&output, &keys, &model, &input, args.inject_mismatch)
    })?;

    println!("selftest passed in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// One frame through the daemon's own GStreamer source.
fn camera(args: &SelftestArgs) -> Result<(source::Frame, String)> {
    let opts = SourceOptions {
        pipeline: args.pipeline.clone(),
        // back-pressure: the one frame must not be dropped before it is pulled
        every_frame: true,
        stall_timeout: Duration::from_secs(args.frame_timeout_s),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(1),
    };
    let mut frame = None;
    source::run(
        &opts,
        &Stats::default(),
        &CancellationToken::new(),
        &mut || {},
        &mut |f| {
            frame = Some(f);
            false
        },
    )
    .context(
        "no frame from GStreamer: are gstreamer1.0-plugins-base (videotestsrc, \
         videoconvert, appsink) and its libraries installed?",
    )?;
    let Some(frame) = frame else {
        bail!("pipeline {:?} ended without a frame", args.pipeline);
    };
    let m = &frame.image;
    let detail = format!(
        "{}x{} frame, {} channel(s), from `{}`",
        m.cols(),
        m.rows(),
        m.channels(),
        args.pipeline
    );
    Ok((frame, detail))
}

/// The tiny random network of `seed`, and its plan.
fn network(seed: u64) -> Result<(Model, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = testnet::random_model(&mut rng, testnet::Shape::tiny());
    let (pbs, _) = eval::plan(&m)?;
    let detail = format!(
        "tiny random CNN (seed {}): {} nodes, input {}x{}x{} at {} bit(s), {} PBS planned",
        seed,
        m.nodes.len(),
        m.input.channels,
        m.input.height,
        m.input.width,
        m.input.bits,
        pbs.iter().sum::<u64>()
    );
    Ok((m, detail))
}

/// The frame encrypted with the public key and run; the output through its wire format.
fn infer(runtime: &EdgeRuntime, input: &[u8]) -> Result<(EncryptedOutput, String)> {
    let (out, stats) = runtime.infer(&runtime.encrypt(input))?;
    let planned: u64 = runtime.planned_pbs().iter().sum();
    if stats.pbs != planned {
        bail!("ran {} PBS but {planned} were planned", stats.pbs);
    }
    let detail = format!(
        "input encrypted with the public key, {} PBS in {:.2} s ({:.1} ms wall per PBS)",
        stats.pbs,
        stats.eval_s,
        stats.eval_s * 1e3 / stats.pbs.max(1) as f64
    );
    Ok((EncryptedOutput::from_bytes(&out.to_bytes()?)?, detail))
}

/// The decrypted logits against the plaintext reference, bit for bit.
fn check(
    output: &EncryptedOutput,
    keys: &OwnerKeys,
    model: &Model,
    input: &[u8],
    inject_mismatch: bool,
) -> Result<((), String)> {
    let got = output.decrypt(keys)?;
    let mut want = reference::evaluate(model, input)?;
    if inject_mismatch {
        want[0] += 1;
    }
    let want_label = reference::argmax(&want);
    if got.logits != want || got.label != want_label {
        bail!(
            "decrypted logits {:?} (label {}) differ from the plaintext reference {want:?} \
             (label {want_label}): this device does not compute TFHE correctly; do not \
             deploy it, report the output of `fhecam selftest` with its build",
            got.logits,
            got.label
        );
    }
    let detail = format!(
        "decrypted logits {:?}, label {} == plaintext reference, bit for bit",
        got.logits, got.label
    );
    Ok(((), detail))
}
