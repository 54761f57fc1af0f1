//! The owner's side: signing key, protected-model database, signed bundles, and the edge
//! commands that use them from files (`infer`) and back (`decrypt`).

use anyhow::{bail, Context, Result};
use fhecam::bundle;
use fhecam::fhe::EdgeRuntime;
use fhecam::ids::{rfc3339, ModelId};
use fhecam::preprocess;
use fhecam::secret::{KdfParams, Passphrase};
use fhecam::store::{self, Store};
use fhecam::wire::envelope::{self, Envelope};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SIGNING_KEY_FILE: &str = "owner.key";
const PUBLIC_KEY_FILE: &str = "owner.pub";

#[derive(clap::Subcommand)]
pub enum OwnerCmd {
    /// The owner's Ed25519 key pair: the secret half signs deployment bundles, the public
    /// half (owner.pub) is installed on every edge device to verify them.
    OwnerKey {
        #[command(subcommand)]
        cmd: OwnerKeyCmd,
    },
    /// Generate fresh FHE keys, encrypt every weight and bias of a model and store it as a
    /// new version in the owner database (the secret key sealed under the passphrase).
    /// Prints the new model id on stdout.
    Protect {
        /// Integer model (JSON), as written by `fhecam train`.
        model: PathBuf,
        /// Owner database (SQLite; created with mode 0600 if missing).
        #[arg(long, default_value = "owner.db")]
        db: PathBuf,
        /// Model name; versions are numbered per name (default: the model's own name).
        #[arg(long)]
        name: Option<String>,
        /// File holding the passphrase that seals the secret key (default: the
        /// FHECAM_OWNER_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Secret-table models: publish the tables of the layers that read the frame (for
        /// the built-in tables preset, the pixel thresholds) with the bundle. Cameras with
        /// `input_mode = "device-clear"` then evaluate them in the clear and pick the next
        /// layer's entries without any PBS; every camera can read those tables.
        #[arg(long)]
        publish_frame_tables: bool,
    },
    /// List the protected model versions in the owner database.
    Models {
        /// Owner database.
        #[arg(long, default_value = "owner.db")]
        db: PathBuf,
        /// One JSON object per model version instead of a table.
        #[arg(long)]
        json: bool,
        /// With --broker: also list which cameras report running each version (from
        /// their retained status, see `fhecam fleet`).
        #[command(flatten)]
        fleet: super::fleet::BrokerArgs,
    },
    /// Write a signed deployment bundle of one model version: encrypted model, public key
    /// and compressed server key. Nothing secret is inside.
    Deploy {
        /// Owner database.
        #[arg(long, default_value = "owner.db")]
        db: PathBuf,
        /// Model id (32 hex digits, from `fhecam protect` or `fhecam models`).
        #[arg(long)]
        model: ModelId,
        /// The owner's Ed25519 signing key (from `fhecam owner-key init`).
        #[arg(long)]
        signing_key: PathBuf,
        /// Where to write the bundle (optional with --push).
        #[arg(long, required_unless_present = "push")]
        out: Option<PathBuf>,
        /// Also publish the bundle to running cameras over MQTT (retained, QoS 1): they
        /// check it and switch at a frame boundary without restarting (needs --broker and
        /// --devices or --all).
        #[arg(long, requires = "broker")]
        push: bool,
        /// With --push: the devices (device_id of their edge.toml) to push to.
        #[arg(long, value_delimiter = ',', conflicts_with = "all", requires = "push")]
        devices: Vec<String>,
        /// With --push: every camera listening on the broker.
        #[arg(long, requires = "push")]
        all: bool,
        /// With --push: how long to wait for the broker's acknowledgements (1–86400 s).
        #[arg(long, default_value_t = 600.0)]
        push_timeout_s: f64,
        /// With --push: then wait up to this long (1–86400 s) until every targeted camera
        /// reports running this version (exit 1 naming those that do not, and why if they
        /// refused it). With --all, the cameras online when the push went out.
        #[arg(long, requires = "push")]
        confirm_s: Option<f64>,
        #[command(flatten)]
        fleet: super::fleet::BrokerArgs,
    },
    /// Check a bundle as an edge device does: size, format, the owner's signature, then the
    /// conformance of every key and ciphertext with fhecam's TFHE parameters.
    VerifyBundle {
        /// The bundle file.
        bundle: PathBuf,
        /// The owner's public key (owner.pub).
        #[arg(long)]
        owner_key: PathBuf,
    },
    /// Run the encrypted model of a verified bundle on image files, as a camera would:
    /// each image is preprocessed, encrypted with the bundle's public key and evaluated;
    /// one result envelope per image is written to --out as <image name>.fhe.
    Infer {
        /// The bundle file.
        #[arg(long)]
        bundle: PathBuf,
        /// The owner's public key (owner.pub).
        #[arg(long)]
        owner_key: PathBuf,
        /// Images (any format OpenCV decodes); converted to the model's channels, resized to
        /// its input size.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Directory for the result envelopes.
        #[arg(long)]
        out: PathBuf,
        /// Device id written in each envelope (A-Z a-z 0-9 . _ : -).
        #[arg(long, default_value = "local")]
        device_id: String,
        /// Camera id written in each envelope.
        #[arg(long, default_value = "file")]
        camera_id: String,
        /// FHE worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// How the image enters the encrypted network.
        #[arg(long, value_enum, default_value_t)]
        input_mode: super::InputModeArg,
    },
    /// Decrypt result envelopes with the secret key from the owner database and print the
    /// label (argmax of the logits).
    Decrypt {
        /// Owner database.
        #[arg(long, default_value = "owner.db")]
        db: PathBuf,
        /// Result envelopes (.fhe files from `fhecam infer`).
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Print the logits too.
        #[arg(long)]
        logits: bool,
        /// One JSON object per result instead of text.
        #[arg(long)]
        json: bool,
        /// File holding the passphrase (default: the FHECAM_OWNER_PASSPHRASE environment
        /// variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand)]
pub enum OwnerKeyCmd {
    /// Create a new key pair: DIR/owner.key (secret, mode 0600) and DIR/owner.pub (public,
    /// hex). Refuses to overwrite existing keys.
    Init {
        /// Directory for the key files (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: OwnerCmd) -> Result<()> {
    match cmd {
        OwnerCmd::OwnerKey {
            cmd: OwnerKeyCmd::Init { out },
        } => owner_key_init(&out),
        OwnerCmd::Protect {
            model,
            db,
            name,
            passphrase_file,
            publish_frame_tables,
        } => protect(
            &model,
            &db,
            name,
            passphrase_file.as_deref(),
            publish_frame_tables,
        )
        .map(|_| ()),
        OwnerCmd::Models { db, json, fleet } => models(&db, json, &fleet),
        OwnerCmd::Deploy {
            db,
            model,
            signing_key,
            out,
            push,
            devices,
            all,
            push_timeout_s,
            confirm_s,
            fleet,
        } => {
            let push = push
                .then(|| push_target(&fleet, &devices, all, push_timeout_s, confirm_s))
                .transpose()?;
            deploy(&db, &model, &signing_key, out.as_deref(), push.as_ref())
        }
        OwnerCmd::VerifyBundle { bundle, owner_key } => verify_bundle(&bundle, &owner_key),
        OwnerCmd::Infer {
            bundle,
            owner_key,
            images,
            out,
            device_id,
            camera_id,
            threads,
            input_mode,
        } => infer(
            &bundle,
            &owner_key,
            &images,
            &out,
            (&device_id, &camera_id),
            threads,
            input_mode.into(),
        ),
        OwnerCmd::Decrypt {
            db,
            results,
            logits,
            json,
            passphrase_file,
        } => decrypt(&db, &results, logits, json, passphrase_file.as_deref()),
    }
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("static template"),
    );
    pb.set_message(msg.to_string());
    // Ticks from its own thread: keygen blocks this one for seconds.
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A progress bar over the PBS of one encrypted inference (hidden when stderr is not a
/// terminal, as indicatif does).
pub(crate) fn pbs_bar(planned: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(planned);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} PBS {msg} ({elapsed}, about {eta} left)",
        )
        .expect("static template"),
    );
    pb.set_message(what.to_string());
    pb
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn passphrase(file: Option<&Path>) -> Result<Passphrase> {
    Ok(fhecam::secret::load_passphrase(file)?)
}

/// Creates `path` with `mode` (never over an existing file), writes `bytes`, and sets the
/// mode again in case the umask narrowed it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Writes a file through a temporary name in the same directory, so a reader never sees a
/// half-written bundle or envelope.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fhecam::files::write_atomic(path, bytes, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn owner_key_init(dir: &Path) -> Result<()> {
    let sk_path = dir.join(SIGNING_KEY_FILE);
    let pk_path = dir.join(PUBLIC_KEY_FILE);
    for p in [&sk_path, &pk_path] {
        if p.exists() {
            bail!("{} exists: refusing to overwrite an owner key", p.display());
        }
    }
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let vk = sk.verifying_key();
    let mut secret_hex = zeroize::Zeroizing::new(hex::encode(sk.to_bytes()));
    secret_hex.push('\n');
    write_new(&sk_path, secret_hex.as_bytes(), 0o600)?;
    write_new(
        &pk_path,
        format!("{}\n", hex::encode(vk.as_bytes())).as_bytes(),
        0o644,
    )?;
    println!(
        "owner key {}: {} (secret, mode 0600), {} (public: install it on the edge devices)",
        bundle::key_id(&vk),
        sk_path.display(),
        pk_path.display()
    );
    Ok(())
}

/// Protects a model into the database; returns its id (also printed on stdout).
pub(crate) fn protect(
    model_path: &Path,
    db: &Path,
    name: Option<String>,
    pass_file: Option<&Path>,
    publish_frame_tables: bool,
) -> Result<ModelId> {
    let mut model = crate::load_model(model_path)?;
    if publish_frame_tables && fhecam::layer::lut::publish_frame_tables(&mut model) == 0 {
        anyhow::bail!(
            "--publish-frame-tables: {} has no secret-table (lut) layer reading the frame; protect it without the flag",
            model_path.display()
        );
    }
    let name = name.unwrap_or_else(|| model.name.clone());
    store::validate_name(&name)?;
    // Everything that can fail cheaply fails before seconds of key generation.
    let pass = passphrase(pass_file)?;
    let mut store = Store::create_or_open(db)?;

    if fhecam::fhe::entropy::hardware_seed_repeats() == Some(true) {
        tracing::warn!(
            "this CPU's RDSEED returned the same value twice: fhecam seeds its keys from the operating system, but other software on this machine that trusts RDSEED is at risk"
        );
    }
    let mut pb: Option<indicatif::ProgressBar> = None;
    let p = fhecam_owner::protect::protect(
        &model,
        &name,
        &mut store,
        &pass,
        KdfParams::default(),
        &mut |step| {
            use fhecam_owner::protect::Step;
            if let Some(pb) = pb.take() {
                pb.finish_and_clear();
            }
            pb = Some(spinner(match step {
                Step::Keys => {
                    "generating FHE keys (client, compact public, compressed server, compression)"
                }
                Step::Encrypt => "encrypting every weight and bias",
                Step::SealAndStore => {
                    "sealing the secret key (Argon2id + XChaCha20-Poly1305) and storing"
                }
            }));
        },
    );
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let p = p?;
    eprintln!(
        "protected {name} version {} in {}: {} encrypted parameters and {} secret tables ({}), public key {}, evaluation key {} (compressed server key and compression key), secret keys sealed ({} B)",
        p.version,
        db.display(),
        p.ciphertexts,
        p.tables,
        mb(p.encrypted_model_bytes as u64),
        mb(p.public_key_bytes as u64),
        mb(p.evaluation_key_bytes as u64),
        p.sealed_key_bytes
    );
    eprintln!(
        "times: keygen {:.1} s, encryption {:.1} s, sealing+storing {:.1} s",
        p.keygen_s, p.encrypt_s, p.store_s
    );
    let id = p.id;
    println!("{id}");
    Ok(id)
}

fn models(db: &Path, json: bool, fleet: &super::fleet::BrokerArgs) -> Result<()> {
    let store = Store::open(db)?;
    let list = store.list()?;
    // model id -> "device/camera" of the cameras that report running it
    let running: Option<std::collections::BTreeMap<String, Vec<String>>> = match &fleet.broker {
        None => None,
        Some(_) => {
            let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
            for c in super::fleet::collect(fleet, std::time::Duration::from_secs(2))? {
                if let Some(id) = c.model_id {
                    m.entry(id)
                        .or_default()
                        .push(format!("{}/{}", c.device_id, c.camera_id));
                }
            }
            Some(m)
        }
    };
    let cams = |id: &ModelId| {
        running
            .as_ref()
            .map(|r| r.get(&id.to_string()).cloned().unwrap_or_default())
    };
    if json {
        for m in &list {
            let mut v = serde_json::to_value(m)?;
            if let Some(c) = cams(&m.id) {
                v["cameras"] = serde_json::json!(c);
            }
            println!("{v}");
        }
        return Ok(());
    }
    if list.is_empty() {
        println!("no models in {}", db.display());
        return Ok(());
    }
    println!(
        "{:<32}  {:<20} {:>3}  {:<20}  {:>8} {:>10} {:>10} {:>10}{}",
        "id",
        "name",
        "ver",
        "created",
        "input",
        "params",
        "pubkey",
        "serverkey",
        if running.is_some() { "  cameras" } else { "" }
    );
    for m in &list {
        println!(
            "{:<32}  {:<20} {:>3}  {:<20}  {:>8} {:>10} {:>10} {:>10}{}",
            m.id,
            m.name,
            m.version,
            rfc3339(m.created_unix),
            format!("{}x{}x{}", m.input.channels, m.input.height, m.input.width),
            m.encrypted_model_bytes,
            m.public_key_bytes,
            m.server_key_bytes,
            cams(&m.id)
                .map(|c| format!("  {}", c.len()))
                .unwrap_or_default()
        );
    }
    if let Some(r) = &running {
        for (id, c) in r {
            let known = list.iter().any(|m| m.id.to_string() == *id);
            println!(
                "{} running {}: {}",
                if known {
                    "  "
                } else {
                    "  (not in this database)"
                },
                id,
                c.join(", ")
            );
        }
    }
    Ok(())
}

/// Where `deploy --push` publishes.
pub(crate) struct PushTarget {
    broker: super::fleet::BrokerArgs,
    topics: Vec<String>,
    timeout: std::time::Duration,
    /// The devices pushed to (`None`: all).
    devices: Option<Vec<String>>,
    confirm: Option<std::time::Duration>,
}

fn push_target(
    b: &super::fleet::BrokerArgs,
    devices: &[String],
    all: bool,
    timeout_s: f64,
    confirm_s: Option<f64>,
) -> Result<PushTarget> {
    for (flag, v) in [
        ("--push-timeout-s", Some(timeout_s)),
        ("--confirm-s", confirm_s),
    ] {
        if let Some(v) = v.filter(|v| !(1.0..=86400.0).contains(v)) {
            bail!("{flag} must be 1..=86400, got {v}");
        }
    }
    let topics = if all {
        vec![fhecam::wire::deploy_topic(&b.prefix, None)]
    } else if devices.is_empty() {
        bail!("--push needs the cameras: --devices a,b or --all");
    } else {
        devices
            .iter()
            .map(|d| {
                fhecam::wire::envelope::check_id("--devices", d)?;
                if fhecam::wire::reserved_device_id(d) {
                    bail!("--devices: {d:?} is reserved, not a device id (--all pushes to every camera)");
                }
                Ok(fhecam::wire::deploy_topic(&b.prefix, Some(d)))
            })
            .collect::<Result<_>>()?
    };
    Ok(PushTarget {
        broker: b.clone(),
        topics,
        timeout: std::time::Duration::from_secs_f64(timeout_s),
        devices: (!all).then(|| devices.to_vec()),
        confirm: confirm_s.map(std::time::Duration::from_secs_f64),
    })
}

pub(crate) fn deploy(
    db: &Path,
    id: &ModelId,
    key_path: &Path,
    out: Option<&Path>,
    push: Option<&PushTarget>,
) -> Result<()> {
    let store = Store::open(db)?;
    let key = bundle::read_signing_key(key_path)?;
    let fhecam_owner::deploy::Built { bytes, record: rec } =
        fhecam_owner::deploy::build_bundle(&store, id, &key)?;
    let s = &rec.summary;
    let dest = match out {
        Some(out) => {
            write_atomic(out, &bytes)?;
            format!("wrote {}", out.display())
        }
        None => "built".into(),
    };
    println!(
        "{dest}: {} bytes ({}) for {} version {} ({}); encrypted model {} B, public key {} B, evaluation key {} B (server key and compression key); signed by owner key {}",
        bytes.len(),
        mb(bytes.len() as u64),
        s.name,
        s.version,
        s.id,
        rec.encrypted_model.len(),
        rec.public_key.len(),
        rec.server_key.len(),
        bundle::key_id(&key.verifying_key())
    );
    if let Some(p) = push {
        let online = match (&p.devices, p.confirm) {
            // with --all: the cameras online now are the ones to wait for
            (None, Some(_)) => Some(super::fleet::online(&p.broker)?),
            _ => None,
        };
        super::fleet::push(&p.broker, &p.topics, &bytes, p.timeout)?;
        if let Some(limit) = p.confirm {
            let devices = p.devices.clone().or(online).unwrap_or_default();
            super::fleet::confirm(&p.broker, &devices, &s.id.to_string(), limit)?;
        }
    }
    Ok(())
}

fn load_bundle(path: &Path, owner_key: &Path) -> Result<bundle::LoadedBundle> {
    let vk = bundle::read_owner_key(owner_key)?;
    bundle::load_file(path, &vk).with_context(|| format!("{} refused", path.display()))
}

fn verify_bundle(path: &Path, owner_key: &Path) -> Result<()> {
    let t = Instant::now();
    let b = load_bundle(path, owner_key)?;
    let h = &b.header;
    let sizes: Vec<String> = h
        .sections
        .iter()
        .map(|s| format!("{} {} B", s.name, s.bytes))
        .collect();
    println!(
        "bundle {} verified in {:.2} s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    println!("model id     {}", h.model_id);
    println!("name         {} version {}", h.name, h.version);
    println!("created      {}", rfc3339(h.created_unix));
    println!(
        "input        {}x{}x{} ({}-bit), {} classes",
        h.input.channels, h.input.height, h.input.width, h.input.bits, h.num_classes
    );
    println!("tfhe params  {}", h.tfhe_params);
    println!("size         {} bytes: {}", b.total_bytes, sizes.join(", "));
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn infer(
    bundle_path: &Path,
    owner_key: &Path,
    images: &[PathBuf],
    out_dir: &Path,
    (device_id, camera_id): (&str, &str),
    threads: usize,
    mode: fhecam::fhe::eval::InputMode,
) -> Result<()> {
    envelope::check_id("device id", device_id)?;
    envelope::check_id("camera id", camera_id)?;
    // One output per image, decided before any FHE work.
    let mut outputs = Vec::with_capacity(images.len());
    let mut seen = HashMap::new();
    for img in images {
        let stem = img
            .file_stem()
            .with_context(|| format!("{} has no file name", img.display()))?;
        let out = out_dir.join(format!("{}.fhe", stem.to_string_lossy()));
        if let Some(prev) = seen.insert(out.clone(), img) {
            bail!(
                "{} and {} would both be written to {}",
                prev.display(),
                img.display(),
                out.display()
            );
        }
        outputs.push(out);
    }

    let b = load_bundle(bundle_path, owner_key)?;
    let h = b.header.clone();
    eprintln!(
        "bundle verified: {} version {} ({}), input {}x{}x{}",
        h.name, h.version, h.model_id, h.input.channels, h.input.height, h.input.width
    );
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let pb = spinner("decompressing the server key and the encrypted parameters");
    let rt = EdgeRuntime::new(&b.model, b.public, threads)?;
    pb.finish_and_clear();
    let planned: u64 = rt.planned_pbs_in(mode)?.iter().sum();
    eprintln!(
        "runtime ready: {} FHE threads, {planned} PBS per image ({} input)",
        rt.threads(),
        mode.name()
    );

    // each run numbers its results from 0: its own epoch keeps them apart from other runs'
    let epoch = rand::random::<u64>().max(1);
    for (seq, (img, out)) in images.iter().zip(&outputs).enumerate() {
        let t = Instant::now();
        let frame_ms = now_ms();
        let x = preprocess::preprocess_file(img, &h.input)?;
        let pb = pbs_bar(planned, &img.display().to_string());
        let input = rt.frame_input(mode, &x);
        let (res, stats) =
            rt.infer_watched(input.as_frame(), Duration::from_millis(250), &|d, _| {
                pb.set_position(d)
            })?;
        pb.finish_and_clear();
        let env = Envelope {
            device_id: device_id.into(),
            camera_id: camera_id.into(),
            model_id: h.model_id,
            model_version: h.version,
            sequence: seq as u64,
            epoch,
            frame_timestamp_ms: frame_ms,
            ciphertext: res.to_bytes()?,
        };
        let bytes = envelope::encode(&env)?;
        write_atomic(out, &bytes)?;
        println!(
            "{} -> {}: {} PBS, {:.2} s, {} B",
            img.display(),
            out.display(),
            stats.pbs,
            t.elapsed().as_secs_f64(),
            bytes.len()
        );
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct DecryptedResult<'a> {
    file: String,
    label: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<&'a [i64]>,
    model_id: ModelId,
    model_name: &'a str,
    model_version: u32,
    device_id: &'a str,
    camera_id: &'a str,
    sequence: u64,
    frame_timestamp_ms: u64,
}

fn decrypt(
    db: &Path,
    results: &[PathBuf],
    show_logits: bool,
    json: bool,
    pass_file: Option<&Path>,
) -> Result<()> {
    let store = Store::open(db)?;
    let pass = passphrase(pass_file)?;
    let mut decryptor = fhecam_owner::decrypt::Decryptor::new(&store, &pass);
    let mut failed = 0;
    for path in results {
        let mut one = || -> Result<()> {
            let bytes = fhecam::files::read_limited(path, envelope::MAX_ENVELOPE_BYTES as u64)?;
            let d = decryptor.decrypt(&bytes)?;
            let (env, summary) = (&d.envelope, &d.model);
            if json {
                let r = DecryptedResult {
                    file: path.display().to_string(),
                    label: d.label,
                    logits: show_logits.then_some(d.logits.as_slice()),
                    model_id: env.model_id,
                    model_name: &summary.name,
                    model_version: env.model_version,
                    device_id: &env.device_id,
                    camera_id: &env.camera_id,
                    sequence: env.sequence,
                    frame_timestamp_ms: env.frame_timestamp_ms,
                };
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: label {} (model {} v{}, device {}, camera {}, seq {}, frame {}){}",
                    path.display(),
                    d.label,
                    summary.name,
                    env.model_version,
                    env.device_id,
                    env.camera_id,
                    env.sequence,
                    rfc3339((env.frame_timestamp_ms / 1000) as i64),
                    if show_logits {
                        format!(" logits {:?}", d.logits)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        };
        if let Err(e) = one() {
            eprintln!("error: {}: {e:#}", path.display());
            failed += 1;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} results could not be decrypted",
            results.len()
        );
    }
    Ok(())
}
