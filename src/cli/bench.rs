//! `fhecam bench`: encrypted inference measured on test images and checked against the
//! plaintext model, or the output noise of secret-table PBS.

use crate::{load_model, load_split, read_float_accuracy, reference_model};
use anyhow::{bail, Result};
use fhecam::train;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Integer model (JSON); or use --reference.
    #[arg(long, conflicts_with = "reference")]
    pub model: Option<PathBuf>,
    /// Train (or reuse a cached) built-in model for this data set (`digits`).
    #[arg(long)]
    pub reference: Option<String>,
    /// Which built-in model --reference trains.
    #[arg(long, value_enum, default_value = "reference")]
    pub preset: train::Preset,
    /// Test images to run encrypted.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// FHE worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the report as JSON (its last line is one JSON object).
    #[arg(long)]
    pub json: bool,
    /// How each test image enters the encrypted network.
    #[arg(long, value_enum, default_value_t)]
    pub input_mode: super::InputModeArg,
    /// Instead of a model: measure the output noise of N secret-table PBS against N
    /// clear-table PBS (fresh keys, random tables and inputs; docs/DESIGN.md).
    #[arg(long, value_name = "N", conflicts_with_all = ["model", "reference"])]
    pub table_noise: Option<usize>,
}

/// `fhecam bench`: a model's encrypted inferences measured and checked, or the
/// secret-table noise (`--table-noise`).
pub fn run(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        model,
        reference,
        preset,
        samples,
        threads,
        json,
        input_mode,
        table_noise,
    } = a;
    if let Some(n) = table_noise {
        return table_noise_report(n.clamp(2, 1 << 20), json);
    }
    let (m, acc_float) = match (model, reference) {
        (Some(p), _) => (load_model(&p)?, read_float_accuracy(&p)),
        (None, Some(ds)) => reference_model(&ds, preset)?,
        (None, None) => bail!("give --model MODEL or --reference digits"),
    };
    let (_, te) = load_split("digits")?;
    if te.images[0].len() != m.input.len() {
        bail!(
            "model input is {}x{}x{} but the digits images are 1x8x8",
            m.input.channels,
            m.input.height,
            m.input.width
        );
    }
    let r = crate::bench::run(
        &m,
        &te,
        samples,
        threads,
        acc_float,
        json,
        input_mode.into(),
    )?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_bench(&r);
    }
    Ok(())
}

/// `bench --table-noise N`: secret-table PBS output noise against clear tables.
fn table_noise_report(n: usize, json: bool) -> Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(format!("{n} secret-table and {n} clear-table PBS"));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let keys = fhecam::fhe::OwnerKeys::generate();
    // on rayon's global pool: one worker per core
    let r = fhecam::fhe::tables::measure_noise(&keys.client, n)?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} evaluations each: output noise std 2^{:.2} (secret table) vs 2^{:.2} (clear table), variance ratio {:.3}, {} wrong",
            r.evaluations, r.std_log2_secret, r.std_log2_clear, r.variance_ratio, r.wrong
        );
    }
    Ok(())
}

fn print_bench(r: &crate::bench::BenchReport) {
    println!("model               {}", r.model);
    println!("parameters          {} ({} threads)", r.params, r.threads);
    println!(
        "PBS / inference     {} (planned {}), {} ct x ct MACs{}, {} input",
        r.pbs_per_inference,
        r.pbs_planned,
        r.macs_ct_ct,
        r.pbs_per_mac
            .map(|p| format!(", {p:.2} PBS per MAC"))
            .unwrap_or_default(),
        r.input_mode
    );
    println!("one PBS (1 thread)  {:.1} ms median", r.pbs_ms_median);
    println!(
        "latency             {:.2} s median ({:.2}..{:.2}) over {} images",
        r.latency_s_median, r.latency_s_min, r.latency_s_max, r.samples
    );
    println!(
        "PBS bound           {:.2} s -> efficiency {:.2}",
        r.pbs_bound_s, r.efficiency
    );
    println!(
        "agreement           {:.3} (decrypted FHE logits == plaintext integer logits)",
        r.agreement
    );
    println!(
        "accuracy            integer {:.4}, float {}",
        r.accuracy_plain,
        r.accuracy_float
            .map(|a| format!("{a:.4}"))
            .unwrap_or_else(|| "n/a".into())
    );
    println!(
        "output              {} PBS to carry the logits; packed in {:.0} ms; {} B published per inference (envelope included)",
        r.output_stage_pbs, r.pack_ms_median, r.output_payload_bytes
    );
    println!(
        "sizes               input {} B, output {} B, encrypted model {} B, evaluation key {} B compressed (compression key {} B), server key {} B in memory",
        r.input_ciphertext_bytes,
        r.output_ciphertext_bytes,
        r.encrypted_model_bytes,
        r.server_key_bytes,
        r.compression_key_bytes,
        r.server_key_uncompressed_bytes
    );
    println!("peak RSS            {:.0} MB", r.peak_rss_mb);
}
