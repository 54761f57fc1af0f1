//! `fhecam bench`: encrypted inference on real test images, against the plaintext reference.

use anyhow::{Context, Result};
use fhecam::data::Dataset;
use fhecam::fhe::eval::InputMode;
use fhecam::fhe::{EdgeRuntime, EncryptedModel, FrameInput, OwnerKeys, PARAMS_NAME};
use fhecam::model::Model;
use fhecam::reference;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub params: String,
    pub threads: usize,
    pub samples: usize,
    pub pbs_per_inference: u64,
    pub pbs_planned: u64,
    /// How the frame was fed: `encrypted` (public key) or `device-clear`.
    pub input_mode: &'static str,
    /// PBS per ciphertext × ciphertext multiply-accumulate, all layers included (null for
    /// a secret-table network, which has none).
    pub pbs_per_mac: Option<f64>,
    /// The same count as tfhe's own PBS counter saw it (feature `pbs-stats`).
    pub pbs_counted_by_tfhe: u64,
    pub pbs_per_layer: Vec<u64>,
    pub macs_ct_ct: u64,
    pub pbs_ms_median: f64,
    pub latency_s_median: f64,
    pub latency_s_min: f64,
    pub latency_s_max: f64,
    pub encrypt_ms_median: f64,
    pub pbs_bound_s: f64,
    pub efficiency: f64,
    pub agreement: f64,
    pub accuracy_plain: f64,
    pub accuracy_float: Option<f64>,
    pub accuracy_fhe_samples: f64,
    pub peak_rss_mb: f64,
    pub input_ciphertext_bytes: usize,
    /// The encrypted output (packed digits and layout).
    pub output_ciphertext_bytes: usize,
    /// What a camera publishes per inference: the output in its result envelope, with
    /// device and camera ids of the longest allowed length (64 characters each).
    pub output_payload_bytes: usize,
    /// PBS of the output stage (carrying the logits into digits), part of the total.
    pub output_stage_pbs: u64,
    /// Packing the output digits on the camera, median.
    pub pack_ms_median: f64,
    /// The alternative measured for comparison: tfhe's per-ciphertext
    /// `switch_modulus_and_compress` (no extra key), its bytes and time for as many digits.
    pub modswitch_alternative_bytes: u64,
    pub modswitch_alternative_ms: f64,
    pub encrypted_model_bytes: usize,
    /// The evaluation key a bundle carries: compressed server key and compression key.
    pub server_key_bytes: usize,
    /// Of which the compressed (seeded) compression key.
    pub compression_key_bytes: usize,
    /// The server key as the edge holds it in memory after decompression (bincode size).
    pub server_key_uncompressed_bytes: u64,
    pub public_key_bytes: usize,
    pub keygen_s: f64,
    pub protect_s: f64,
    pub load_s: f64,
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process, from /proc (0 where unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs the benchmark; `test` is the held-out split the accuracies are measured on.
pub fn run(
    model: &Model,
    test: &Dataset,
    samples: usize,
    threads: usize,
    accuracy_float: Option<f64>,
    quiet: bool,
    mode: InputMode,
) -> Result<BenchReport> {
    model.infer().context("model failed validation")?;
    let plain = Plaintext::of(model, test)?;
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    let s = Setup::new(model, threads, &say)?;
    let threads = s.rt.threads();
    let pbs_ms_median = one_pbs_ms(&s);
    let mut r = infer_samples(&s, test, &plain, samples, quiet, mode)?;
    let pbs_planned: u64 = s.rt.planned_pbs_in(mode)?.iter().sum();
    let (modswitch_alternative_bytes, modswitch_alternative_ms) =
        modswitch_alternative(&s, r.digits);
    let latency_s_median = median(&mut r.lat.clone());
    let pbs = r.pbs;
    let pbs_bound_s = pbs as f64 * pbs_ms_median / threads as f64 / 1000.0;
    let n = r.n;
    Ok(BenchReport {
        model: model.name.clone(),
        params: PARAMS_NAME.into(),
        threads,
        samples: n,
        pbs_per_inference: pbs,
        pbs_planned,
        input_mode: mode.name(),
        pbs_per_mac: Some(model.macs()?)
            .filter(|&m| m > 0)
            .map(|m| pbs as f64 / m as f64),
        pbs_counted_by_tfhe: r.pbs_tfhe,
        pbs_per_layer: r.pbs_per_layer.clone(),
        macs_ct_ct: model.macs()?,
        pbs_ms_median,
        latency_s_median,
        latency_s_min: r.lat.iter().cloned().fold(f64::INFINITY, f64::min),
        latency_s_max: r.lat.iter().cloned().fold(0.0, f64::max),
        encrypt_ms_median: median(&mut r.enc_ms),
        pbs_bound_s,
        efficiency: pbs_bound_s / latency_s_median,
        agreement: r.agree as f64 / n.max(1) as f64,
        accuracy_plain: plain.accuracy,
        accuracy_float,
        accuracy_fhe_samples: r.fhe_correct as f64 / n.max(1) as f64,
        peak_rss_mb: peak_rss_mb(),
        input_ciphertext_bytes: r.in_bytes,
        output_ciphertext_bytes: r.out_bytes,
        output_payload_bytes: r.payload_bytes,
        output_stage_pbs: r.pbs_per_layer.last().copied().unwrap_or(0),
        pack_ms_median: median(&mut r.pack_ms),
        modswitch_alternative_bytes,
        modswitch_alternative_ms,
        encrypted_model_bytes: s.encrypted_model_bytes,
        server_key_bytes: s.server_key_bytes,
        compression_key_bytes: s.compression_key_bytes,
        server_key_uncompressed_bytes: s.server_key_uncompressed_bytes,
        public_key_bytes: s.public_key_bytes,
        keygen_s: s.keygen_s,
        protect_s: s.protect_s,
        load_s: s.load_s,
    })
}

/// The plaintext reference on every test image: what the encrypted runs must agree with.
struct Plaintext {
    inputs: Vec<Vec<u8>>,
    logits: Vec<Vec<i64>>,
    accuracy: f64,
}

impl Plaintext {
    fn of(model: &Model, test: &Dataset) -> Result<Self> {
        let inputs: Vec<Vec<u8>> = test
            .images
            .iter()
            .map(|im| model.input.quantize(im))
            .collect();
        let mut correct = 0usize;
        let mut logits = Vec::with_capacity(inputs.len());
        for (x, &y) in inputs.iter().zip(&test.labels) {
            let l = reference::evaluate(model, x)?;
            correct += (reference::argmax(&l) == y as usize) as usize;
            logits.push(l);
        }
        let accuracy = correct as f64 / inputs.len() as f64;
        Ok(Plaintext {
            inputs,
            logits,
            accuracy,
        })
    }
}

/// The owner's side done once: keys, the encrypted model, the camera's runtime, with their
/// sizes and times.
struct Setup {
    keys: OwnerKeys,
    rt: EdgeRuntime,
    keygen_s: f64,
    protect_s: f64,
    load_s: f64,
    encrypted_model_bytes: usize,
    server_key_bytes: usize,
    compression_key_bytes: usize,
    server_key_uncompressed_bytes: u64,
    public_key_bytes: usize,
}

impl Setup {
    fn new(model: &Model, threads: usize, say: &dyn Fn(&str)) -> Result<Self> {
        say("generating keys (client, compact public, compressed server, compression)...");
        let t = Instant::now();
        let keys = OwnerKeys::generate();
        let public = keys.public_material();
        let keygen_s = t.elapsed().as_secs_f64();
        let server_key_bytes = public.server_key_bytes()?.len();
        let compression_key_bytes = fhecam::fhe::to_safe_bytes(
            &public.compression_key,
            fhecam::fhe::limits::COMPRESSION_KEY,
        )?
        .len();
        let public_key_bytes = public.public_key_bytes()?.len();

        say("encrypting every weight and bias...");
        let t = Instant::now();
        let enc = EncryptedModel::encrypt(model, &keys)?;
        let bytes = enc.to_bytes()?;
        let protect_s = t.elapsed().as_secs_f64();
        let enc = EncryptedModel::from_bytes(&bytes)?;

        let t = Instant::now();
        let rt = EdgeRuntime::new(&enc, public, threads)?;
        let load_s = t.elapsed().as_secs_f64();
        let server_key_uncompressed_bytes = bincode::serialized_size(rt.server_key()).unwrap_or(0);
        Ok(Setup {
            keys,
            rt,
            keygen_s,
            protect_s,
            load_s,
            encrypted_model_bytes: bytes.len(),
            server_key_bytes,
            compression_key_bytes,
            server_key_uncompressed_bytes,
            public_key_bytes,
        })
    }
}

/// One PBS on one FHE worker (median of 16), measured on the runtime's own pool so the
/// PBS bound compares like with like.
fn one_pbs_ms(s: &Setup) -> f64 {
    s.rt.install(|| {
        let sk = s.rt.server_key();
        fhecam::fhe::entropy::seed_thread();
        let ct = s.keys.client.encrypt(1);
        let lut = sk.generate_lookup_table(|x| (x * 3) % 16);
        let mut ms: Vec<f64> = (0..16)
            .map(|_| {
                let t = Instant::now();
                let _ = sk.apply_lookup_table(&ct, &lut);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        median(&mut ms)
    })
}

/// What the encrypted inferences measured: per image times, agreement, sizes of the last.
#[derive(Default)]
struct Runs {
    n: usize,
    lat: Vec<f64>,
    enc_ms: Vec<f64>,
    agree: usize,
    fhe_correct: usize,
    pbs: u64,
    pbs_tfhe: u64,
    pbs_per_layer: Vec<u64>,
    in_bytes: usize,
    out_bytes: usize,
    payload_bytes: usize,
    pack_ms: Vec<f64>,
    digits: usize,
}

/// Runs the first `samples` test images encrypted, each decrypted and compared with the
/// plaintext logits.
fn infer_samples(
    s: &Setup,
    test: &Dataset,
    plain: &Plaintext,
    samples: usize,
    quiet: bool,
    mode: InputMode,
) -> Result<Runs> {
    let n = samples.min(plain.inputs.len());
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} encrypted inferences, {msg}").unwrap(),
    );
    let mut r = Runs {
        n,
        ..Runs::default()
    };
    for i in 0..n {
        let t = Instant::now();
        let input = s.rt.frame_input(mode, &plain.inputs[i]);
        r.enc_ms.push(t.elapsed().as_secs_f64() * 1e3);
        r.in_bytes = match &input {
            FrameInput::Encrypted(e) => e.to_bytes()?.len(),
            FrameInput::Clear(_) => 0,
        };
        let t = Instant::now();
        let tfhe_before = tfhe::shortint::server_key::get_pbs_count();
        let (out, stats) = s.rt.infer_watched(
            input.as_frame(),
            std::time::Duration::from_millis(500),
            &|d, p| pb.set_message(format!("image {}: {d}/{p} PBS", i + 1)),
        )?;
        r.pbs_tfhe = tfhe::shortint::server_key::get_pbs_count() - tfhe_before;
        r.lat.push(t.elapsed().as_secs_f64());
        let out_file = out.to_bytes()?;
        r.out_bytes = out_file.len();
        r.digits = out.layout.ciphertexts();
        r.payload_bytes = payload_bytes(i as u64, out_file)?;
        r.pack_ms.push(stats.pack_s * 1e3);
        let got = out.decrypt(&s.keys)?;
        r.agree += (got.logits == plain.logits[i]) as usize;
        r.fhe_correct += (got.label == test.labels[i] as usize) as usize;
        r.pbs = stats.pbs;
        r.pbs_per_layer = stats.pbs_per_node;
        pb.set_message(format!("last {:.1} s", r.lat.last().unwrap()));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(r)
}

/// What a camera publishes for this output: its envelope, with ids of the longest allowed
/// length.
fn payload_bytes(sequence: u64, ciphertext: Vec<u8>) -> Result<usize> {
    use fhecam::wire::envelope::{encode, Envelope, MAX_ID_LEN};
    Ok(encode(&Envelope {
        device_id: "d".repeat(MAX_ID_LEN),
        camera_id: "c".repeat(MAX_ID_LEN),
        model_id: fhecam::ids::ModelId([0; 16]),
        model_version: 1,
        sequence,
        epoch: 1,
        frame_timestamp_ms: 0,
        ciphertext,
    })?
    .len())
}

/// The alternative to packing: tfhe's per-ciphertext `switch_modulus_and_compress` for
/// as many digits, its bytes and time.
fn modswitch_alternative(s: &Setup, digits: usize) -> (u64, f64) {
    s.rt.install(|| {
        fhecam::fhe::entropy::seed_thread();
        let ct = s.keys.client.encrypt(1);
        let t = Instant::now();
        let c = s.rt.server_key().switch_modulus_and_compress(&ct);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let bytes = bincode::serialized_size(&c).unwrap_or(0);
        (bytes * digits as u64, ms * digits as f64)
    })
}
