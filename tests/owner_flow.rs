//! The owner's side end to end, through the real `fhecam` binary: owner key, protect,
//! models, deploy, verify-bundle, infer on digits written as PNG files, decrypt — the
//! decrypted labels and logits equal the plaintext integer model's on the same quantized
//! input. Then the refusals: tampered, foreign-signed and oversized bundles, a result of an
//! unknown model, a wrong passphrase, files readable by others.

use fhecam::ids::ModelId;
use fhecam::secret::{self, KdfParams, Passphrase};
use fhecam::store::{NewModel, Store, StoreError};
use fhecam::wire::envelope;
use fhecam::{bundle, preprocess, reference};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

mod common;
use common::{deploy_out, ok, refused_with as refused, s, tiny_trained, PASS};

/// Test images run encrypted (each ~1,000 PBS with the model below).
const IMAGES: usize = 3;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn protect_deploy_infer_decrypt_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, te) = tiny_trained(2, 8);
    assert_eq!(
        (model.input.channels, model.input.height, model.input.width),
        (1, 8, 8)
    );
    let planned: u64 = fhecam::fhe::eval::plan(&model).unwrap().0.iter().sum();
    eprintln!("{planned} PBS per image");
    assert!(planned <= 2000, "{planned} PBS per image: too slow for CI");
    let model_path = d.join("tiny.json");
    std::fs::write(&model_path, serde_json::to_string(&model).unwrap()).unwrap();

    // Digits as 8-bit PNG files: intensity v/16 stored as round(v*255/16).
    let mut images = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..IMAGES {
        let px: Vec<u8> = te.images[i]
            .iter()
            .map(|&p| ((p * 16.0).round() * 255.0 / 16.0).round() as u8)
            .collect();
        let png = d.join(format!("digit{i}.png"));
        std::fs::write(&png, preprocess::encode_grey_png(&px, 8).unwrap()).unwrap();
        // What the camera path computes from the file equals the quantization of the
        // original intensities (2-bit input: no value of v*255/16 rounds across a step).
        let x = preprocess::preprocess_file(&png, &model.input).unwrap();
        assert_eq!(x, model.input.quantize(&te.images[i]), "image {i}");
        images.push(png);
        inputs.push(x);
    }

    // owner key
    let keys = d.join("keys");
    let out = ok(&["owner-key", "init", "--out", s(&keys)]);
    assert!(out.contains("owner key"));
    assert_eq!(mode(&keys.join("owner.key")), 0o600);
    assert_eq!(mode(&keys.join("owner.pub")), 0o644);
    let owner_pub = keys.join("owner.pub");
    let key_id = std::fs::read_to_string(&owner_pub).unwrap()[..16].to_string();
    let err = refused(&["owner-key", "init", "--out", s(&keys)], None);
    assert!(err.contains("refusing to overwrite"), "{err}");

    // protect
    let db = d.join("owner.db");
    let protect = [
        "protect",
        s(&model_path),
        "--db",
        s(&db),
        "--name",
        "digits",
    ];
    let err = refused(&protect, None);
    assert!(err.contains("FHECAM_OWNER_PASSPHRASE"), "{err}");
    let id = ok(&protect).trim().to_string();
    let model_id: ModelId = id.parse().expect("protect prints the model id");
    assert_eq!(mode(&db), 0o600);
    let listed = ok(&["models", "--db", s(&db)]);
    assert!(
        listed.contains(&id) && listed.contains("digits"),
        "{listed}"
    );
    // the secret key is not stored in the clear: the DB holds no tfhe ClientKey header
    let raw = std::fs::read(&db).unwrap();
    assert!(
        !raw.windows(b"ClientKey".len()).any(|w| w == b"ClientKey"),
        "a serialized ClientKey is in the database"
    );

    // deploy, verify
    let bundle_path = d.join("digits.bundle");
    let signing_key = keys.join("owner.key");
    deploy_out(&db, &id, &signing_key, &bundle_path);
    let bundle_bytes = std::fs::read(&bundle_path).unwrap();
    eprintln!("bundle: {} bytes", bundle_bytes.len());
    assert!(bundle_bytes.len() <= 48 << 20, "bundle over 48 MB");
    let out = ok(&[
        "verify-bundle",
        s(&bundle_path),
        "--owner-key",
        s(&owner_pub),
    ]);
    assert!(out.contains(&id) && out.contains("1x8x8"), "{out}");

    // infer (the camera side) on the PNG files, decrypt (the owner)
    let results = d.join("results");
    // `fhecam infer` with this bundle into `out`, then `rest`
    let infer = |out: &Path, rest: &[&str]| {
        let mut args = vec![
            "infer",
            "--bundle",
            s(&bundle_path),
            "--owner-key",
            s(&owner_pub),
            "--out",
            s(out),
        ];
        args.extend_from_slice(rest);
        ok(&args)
    };
    let mut rest = vec!["--device-id", "dev-1", "--camera-id", "cam:7"];
    rest.extend(images.iter().map(|p| s(p)));
    let out = infer(&results, &rest);
    assert_eq!(out.lines().filter(|l| l.contains("PBS")).count(), IMAGES);
    let result_files: Vec<PathBuf> = (0..IMAGES)
        .map(|i| results.join(format!("digit{i}.fhe")))
        .collect();
    let mut args = vec!["decrypt", "--db", s(&db), "--json", "--logits"];
    args.extend(result_files.iter().map(|p| s(p)));
    let out = ok(&args);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), IMAGES);
    for (i, v) in lines.iter().enumerate() {
        let want = reference::evaluate(&model, &inputs[i]).unwrap();
        let logits: Vec<i64> = serde_json::from_value(v["logits"].clone()).unwrap();
        assert_eq!(logits, want, "image {i}");
        assert_eq!(v["label"], reference::argmax(&want), "image {i}");
        assert_eq!(v["model_id"], id.as_str());
        assert_eq!(v["device_id"], "dev-1");
        assert_eq!(v["camera_id"], "cam:7");
        assert_eq!(v["sequence"], i as u64);
        eprintln!(
            "image {i}: true {} plaintext {} decrypted {}",
            te.labels[i],
            reference::argmax(&want),
            v["label"]
        );
    }
    let text = ok(&["decrypt", "--db", s(&db), s(&result_files[0])]);
    assert!(text.contains("label"), "{text}");

    // the same image with the frame held in the clear by the device: same logits
    let clear_dir = d.join("results-clear");
    let out = infer(&clear_dir, &["--input-mode", "device-clear", s(&images[0])]);
    assert!(out.contains("PBS"), "{out}");
    let clear_file = clear_dir.join("digit0.fhe");
    let v: serde_json::Value = serde_json::from_str(
        ok(&[
            "decrypt",
            "--db",
            s(&db),
            "--json",
            "--logits",
            s(&clear_file),
        ])
        .trim(),
    )
    .unwrap();
    let logits: Vec<i64> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(logits, reference::evaluate(&model, &inputs[0]).unwrap());

    // --- refusals ---
    // one flipped byte, deep in the server key section
    let tampered = d.join("tampered.bundle");
    let mut t = bundle_bytes.clone();
    let at = t.len() - 1000;
    t[at] ^= 0x01;
    std::fs::write(&tampered, &t).unwrap();
    let want = format!("bundle signature does not verify with owner key {key_id}");
    let err = refused(
        &["verify-bundle", s(&tampered), "--owner-key", s(&owner_pub)],
        None,
    );
    assert!(err.contains(&want), "{err}");
    let err = refused(
        &[
            "infer",
            "--bundle",
            s(&tampered),
            "--owner-key",
            s(&owner_pub),
            "--out",
            s(&results),
            s(&images[0]),
        ],
        None,
    );
    assert!(err.contains(&want), "{err}");

    // signed by another owner
    let keys2 = d.join("keys2");
    ok(&["owner-key", "init", "--out", s(&keys2)]);
    let foreign = d.join("foreign.bundle");
    deploy_out(&db, &id, &keys2.join("owner.key"), &foreign);
    let err = refused(
        &["verify-bundle", s(&foreign), "--owner-key", s(&owner_pub)],
        None,
    );
    assert!(err.contains(&want), "{err}");

    // over the size limit (sparse: no disk used)
    let huge = d.join("huge.bundle");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(bundle::MAX_BUNDLE_BYTES + 1)
        .unwrap();
    let err = refused(
        &["verify-bundle", s(&huge), "--owner-key", s(&owner_pub)],
        None,
    );
    assert!(err.contains("over the") && err.contains("limit"), "{err}");

    // a result of a model that is not in the database
    let env = envelope::decode(&std::fs::read(&result_files[0]).unwrap()).unwrap();
    let stranger = ModelId::random();
    let other = d.join("other.fhe");
    std::fs::write(
        &other,
        envelope::encode(&envelope::Envelope {
            model_id: stranger,
            ..env.clone()
        })
        .unwrap(),
    )
    .unwrap();
    let err = refused(&["decrypt", "--db", s(&db), s(&other)], Some(PASS));
    assert!(
        err.contains(&format!("model id {stranger} is not in {}", db.display())),
        "{err}"
    );
    // a truncated result
    let cut = d.join("cut.fhe");
    let bytes = std::fs::read(&result_files[0]).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = refused(&["decrypt", "--db", s(&db), s(&cut)], Some(PASS));
    assert!(err.contains("truncated"), "{err}");

    // wrong passphrase
    let err = refused(
        &["decrypt", "--db", s(&db), s(&result_files[0])],
        Some("not the passphrase"),
    );
    assert!(err.contains("wrong passphrase"), "{err}");

    // files readable by others are refused
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&["models", "--db", s(&db)], None);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&signing_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(
        &[
            "deploy",
            "--db",
            s(&db),
            "--model",
            &model_id.to_string(),
            "--signing-key",
            s(&signing_key),
            "--out",
            s(&d.join("x.bundle")),
        ],
        None,
    );
    assert!(err.contains("chmod 600"), "{err}");
}

/// Versions count per name; a record's sealed key opens only with its passphrase and only
/// for its own id; the database is created 0600. No FHE keys needed.
#[test]
fn store_versions_and_sealed_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("owner.db");
    let mut store = Store::create_or_open(&db).unwrap();
    assert_eq!(mode(&db), 0o600);
    let arch = fhecam::testnet::random_model(
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1),
        fhecam::testnet::Shape::tiny(),
    );
    let pass = Passphrase::new(PASS.into()).unwrap();
    let kdf = KdfParams {
        m_cost_kib: 8 * 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let mut ids = Vec::new();
    for name in ["a", "b", "a", "a"] {
        let id = ModelId::random();
        let sealed = secret::seal(b"not a real key", &pass, b"x", kdf).unwrap();
        let v = store
            .insert(&NewModel {
                id,
                name,
                arch: &arch,
                encrypted_model: b"model",
                public_key: b"pk",
                server_key: b"server",
                sealed_key: &sealed,
            })
            .unwrap();
        ids.push((id, name, v));
    }
    let versions: Vec<u32> = ids.iter().map(|x| x.2).collect();
    assert_eq!(versions, [1, 1, 2, 3]);
    let list = store.list().unwrap();
    assert_eq!(list.len(), 4);
    assert_eq!(list[0].name, "a");
    assert_eq!(list[0].server_key_bytes, 6);
    let rec = store.public_record(&ids[2].0).unwrap();
    assert_eq!(rec.encrypted_model, b"model");
    assert_eq!(rec.summary.version, 2);
    let stranger = ModelId::random();
    assert!(matches!(
        store.summary(&stranger),
        Err(StoreError::NotFound { .. })
    ));
    // bound to `x` above, not to the record's id context: refused as a wrong passphrase
    assert!(matches!(
        store.owner_keys(&ids[0].0, &pass),
        Err(StoreError::Secret {
            source: secret::SecretError::WrongPassphrase,
            ..
        })
    ));
    drop(store);
    // reopened, the rows are there
    assert_eq!(Store::open(&db).unwrap().list().unwrap().len(), 4);

    // a record whose evaluation key predates packed outputs (no compression key) is not
    // deployed: the owner is told to protect the model again
    let keys = dir.path().join("keys");
    ok(&["owner-key", "init", "--out", s(&keys)]);
    let id = ids[0].0.to_string();
    let err = refused(
        &[
            "deploy",
            "--db",
            s(&db),
            "--model",
            &id,
            "--signing-key",
            s(&keys.join("owner.key")),
            "--out",
            s(&dir.path().join("old.bundle")),
        ],
        None,
    );
    assert!(
        err.contains("cannot be deployed as it is stored")
            && err.contains("protect the model again"),
        "{err}"
    );
    assert!(!dir.path().join("old.bundle").exists());
}
